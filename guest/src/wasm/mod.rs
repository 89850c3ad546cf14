//! Running a precompiled component: the engine (shared configuration plus this guest's
//! platform hooks), zero-copy deserialization from the read-only artifact window, WASI, and
//! the mapping of the outcome to an exit code.
//!
//! Exit codes follow `wasmtime run`: the component's own code (`exit(ok)` 0, `exit(err)` 1,
//! `exit-with-code(n)` n, `run` returning `err` 1), 134 for a trap. A component that cannot be
//! loaded or linked exits with 125, like any other failure to start it.

mod caps;
pub mod http;
pub mod platform;
pub mod wasi;

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::NonNull;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, Trap};
use wasmvisor_abi::boot::MemoryRegion;
use wasmvisor_abi::hypercall::StdStream;

use crate::boot::Boot;

/// Exit code for a trap (128 + SIGABRT, as `wasmtime run` on Unix).
pub const TRAP_EXIT_CODE: u8 = 134;
/// Exit code when the component cannot be loaded or linked.
pub const LOAD_FAILED_EXIT_CODE: u8 = 125;

/// The guest's own phase timings, from the TSC, reported on the console when the VMM asks.
struct Phases {
    enabled: bool,
    tsc_khz: u64,
    last: u64,
    laps: Vec<(&'static str, u64)>,
}

impl Phases {
    fn new(boot: &Boot) -> Self {
        let enabled = boot.info().flags & wasmvisor_abi::boot::BOOT_FLAG_REPORT_PHASES != 0;
        let now = crate::rdtsc();
        Self { enabled, tsc_khz: boot.tsc_khz().max(1), last: now, laps: Vec::new() }
    }

    fn lap(&mut self, name: &'static str) {
        if self.enabled {
            let now = crate::rdtsc();
            self.laps.push((name, (now - self.last) * 1000 / self.tsc_khz));
            self.last = now;
        }
    }

    /// Starts timing afresh (after a restore: the TSC moved on while the snapshot waited).
    fn restart(&mut self) {
        self.last = crate::rdtsc();
        self.laps.clear();
        self.laps.push(("restored", 0));
    }

    fn report(&self) {
        if self.enabled {
            let mut line = String::from("guest phases (us):");
            for (name, us) in &self.laps {
                line.push_str(&alloc::format!(" {name} {us}"));
            }
            crate::println!("{line}");
        }
    }
}

/// A linked component: an HTTP handler or a command.
enum Linked {
    Http(http::HttpPre<wasi::Ctx>, crate::vsock::SharedVsock),
    Command(wasi::CommandPre<wasi::Ctx>),
}

/// Writes a diagnostic line to the tenant's stderr.
fn report(message: &str) {
    let mut err = wasi::StdOutput::new(StdStream::Stderr);
    let _ = err.write(message.as_bytes());
    let _ = err.write(b"\n");
    let _ = err.flush();
}

/// The engine with the shared configuration and this guest's platform hooks.
fn engine() -> wasmtime::Result<Engine> {
    let mut config = wasmvisor_engine::config();
    // SAFETY: only float libcalls pass floats in registers between Cranelift code (SSE) and
    // this soft-float Rust; the host compiles with SSE4.1 (native rounding) where the CPU has
    // it and relaxed SIMD off, so no such libcall is used. The probe reads CPUID/XCR0 and is
    // exactly the detection wasmtime asks for.
    unsafe {
        config.x86_float_abi_ok(true);
        config.detect_host_feature(platform::detect_feature);
    }
    config.with_custom_code_memory(Some(Arc::new(platform::IdentityCodeMemory)));
    Engine::new(&config)
}

/// Runs the component in `artifact` (the `Component` region of the memory map) and returns
/// the exit code.
pub fn run(boot: &Boot, artifact: &MemoryRegion) -> u8 {
    crate::RUNNING_COMPONENT.store(true, core::sync::atomic::Ordering::Relaxed);
    let mut phases = Phases::new(boot);
    let serving = boot.info().flags & wasmvisor_abi::boot::BOOT_FLAG_HTTP != 0;
    // An HTTP VM brings its device up first: its register exits are paid at boot, not by the
    // first request.
    let vsock = if serving {
        match http::bring_up(crate::vsock::present(boot), boot.tsc_khz()) {
            Ok(v) => Some(v),
            Err(e) => {
                report(&alloc::format!("wasmvisor: error: cannot bring the vsock device up: {e}"));
                return LOAD_FAILED_EXIT_CODE;
            }
        }
    } else {
        None
    };
    if serving {
        phases.lap("vsock");
    }
    let engine = match engine() {
        Ok(e) => e,
        Err(e) => {
            report(&alloc::format!("wasmvisor: error: cannot create the wasmtime engine in the guest: {e:#}"));
            return LOAD_FAILED_EXIT_CODE;
        }
    };
    let bytes = NonNull::slice_from_raw_parts(
        NonNull::new(artifact.base as *mut u8).expect("the artifact window is not at address 0"),
        artifact.size as usize,
    );
    phases.lap("engine");
    // SAFETY: the VMM maps the artifact read-only at this address for the guest's whole life;
    // nothing modifies it, and it was produced by `Engine::precompile_component` with the
    // shared configuration (deserialize checks that).
    let component = match unsafe { Component::deserialize_raw(&engine, bytes) } {
        Ok(c) => c,
        Err(e) => {
            // The host decides what to do about it (a stale cache entry is recompiled).
            let why = alloc::format!("{e:#}");
            let _ = crate::hypercall::call(wasmvisor_abi::hypercall::Hypercall::ArtifactRejected {
                gpa: why.as_ptr() as u64,
                len: why.len().min(wasmvisor_abi::hypercall::BUFFER_MAX as usize) as u64,
            });
            // The VMM stops the guest at that hypercall; this is for a VMM that does not.
            report(&alloc::format!("wasmvisor: error: cannot load the compiled component: {why}"));
            return LOAD_FAILED_EXIT_CODE;
        }
    };
    phases.lap("deserialize");
    let mut linker = Linker::new(&engine);
    let linked =
        match (wasi::add_to_linker(&mut linker, &component).and_then(|()| linker.instantiate_pre(&component)), vsock) {
            (Ok(pre), Some(vsock)) => http::HttpPre::new(pre).map(|pre| Linked::Http(pre, vsock)),
            (Ok(pre), None) => wasi::CommandPre::new(pre).map(Linked::Command),
            (Err(e), _) => Err(e),
        };
    let linked = match linked {
        Ok(linked) => linked,
        Err(e) => {
            report(&alloc::format!("wasmvisor: error: cannot link the component: {e:#}"));
            return LOAD_FAILED_EXIT_CODE;
        }
    };
    phases.lap("link");
    // The snapshot point: nothing below it may be in a snapshot, since it reads the tenant's
    // strings, seed and config, and the restore's BootInfo holds those of the launch.
    let restored = crate::ready(boot);
    let boot = match &restored {
        Some(launch) => {
            phases.restart();
            launch
        }
        None => boot,
    };
    let new_ctx = |rng: wasi::Rng| wasi::Ctx {
        table: ResourceTable::new(),
        args: boot.args().map(ToString::to_string).collect(),
        env: boot.env().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<(String, String)>>(),
        stdout: wasi::StdOutput::new(StdStream::Stdout),
        stderr: wasi::StdOutput::new(StdStream::Stderr),
        clock: wasi::Clock::new(boot),
        rng,
        insecure_seed: (0, 0),
        limits: wasi::Limits { ram: boot.memory_size(), refused: None },
        caps: caps::BrokerConn::new(crate::vsock::present(boot), boot.tsc_khz()),
        http: None,
        finished_bodies: Default::default(),
        fs: wasi::FsState::new(boot.info().flags & wasmvisor_abi::boot::BOOT_FLAG_PREOPENS != 0),
    };
    let pre = match linked {
        Linked::Http(pre, vsock) => {
            // Every instance draws its own seed from one generator: no two requests share one.
            let mut rng = wasi::Rng::new(boot.info().random_seed);
            let http::Stop::Link(why) = http::serve(vsock, &pre, || new_ctx(rng.fork()), &mut phases);
            report(&alloc::format!("wasmvisor: error: the HTTP front door's connection failed: {why}"));
            return LOAD_FAILED_EXIT_CODE;
        }
        Linked::Command(pre) => pre,
    };

    let mut store = Store::new(&engine, new_ctx(wasi::Rng::new(boot.info().random_seed)));
    let seed = (store.data_mut().rng.u64(), store.data_mut().rng.u64());
    store.data_mut().insecure_seed = seed;
    store.limiter(|ctx| &mut ctx.limits);

    let result = pre.instantiate(&mut store).and_then(|guest| {
        phases.lap("instantiate");
        guest.wasi_cli_run().call_run(&mut store)
    });
    store.data_mut().flush_outputs();
    phases.lap("run");
    phases.report();
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(())) => 1,
        Err(e) => {
            if let Some(wasi::Exit(code)) = e.downcast_ref::<wasi::Exit>() {
                return *code;
            }
            if let Some(refused) = store.data().limits.refused {
                // The supervisor records why the run failed; `run` prints the line below.
                let wanted = if refused > 1 { refused as u64 } else { 0 };
                let _ = crate::hypercall::call(wasmvisor_abi::hypercall::Hypercall::OutOfMemory { wanted });
                report(&alloc::format!(
                    "wasmvisor: error: out of memory: the component's linear memory could not grow{} within the \
                     guest's {} MiB (raise --memory)",
                    if refused > 1 { alloc::format!(" to {} MiB", refused.div_ceil(1 << 20)) } else { String::new() },
                    boot.memory_size() >> 20,
                ));
            }
            if let Some(trap) = e.downcast_ref::<Trap>() {
                report(&alloc::format!("wasmvisor: error: the component trapped: {trap}"));
            } else {
                report(&alloc::format!("wasmvisor: error: the component failed: {e:#}"));
            }
            TRAP_EXIT_CODE
        }
    }
}
