//! The guest's CPU features: its own CPUID, read once, through the detection in
//! `wasmvisor_abi::cpu` that the host compiles by.
//!
//! [`features`] is what the guest answers wasmtime's feature probe with when it checks an
//! artifact's ISA flags, and what a feature-report boot ([`report`]) tells the host: the host
//! compiles for exactly this set, so the two cannot disagree. Features the VMM masks in
//! `BootInfo::cpu_features_masked` are left out of both.

use core::sync::atomic::{AtomicU64, Ordering};

use wasmvisor_abi::cpu::{CPU_REPORT_VERSION, CpuReport, CpuidTable, FeatureSet, detect};
use wasmvisor_abi::hypercall::{Hypercall, HypercallError};

use crate::boot::Boot;

/// `FEATURES` before the first detection (no real set has bit 63: it names no feature).
const UNSET: u64 = 1 << 63;
static FEATURES: AtomicU64 = AtomicU64::new(UNSET);
static MASKED: AtomicU64 = AtomicU64::new(0);

/// Takes the VMM's mask from the boot hand-off; called once at entry, before any detection.
pub fn init(boot: &Boot) {
    MASKED.store(boot.info().cpu_features_masked, Ordering::Relaxed);
}

/// XCR0 (called by `CpuidTable::read` only when CPUID reports OSXSAVE).
fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX=0 reads XCR0; it is allowed at CPL 3 once CR4.OSXSAVE is set,
    // which CPUID.1:ECX.OSXSAVE (checked by the caller) reports.
    unsafe { core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(lo) | (u64::from(hi) << 32)
}

/// This vCPU's CPUID table, as CPL 3 code here sees it.
pub fn table() -> CpuidTable {
    CpuidTable::read(
        |leaf, sub| {
            let r = core::arch::x86_64::__cpuid_count(leaf, sub);
            [r.eax, r.ebx, r.ecx, r.edx]
        },
        xgetbv0,
    )
}

/// The features this guest may use: detected from its CPUID once (CPUID may exit to the
/// hypervisor, and wasmtime asks once per ISA flag), minus the VMM's mask.
pub fn features() -> FeatureSet {
    let cached = FEATURES.load(Ordering::Relaxed);
    if cached != UNSET {
        return FeatureSet(cached);
    }
    let set = detect(&table()).without(FeatureSet(MASKED.load(Ordering::Relaxed)));
    FEATURES.store(set.0, Ordering::Relaxed);
    set
}

/// Sends the feature report (`BOOT_FLAG_CPU_REPORT`): the raw table and [`features`].
pub fn report() -> Result<(), HypercallError> {
    let report = CpuReport { version: CPU_REPORT_VERSION, table: table(), detected: features() };
    let bytes = report.encode();
    crate::hypercall::call(Hypercall::CpuReport { gpa: bytes.as_ptr() as u64 }).map(drop)
}
