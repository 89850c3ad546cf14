//! Hypercalls from CPL 3: one `out` to the hypercall port per request, carrying the
//! guest-physical address of a request block (guest memory is identity-mapped).

use wasmvisor_abi::hypercall::{BUFFER_MAX, Hypercall, HypercallBlock, HypercallError};
use wasmvisor_abi::layout::HYPERCALL_PORT;

/// Sends one request block and returns the VMM's `result`.
///
/// Any block is memory-safe to send: the VMM validates everything in it.
pub fn raw(block: &mut HypercallBlock) -> i64 {
    let gpa = core::ptr::from_mut(block) as u64;
    // SAFETY: `out` to the hypercall port exits to the VMM, which reads the block at `gpa`,
    // writes its `result` field and resumes here. The block is a live, exclusive borrow, so
    // the write cannot alias anything else; the asm is not `nomem`, so the compiler assumes
    // memory may have changed. RAM lies below 4 GiB, so the address fits EAX.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") HYPERCALL_PORT, in("eax") gpa as u32,
            options(nostack, preserves_flags));
    }
    // SAFETY: reading a field of a block we own; volatile because the VMM wrote it.
    unsafe { core::ptr::read_volatile(&raw const block.result) }
}

/// Sends a request; `Ok(result)` or the VMM's error.
pub fn call(request: Hypercall) -> Result<u64, HypercallError> {
    let result = raw(&mut request.encode());
    u64::try_from(result).map_err(|_| HypercallError::from_result(result).unwrap_or(HypercallError::BadArgument))
}

/// Writes bytes to the console, one exit per 64 KiB.
pub fn console_write(bytes: &[u8]) -> Result<(), HypercallError> {
    for chunk in bytes.chunks(BUFFER_MAX as usize) {
        call(Hypercall::ConsoleWrite { gpa: chunk.as_ptr() as u64, len: chunk.len() as u64 })?;
    }
    Ok(())
}

/// Blocks the vCPU for about `ns` nanoseconds.
pub fn wait(ns: u64) -> Result<(), HypercallError> {
    call(Hypercall::Wait { timeout_ns: ns }).map(drop)
}

/// Stops the VM with `code`.
pub fn exit(code: u8) -> ! {
    let _ = call(Hypercall::Exit { code });
    // The VMM never resumes a guest that asked to exit; if it did, fault so that it reports.
    // SAFETY: `ud2` raises #UD, which the VMM's exception stubs report; nothing follows.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
