//! CPU exceptions: what the VMM-installed CPL 0 stubs report.
//!
//! Every IDT gate points at a tiny stub in [`crate::layout::EXCEPTION_STUBS_GPA`]. The CPU
//! switches to the exception stack (TSS RSP0) and pushes its frame; the stub pushes an error
//! code of zero where the CPU pushes none, then the vector, and writes to
//! [`crate::layout::FAULT_PORT`]. At that exit the stack pointer points at an
//! [`ExceptionFrame`]; CR2 is read from the vCPU's special registers.

/// The stack contents at the fault-port exit, lowest address first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Exception vector (0..32).
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    /// Faulting (or next, for traps) instruction pointer.
    pub rip: u64,
    /// Code segment at the fault.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Stack segment at the fault.
    pub ss: u64,
}

/// Size of [`ExceptionFrame`] in bytes.
pub const EXCEPTION_FRAME_SIZE: usize = 56;
const _: () = assert!(core::mem::size_of::<ExceptionFrame>() == EXCEPTION_FRAME_SIZE);

/// Whether the CPU pushes an error code for `vector`.
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// Mnemonic and name of an exception vector, e.g. `("#PF", "page fault")`.
pub const fn exception_name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection fault"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection"),
        28 => ("#HV", "hypervisor injection"),
        29 => ("#VC", "VMM communication"),
        30 => ("#SX", "security exception"),
        _ => ("#??", "reserved vector"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_error_codes() {
        assert_eq!(exception_name(14), ("#PF", "page fault"));
        assert_eq!(exception_name(200).0, "#??");
        assert!(has_error_code(14) && has_error_code(13) && has_error_code(8));
        assert!(!has_error_code(6) && !has_error_code(0) && !has_error_code(3));
    }
}
