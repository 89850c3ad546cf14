//! The IDT and the CPL 0 exception stubs that report through the fault port.
//!
//! A guest at CPL 3 that takes an exception enters the gate's stub at CPL 0 on the exception
//! stack (TSS RSP0; IST1 for double faults). The stub makes the frame uniform (it pushes a
//! zero where the CPU pushes no error code), pushes the vector and writes to the fault port.
//! The VMM then reads the frame at RSP (see `wasmvisor_abi::exception`) and stops the VM.
//! Under PVM these stubs are emulated (~1000x slower than native), which only matters on
//! this fatal path: four instructions.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wasmvisor_abi::exception::has_error_code;
use wasmvisor_abi::layout::{EXCEPTION_STUB_SIZE, EXCEPTION_STUBS_GPA, FAULT_PORT, IDT_ENTRIES, IDT_GPA, KERNEL_CS};

use super::ArchError;

/// Size of the IDT in bytes.
pub const IDT_SIZE: u64 = IDT_ENTRIES * 16;
/// The vector whose gate switches to IST1 (double fault).
const DOUBLE_FAULT: u8 = 8;

/// Machine code of the stub for `vector`, padded with `hlt`.
pub fn stub(vector: u8) -> [u8; EXCEPTION_STUB_SIZE as usize] {
    const PUSH_IMM8: u8 = 0x6a;
    const OUT_IMM8_AL: u8 = 0xe6;
    const HLT: u8 = 0xf4;
    const JMP_REL8: u8 = 0xeb;
    let port = u8::try_from(FAULT_PORT).expect("the fault port is an 8-bit port");
    let mut code = [HLT; EXCEPTION_STUB_SIZE as usize];
    let mut at = 0;
    let mut emit = |bytes: &[u8]| {
        code[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    if !has_error_code(vector) {
        emit(&[PUSH_IMM8, 0]);
    }
    // `push imm8` sign-extends; vectors are below 32.
    emit(&[PUSH_IMM8, vector, OUT_IMM8_AL, port]);
    // The VMM never resumes a reported fault; should it, stay halted.
    emit(&[HLT, JMP_REL8, 0xfd]);
    code
}

/// The 16-byte interrupt gate for `vector`: kernel CS, DPL 0 except for `int3`/`into`
/// (DPL 3, so that a breakpoint at CPL 3 reports as #BP rather than #GP), IST1 for #DF.
pub fn gate(vector: u8) -> [u8; 16] {
    let handler = EXCEPTION_STUBS_GPA + u64::from(vector) * EXCEPTION_STUB_SIZE;
    let dpl: u8 = if matches!(vector, 3 | 4) { 3 } else { 0 };
    let ist: u8 = if vector == DOUBLE_FAULT { 1 } else { 0 };
    const PRESENT_INTERRUPT_GATE: u8 = 0x8e;
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&KERNEL_CS.to_le_bytes());
    g[4] = ist;
    g[5] = PRESENT_INTERRUPT_GATE | (dpl << 5);
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

/// Writes the IDT and the stubs.
pub fn write(mem: &GuestMemoryMmap) -> Result<(), ArchError> {
    let vectors = 0..IDT_ENTRIES as u8;
    let idt: Vec<u8> = vectors.clone().flat_map(gate).collect();
    let stubs: Vec<u8> = vectors.flat_map(stub).collect();
    let err = |what| move |source| ArchError { what, source };
    mem.write_slice(&idt, GuestAddress(IDT_GPA)).map_err(err("IDT"))?;
    mem.write_slice(&stubs, GuestAddress(EXCEPTION_STUBS_GPA)).map_err(err("exception stubs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_push_a_uniform_frame() {
        // #UD: no error code from the CPU, so the stub pushes one.
        assert_eq!(stub(6)[..9], [0x6a, 0, 0x6a, 6, 0xe6, 0xf1, 0xf4, 0xeb, 0xfd]);
        // #PF: the CPU pushed the error code.
        assert_eq!(stub(14)[..7], [0x6a, 14, 0xe6, 0xf1, 0xf4, 0xeb, 0xfd]);
    }

    #[test]
    fn gates_point_at_their_stubs() {
        let g = gate(13);
        let handler = u64::from(u16::from_le_bytes([g[0], g[1]]))
            | (u64::from(u16::from_le_bytes([g[6], g[7]])) << 16)
            | (u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32);
        assert_eq!(handler, EXCEPTION_STUBS_GPA + 13 * EXCEPTION_STUB_SIZE);
        assert_eq!(u16::from_le_bytes([g[2], g[3]]), KERNEL_CS);
        assert_eq!(g[5], 0x8e);
        assert_eq!(g[4], 0);
        assert_eq!(gate(3)[5], 0xee);
        assert_eq!(gate(8)[4], 1);
    }
}
