//! What wasmtime's `no_std` runtime needs from the platform: thread-local slots, a way to make
//! code executable, and the CPU features for checking an artifact's ISA flags.
//!
//! The guest is single-threaded and identity-mapped; the component artifact sits in a
//! read-only, executable window that the VMM maps, so "publishing" code is a no-op.

use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

/// wasmtime's TLS slots (slot 0 is always used; slot 1 only by async components).
static TLS: [AtomicPtr<u8>; 2] = [AtomicPtr::new(ptr::null_mut()), AtomicPtr::new(ptr::null_mut())];

/// wasmtime platform hook: read a thread-local slot.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    TLS.get(slot).map_or(ptr::null_mut(), |s| s.load(Ordering::Relaxed))
}

/// wasmtime platform hook: write a thread-local slot.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_set(slot: usize, value: *mut u8) {
    if let Some(s) = TLS.get(slot) {
        s.store(value, Ordering::Relaxed);
    }
}

/// Code memory for an identity-mapped guest whose RAM and artifact window are executable.
pub struct IdentityCodeMemory;

impl wasmtime::CustomCodeMemory for IdentityCodeMemory {
    fn required_alignment(&self) -> usize {
        4096
    }

    fn publish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }

    fn unpublish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }
}

fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// XCR0, or 0 if the OS (here: the VMM) did not enable XSAVE.
fn xcr0() -> u32 {
    const OSXSAVE: u32 = 1 << 27;
    if cpuid(1, 0).ecx & OSXSAVE == 0 {
        return 0;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: XGETBV with ECX=0 reads XCR0; it is allowed at CPL 3 once CR4.OSXSAVE is set,
    // which CPUID.1:ECX.OSXSAVE reports.
    unsafe { core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi, options(nomem, nostack)) };
    lo
}

/// Whether the AVX register state (SSE + YMM) is enabled in XCR0.
fn avx_state_enabled() -> bool {
    xcr0() & 0b110 == 0b110
}

/// Whether the AVX-512 register state (opmask, ZMM_Hi256, Hi16_ZMM, on top of AVX) is enabled.
fn avx512_state_enabled() -> bool {
    xcr0() & 0b1110_0110 == 0b1110_0110
}

/// wasmtime's CPU feature probe: whether this CPU has `feature` (names as wasmtime asks,
/// e.g. "sse4.1"), or `None` for a name we do not know.
pub fn detect_feature(feature: &str) -> Option<bool> {
    let l1 = cpuid(1, 0);
    let max_leaf = cpuid(0, 0).eax;
    let l7 =
        if max_leaf >= 7 { cpuid(7, 0) } else { core::arch::x86_64::CpuidResult { eax: 0, ebx: 0, ecx: 0, edx: 0 } };
    let max_ext = cpuid(0x8000_0000, 0).eax;
    let ext1 = if max_ext >= 0x8000_0001 { cpuid(0x8000_0001, 0).ecx } else { 0 };
    let bit = |reg: u32, n: u32| reg & (1 << n) != 0;
    Some(match feature {
        "sse3" => bit(l1.ecx, 0),
        "ssse3" => bit(l1.ecx, 9),
        "sse4.1" => bit(l1.ecx, 19),
        "sse4.2" => bit(l1.ecx, 20),
        "popcnt" => bit(l1.ecx, 23),
        "cmpxchg16b" => bit(l1.ecx, 13),
        "avx" => bit(l1.ecx, 28) && avx_state_enabled(),
        "fma" => bit(l1.ecx, 12) && avx_state_enabled(),
        "avx2" => bit(l7.ebx, 5) && avx_state_enabled(),
        "bmi1" => bit(l7.ebx, 3),
        "bmi2" => bit(l7.ebx, 8),
        "lzcnt" => bit(ext1, 5),
        "avx512f" => bit(l7.ebx, 16) && avx512_state_enabled(),
        "avx512dq" => bit(l7.ebx, 17) && avx512_state_enabled(),
        "avx512vl" => bit(l7.ebx, 31) && avx512_state_enabled(),
        "avx512vbmi" => bit(l7.ecx, 1) && avx512_state_enabled(),
        "avx512vnni" => bit(l7.ecx, 11) && avx512_state_enabled(),
        "avx512bitalg" => bit(l7.ecx, 12) && avx512_state_enabled(),
        _ => return None,
    })
}
