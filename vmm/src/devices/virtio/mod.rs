//! Virtio devices emulated in the VMM's userspace (this host has no vhost): the virtio-mmio
//! transport ([`mmio`]), the vsock device ([`vsock`]) and the thread that serves it
//! ([`worker`]).
//!
//! The guest has no interrupts. It notifies the device by writing `QueueNotify`, which an
//! ioeventfd turns into an eventfd signal for the worker thread without a userspace exit on
//! the vCPU thread; it learns of used buffers by polling its used rings, and when it has
//! nothing to do it makes the `WaitDevice` hypercall, which sleeps the vCPU thread on a
//! [`DeviceWake`] until the worker has used buffers for it.

pub mod mmio;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// How the worker wakes a vCPU sleeping in `WaitDevice`: a flag set whenever the device
/// places used buffers, cleared by the wait that consumes it.
#[derive(Debug, Default)]
pub struct DeviceWake {
    pending: Mutex<bool>,
    cond: Condvar,
    /// The CPU the vCPU thread last waited on, plus one (0: not known yet).
    waiter_cpu: AtomicI32,
}

impl DeviceWake {
    /// The device has used buffers the guest may not have seen.
    pub fn notify(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending = true;
        self.cond.notify_all();
    }

    /// The CPU the guest's vCPU thread last went to sleep on: where the guest will read what
    /// the device places for it, so where its caches hold that memory.
    pub fn waiter_cpu(&self) -> Option<usize> {
        usize::try_from(self.waiter_cpu.load(Ordering::Relaxed)).ok()?.checked_sub(1)
    }

    /// Sleeps until `notify` (or one that came since the last wait) or `until`; true when woken
    /// by the device. A stale flag only costs the guest one more look at its rings.
    pub fn wait(&self, until: Instant) -> bool {
        // SAFETY: sched_getcpu only reads which CPU this thread runs on (-1 if it cannot).
        let cpu = unsafe { libc::sched_getcpu() };
        self.waiter_cpu.store(cpu.max(-1) + 1, Ordering::Relaxed);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *pending {
                *pending = false;
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            pending = self.cond.wait_timeout(pending, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}
