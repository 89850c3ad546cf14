//! vCPU state at entry: CPUID, control registers, segments, and the registers that carry
//! the entry point, stack and `BootInfo` address. This is the state `HOST-KVM.md` found to
//! work under PVM (CR0 0x80050033, CR4 0x50620, EFER 0xd01, RFLAGS 0x3202); it is also legal
//! and native on VMX/SVM.

use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_segment, kvm_xcrs};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use wasmvisor_abi::layout::{GDT_GPA, IDT_GPA, PML4_GPA, TSS_GPA, TSS_SELECTOR, USER_CS, USER_DS};

use super::gdt::{GDT_SLOTS, TSS_SIZE};
use super::idt::IDT_SIZE;

/// CR0: PE, MP, ET, NE, WP, AM, PG.
pub const CR0: u64 = 0x8005_0033;
/// CR4: PAE, OSFXSR, OSXMMEXCPT, FSGSBASE, OSXSAVE (PVM refuses PCID).
pub const CR4: u64 = 0x5_0620;
/// EFER: SCE, LME, LMA, NXE.
pub const EFER: u64 = 0xd01;
/// RFLAGS: reserved bit 1, IF, IOPL 3 (port I/O from CPL 3 exits instead of faulting).
pub const RFLAGS: u64 = 0x3202;
/// XCR0 bits the guest may use: x87, SSE, AVX, AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM).
const XCR0_WANTED: u64 = 0b1110_0111;

/// A vCPU register ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}: {source}")]
pub struct CpuError {
    /// What was being done.
    pub what: &'static str,
    /// The ioctl's error.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError { what, source }
}

static SUPPORTED: OnceLock<CpuId> = OnceLock::new();

/// The host's supported CPUID, asked of KVM once per process (the ioctl costs ~300 us under
/// PVM).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    if let Some(cpuid) = SUPPORTED.get() {
        return Ok(cpuid.clone());
    }
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(err("get the supported CPUID"))?;
    Ok(SUPPORTED.get_or_init(|| cpuid).clone())
}

/// The supported CPUID if this process has it already (asked, or given by [`preset_supported_cpuid`]).
pub fn cached_supported_cpuid() -> Option<CpuId> {
    SUPPORTED.get().cloned()
}

/// One `KVM_GET_SUPPORTED_CPUID` entry as plain data, for a supervisor to hand the answer it
/// got once to its VMM children (the same host, the same KVM) instead of each asking again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// KVM's entry flags.
    pub flags: u32,
    /// The registers.
    pub regs: [u32; 4],
}

/// The host's supported CPUID as plain entries.
pub fn supported_cpuid_entries(kvm: &Kvm) -> Result<Vec<CpuidEntry>, CpuError> {
    Ok(supported_cpuid(kvm)?
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            regs: [e.eax, e.ebx, e.ecx, e.edx],
        })
        .collect())
}

/// Uses `entries` (from [`supported_cpuid_entries`] in the supervisor) as this process's
/// supported CPUID. Refuses more entries than KVM has; a process that already has its own
/// keeps it.
pub fn preset_supported_cpuid(entries: &[CpuidEntry]) -> Result<(), String> {
    if entries.is_empty() || entries.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(format!("{} CPUID entries (1 to {KVM_MAX_CPUID_ENTRIES} expected)", entries.len()));
    }
    let raw: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.regs[0],
            ebx: e.regs[1],
            ecx: e.regs[2],
            edx: e.regs[3],
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&raw).map_err(|e| format!("{e:?}"))?;
    let _ = SUPPORTED.set(cpuid);
    Ok(())
}

/// A flat 4 GiB segment descriptor for KVM_SET_SREGS.
fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets CPUID (`cpuid`, from [`supported_cpuid`]), special registers, XCR0 (where KVM
/// allows) and general registers so that the vCPU starts at `entry` at CPL 3 with `rsp` and
/// `rdi = arg`.
pub fn setup(kvm: &Kvm, vcpu: &VcpuFd, cpuid: &CpuId, entry: u64, rsp: u64, arg: u64) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid).map_err(err("set the vCPU's CPUID"))?;

    let mut sregs = vcpu.get_sregs().map_err(err("read the vCPU's special registers"))?;
    const CODE_ACCESSED: u8 = 0xb;
    const DATA_ACCESSED: u8 = 0x3;
    sregs.cs = segment(USER_CS, CODE_ACCESSED, true);
    let data = segment(USER_DS, DATA_ACCESSED, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: (TSS_SIZE - 1) as u32,
        selector: TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT_SLOTS * 8 - 1) as u16;
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = (IDT_SIZE - 1) as u16;
    sregs.cr0 = CR0;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
    vcpu.set_sregs(&sregs).map_err(err("set the vCPU's special registers (CR0/CR4/EFER, segments)"))?;

    if kvm.check_extension(Cap::Xcrs) {
        // Enable what the host's XSAVE supports of what we want (CPUID.0xD.0 EAX/EDX).
        let supported = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
        let xcr0 = supported & XCR0_WANTED;
        if xcr0 & 0b11 == 0b11 {
            let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = xcr0;
            vcpu.set_xcrs(&xcrs).map_err(err("set XCR0"))?;
        }
    }

    let regs = kvm_bindings::kvm_regs { rip: entry, rsp, rdi: arg, rflags: RFLAGS, ..Default::default() };
    vcpu.set_regs(&regs).map_err(err("set the vCPU's registers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_flat_and_user_level() {
        let cs = segment(USER_CS, 0xb, true);
        assert_eq!((cs.dpl, cs.l, cs.db, cs.present, cs.s), (3, 1, 0, 1, 1));
        let ds = segment(USER_DS, 0x3, false);
        assert_eq!((ds.dpl, ds.l, ds.db), (3, 0, 1));
    }

    #[test]
    fn control_registers_enable_long_mode_paging() {
        const PG: u64 = 1 << 31;
        const PE: u64 = 1;
        const PAE: u64 = 1 << 5;
        const PCIDE: u64 = 1 << 17;
        const LMA_LME: u64 = (1 << 10) | (1 << 8);
        const NXE: u64 = 1 << 11;
        assert_eq!(CR0 & (PG | PE), PG | PE);
        assert_eq!(CR4 & PAE, PAE);
        assert_eq!(CR4 & PCIDE, 0, "PVM refuses CR4.PCIDE");
        assert_eq!(EFER & (LMA_LME | NXE), LMA_LME | NXE);
        assert_eq!((RFLAGS >> 12) & 3, 3, "IOPL 3");
    }
}

#[cfg(test)]
mod preset_tests {
    use super::*;

    #[test]
    fn a_presented_cpuid_is_bounded() {
        assert!(preset_supported_cpuid(&[]).unwrap_err().contains("0 CPUID entries"));
        let one = CpuidEntry { function: 0, index: 0, flags: 0, regs: [1, 2, 3, 4] };
        let too_many = vec![one; KVM_MAX_CPUID_ENTRIES + 1];
        assert!(preset_supported_cpuid(&too_many).unwrap_err().contains("expected"));
    }
}
