//! The wasmvisor guest runtime: what every guest binary stands on.
//!
//! The VMM enters `_start` (defined by [`entry!`]) at CPL 3 with paging on, a stack, and the
//! address of the [`BootInfo`] in RDI. There is no privileged code on this path and no
//! interrupts: the guest reaches the VMM only through hypercalls ([`hypercall`]). This crate
//! owns that entry, the heap ([`heap`]), the console and `log` backend ([`console`]), the view
//! of the boot hand-off ([`boot`]), the CPU features the guest detects and reports ([`cpu`]),
//! and the panic handler, which reports and exits with 101.

#![no_std]

extern crate alloc;

pub mod boot;
pub mod console;
pub mod cpu;
pub mod heap;
pub mod hypercall;
pub mod virtio_mmio;
pub mod vsock;
pub mod wasm;

pub use wasmvisor_abi as abi;
use wasmvisor_abi::boot::BootInfo;

/// The time-stamp counter: the guest's clock (its rate is BootInfo's TSC kHz).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC runs at CPL 3 (the VMM leaves CR4.TSD clear) and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Exit code of a guest that panicked (the same as a Rust program's).
pub const PANIC_EXIT_CODE: u8 = 101;
/// Exit code of a guest that found the VMM's `BootInfo` incompatible.
pub const BAD_BOOT_INFO_EXIT_CODE: u8 = 100;

/// Defines the guest's entry point `_start`, which sets up the runtime and then calls
/// `$main(&Boot) -> u8`; the returned value is the exit code.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The ELF entry point, entered by the VMM at CPL 3 with the `BootInfo` address in RDI.
        ///
        /// # Safety
        ///
        /// Only the VMM calls this, once, with the address of the BootInfo it wrote.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn _start(boot_info: *const $crate::abi::boot::BootInfo) -> ! {
            let main: fn(&$crate::boot::Boot) -> u8 = $main;
            // SAFETY: our caller, the VMM, passes the address of the BootInfo it wrote.
            unsafe { $crate::start(boot_info, main) }
        }
    };
}

/// Brings the runtime up and runs `main`. Called by the `_start` that [`entry!`] defines.
///
/// # Safety
///
/// `boot_info` must point at a readable `BootInfo` that stays unchanged for the guest's life,
/// as the VMM's does.
pub unsafe fn start(boot_info: *const BootInfo, main: fn(&boot::Boot) -> u8) -> ! {
    // SAFETY: the caller guarantees a readable, unchanging BootInfo; every field is a plain
    // integer, so any contents are a valid value. `Boot::new` checks magic, version and size.
    let info: &'static BootInfo = unsafe { &*boot_info };
    let Some(boot) = boot::Boot::new(info) else {
        console::write_bytes(b"guest: BootInfo from the VMM has the wrong magic, version or size\n");
        hypercall::exit(BAD_BOOT_INFO_EXIT_CODE);
    };
    cpu::init(&boot);
    if boot.info().flags & wasmvisor_abi::boot::BOOT_FLAG_CPU_REPORT != 0 {
        // A feature-report boot runs nothing else: the host asks before it compiles anything.
        let code = if cpu::report().is_ok() { 0 } else { 1 };
        hypercall::exit(code);
    }
    heap::init(&boot);
    console::init_logger();
    let boot = if boot.info().flags & wasmvisor_abi::boot::BOOT_FLAG_AWAIT_LAUNCH != 0 {
        // SAFETY: as above; no reference into the BootInfo lives across the wait.
        unsafe { await_launch(boot, boot_info) }
    } else {
        boot
    };
    let code = main(&boot);
    hypercall::exit(code)
}

/// A pre-booted VM (`BOOT_FLAG_AWAIT_LAUNCH`): detects the CPU features while nothing waits on
/// it, then waits for the launch, and reads the `BootInfo` the VMM rewrote for it.
///
/// # Safety
///
/// `boot_info` is the BootInfo `pre` was read from; the caller holds no other reference into
/// it (the VMM rewrites it during the `AwaitLaunch` hypercall).
unsafe fn await_launch(pre: boot::Boot, boot_info: *const BootInfo) -> boot::Boot {
    // CPUID and the device's registers exit to the hypervisor: paid before the launch.
    let _ = cpu::features();
    vsock::bring_up_before_launch(&pre);
    let masked = pre.info().cpu_features_masked;
    let memory_size = pre.memory_size();
    // `pre` is not used past this point: nothing reads the BootInfo through it across the wait.
    if hypercall::call(wasmvisor_abi::hypercall::Hypercall::AwaitLaunch).is_err() {
        console::write_bytes(b"guest: the VMM refused to hand this pre-booted VM its launch\n");
        hypercall::exit(BAD_BOOT_INFO_EXIT_CODE);
    }
    // SAFETY: the hypercall's asm may write any memory, and it is where the VMM rewrote the
    // BootInfo; this reference is derived afresh after it, and it never changes again.
    let info: &'static BootInfo = unsafe { &*boot_info };
    match boot::Boot::new(info) {
        // The heap and the CPU features were set up from the first BootInfo: the launch must
        // keep what they depend on.
        Some(boot)
            if boot.info().flags & wasmvisor_abi::boot::BOOT_FLAG_AWAIT_LAUNCH == 0
                && boot.info().cpu_features_masked == masked
                && boot.memory_size() == memory_size =>
        {
            boot
        }
        _ => {
            console::write_bytes(b"guest: the launch's BootInfo does not match the pre-booted VM\n");
            hypercall::exit(BAD_BOOT_INFO_EXIT_CODE)
        }
    }
}

/// The snapshot point: the component is ready and nothing of the tenant's has been read. In a
/// boot with `BOOT_FLAG_SNAPSHOT` the guest tells the VMM (`Ready`), which snapshots it there.
/// Returns the `Boot` to go on with: `None` when this is the boot that got here (nothing
/// changed), or the launch's when the VMM says this VM was restored from the snapshot; a
/// restore whose `BootInfo` does not match what the guest set itself up with exits.
pub fn ready(boot: &boot::Boot) -> Option<boot::Boot> {
    use wasmvisor_abi::boot::{BOOT_FLAG_AWAIT_LAUNCH, BOOT_FLAG_HTTP, BOOT_FLAG_SNAPSHOT, BOOT_FLAG_VSOCK};
    let before = boot.info();
    if before.flags & BOOT_FLAG_SNAPSHOT == 0 {
        return None;
    }
    let kept = BOOT_FLAG_HTTP | BOOT_FLAG_VSOCK;
    let (flags, masked, memory_size) = (before.flags & kept, before.cpu_features_masked, before.memory_size);
    let component = boot.regions().iter().find(|r| r.kind == wasmvisor_abi::boot::MemoryKind::Component as u32);
    let component = component.map(|r| (r.base, r.size));
    let at: *const BootInfo = before;
    match hypercall::call(wasmvisor_abi::hypercall::Hypercall::Ready) {
        Ok(wasmvisor_abi::hypercall::READY_RESTORED) => {}
        // Made here (the snapshot, if any, is taken), or a VMM that takes none: go on.
        _ => return None,
    }
    // SAFETY: the VMM rewrote the BootInfo at the same address before it resumed this restored
    // VM; the reference is derived afresh after the hypercall (whose asm may write any memory).
    let info: &'static BootInfo = unsafe { &*at };
    let restored = boot::Boot::new(info).filter(|b| {
        let i = b.info();
        let same_component = b.regions().iter().find(|r| r.kind == wasmvisor_abi::boot::MemoryKind::Component as u32);
        i.flags & BOOT_FLAG_AWAIT_LAUNCH == 0
            && i.flags & kept == flags
            && i.cpu_features_masked == masked
            && i.memory_size == memory_size
            && same_component.map(|r| (r.base, r.size)) == component
    });
    match restored {
        Some(b) => Some(b),
        None => {
            console::write_bytes(b"guest: the restored VM's BootInfo does not match its snapshot\n");
            hypercall::exit(BAD_BOOT_INFO_EXIT_CODE)
        }
    }
}

/// Set while a component runs: a guest panic is then also reported on the tenant's stderr,
/// since the console is only shown with `-v`.
pub static RUNNING_COMPONENT: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::sync::atomic::{AtomicBool, Ordering};
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let mut out = console::Console::new();
        // Formatting into the fixed buffer cannot allocate or fail.
        let _ = core::fmt::write(&mut out, format_args!("guest panicked: {info}\n"));
        if RUNNING_COMPONENT.load(Ordering::Relaxed) {
            let mut err = console::Console::to_stderr();
            let _ = core::fmt::write(&mut err, format_args!("wasmvisor: error: the guest kernel panicked: {info}\n"));
        }
    }
    hypercall::exit(PANIC_EXIT_CODE)
}
