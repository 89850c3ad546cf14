//! `wasi:clocks`: a monotonic clock from the TSC, the wall clock as the VMM's boot time plus
//! the TSC, and sleeping through the wait hypercall.

use wasmtime::component::Resource;
use wasmvisor_abi::hypercall::WAIT_MAX_NS;

use super::wasi::clocks::{monotonic_clock, timezone, wall_clock};
use super::{Ctx, Pollable};
use crate::boot::Boot;
use crate::hypercall;
use crate::rdtsc;

/// Time from the TSC, anchored at the VMM's boot-time reading.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    tsc_khz: u64,
    boot_tsc: u64,
    boot_wall_ns: u64,
}

impl Clock {
    /// The clock described by the boot hand-off.
    pub fn new(boot: &Boot) -> Self {
        let info = boot.info();
        Self { tsc_khz: info.tsc_khz.max(1), boot_tsc: info.boot_tsc, boot_wall_ns: info.boot_wall_ns }
    }

    /// Nanoseconds since boot.
    pub fn monotonic_ns(&self) -> u64 {
        let ticks = rdtsc().saturating_sub(self.boot_tsc);
        (u128::from(ticks) * 1_000_000 / u128::from(self.tsc_khz)) as u64
    }

    /// Nanoseconds since the Unix epoch.
    pub fn wall_ns(&self) -> u64 {
        self.boot_wall_ns.saturating_add(self.monotonic_ns())
    }

    /// Nanoseconds per TSC tick, rounded up (at least 1).
    fn resolution_ns(&self) -> u64 {
        1_000_000u64.div_ceil(self.tsc_khz).max(1)
    }

    /// Blocks the vCPU until the monotonic clock reaches `deadline_ns`.
    pub fn sleep_until(&self, deadline_ns: u64) {
        loop {
            let now = self.monotonic_ns();
            if now >= deadline_ns {
                return;
            }
            let _ = hypercall::wait((deadline_ns - now).min(WAIT_MAX_NS));
        }
    }
}

impl monotonic_clock::Host for Ctx {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(self.clock.monotonic_ns())
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(self.clock.resolution_ns())
    }

    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<Pollable>> {
        Ok(self.table.push(Pollable::Until(when))?)
    }

    fn subscribe_duration(&mut self, when: u64) -> wasmtime::Result<Resource<Pollable>> {
        let at = self.clock.monotonic_ns().saturating_add(when);
        Ok(self.table.push(Pollable::Until(at))?)
    }
}

impl wall_clock::Host for Ctx {
    fn now(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        let ns = self.clock.wall_ns();
        Ok(wall_clock::Datetime { seconds: ns / 1_000_000_000, nanoseconds: (ns % 1_000_000_000) as u32 })
    }

    fn resolution(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        Ok(wall_clock::Datetime { seconds: 0, nanoseconds: self.clock.resolution_ns() as u32 })
    }
}

/// `wasi:clocks/timezone` (unstable, linked only on request): the guest knows only UTC.
impl timezone::Host for Ctx {
    fn display(&mut self, _when: wall_clock::Datetime) -> wasmtime::Result<timezone::TimezoneDisplay> {
        Ok(timezone::TimezoneDisplay {
            utc_offset: 0,
            name: alloc::string::String::from("UTC"),
            in_daylight_saving_time: false,
        })
    }

    fn utc_offset(&mut self, _when: wall_clock::Datetime) -> wasmtime::Result<i32> {
        Ok(0)
    }
}
