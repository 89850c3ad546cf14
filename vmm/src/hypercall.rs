//! The VMM side of hypercalls: read a request block from guest memory, validate it, act.
//!
//! Everything here reads untrusted guest memory. The block must be 8-byte aligned and lie
//! wholly inside RAM, or the guest is stopped (there is nowhere to write an answer); every
//! address and length inside it is checked against RAM, and a bad one is answered with an
//! error code while the guest goes on.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wasmvisor_abi::hypercall::{
    HYPERCALL_BLOCK_SIZE, HYPERCALL_RESULT_OFFSET, Hypercall, HypercallBlock, HypercallError,
};

use crate::console::Console;

/// What the vCPU loop does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the guest.
    Resume,
    /// The guest asked to stop with this exit code.
    Exit(u8),
    /// A `Wait` ran into the VM's deadline.
    DeadlineReached,
}

/// The guest sent a block the VMM cannot even answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sent a hypercall block at GPA {gpa:#x} that {why}")]
pub struct BadBlock {
    /// Where the guest said the block is.
    pub gpa: u64,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Decodes the little-endian bytes of a block.
fn parse_block(b: &[u8; HYPERCALL_BLOCK_SIZE]) -> HypercallBlock {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    HypercallBlock {
        op: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
        reserved: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
        args: [u64_at(8), u64_at(16), u64_at(24), u64_at(32)],
        result: u64_at(40) as i64,
    }
}

/// Serves the hypercall whose block is at `gpa`. `scratch` is reused across calls to avoid
/// allocating on the exit path.
pub fn handle(
    mem: &GuestMemoryMmap,
    gpa: u64,
    console: &mut Console,
    scratch: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Outcome, BadBlock> {
    if !gpa.is_multiple_of(8) {
        return Err(BadBlock { gpa, why: "is not 8-byte aligned" });
    }
    let mut raw = [0u8; HYPERCALL_BLOCK_SIZE];
    mem.read_slice(&mut raw, GuestAddress(gpa)).map_err(|_| BadBlock { gpa, why: "lies outside guest memory" })?;
    let (result, outcome) = match Hypercall::decode(&parse_block(&raw)) {
        Err(e) => (e.as_result(), Outcome::Resume),
        Ok(Hypercall::Exit { code }) => return Ok(Outcome::Exit(code)),
        Ok(Hypercall::ConsoleWrite { gpa: buf, len }) => {
            let len = len as usize; // at most CONSOLE_WRITE_MAX, checked by decode
            scratch.resize(len, 0);
            match mem.read_slice(scratch, GuestAddress(buf)) {
                Ok(()) => {
                    console.write(scratch);
                    (len as i64, Outcome::Resume)
                }
                Err(_) => (HypercallError::BadAddress.as_result(), Outcome::Resume),
            }
        }
        Ok(Hypercall::Wait { timeout_ns }) => {
            let now = Instant::now();
            let wake = now + Duration::from_nanos(timeout_ns);
            if wake >= deadline {
                std::thread::sleep(deadline.saturating_duration_since(now));
                return Ok(Outcome::DeadlineReached);
            }
            std::thread::sleep(wake - now);
            (0, Outcome::Resume)
        }
    };
    // The block was readable, so the result field (inside it) is writable.
    mem.write_obj(result, GuestAddress(gpa + HYPERCALL_RESULT_OFFSET))
        .map_err(|_| BadBlock { gpa, why: "lies outside guest memory" })?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;
    use wasmvisor_abi::hypercall::CONSOLE_WRITE_MAX;

    use super::*;

    const MEM: u64 = 1 << 20;

    fn setup() -> (GuestMemoryMmap, Console, Vec<u8>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        (mem, Console::new(Box::new(std::io::sink())), Vec::new())
    }

    fn put(mem: &GuestMemoryMmap, gpa: u64, call: Hypercall) {
        let b = call.encode();
        let mut raw = Vec::new();
        raw.extend_from_slice(&b.op.to_le_bytes());
        raw.extend_from_slice(&b.reserved.to_le_bytes());
        for a in b.args {
            raw.extend_from_slice(&a.to_le_bytes());
        }
        raw.extend_from_slice(&b.result.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(gpa)).unwrap();
    }

    fn result(mem: &GuestMemoryMmap, gpa: u64) -> i64 {
        mem.read_obj(GuestAddress(gpa + HYPERCALL_RESULT_OFFSET)).unwrap()
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn console_write_reaches_the_console() {
        let (mem, mut console, mut scratch) = setup();
        mem.write_slice(b"hello\n", GuestAddress(0x2000)).unwrap();
        put(&mem, 0x1000, Hypercall::ConsoleWrite { gpa: 0x2000, len: 6 });
        assert_eq!(handle(&mem, 0x1000, &mut console, &mut scratch, far()), Ok(Outcome::Resume));
        assert_eq!(result(&mem, 0x1000), 6);
        assert_eq!(console.tail(), ["hello"]);
    }

    #[test]
    fn buffers_outside_memory_are_refused() {
        let (mem, mut console, mut scratch) = setup();
        for (gpa, len) in [(MEM - 4, 8), (MEM, 1), (u64::MAX - 2, 8), (0, CONSOLE_WRITE_MAX + 1)] {
            put(&mem, 0x1000, Hypercall::ConsoleWrite { gpa, len });
            // An over-long write is rejected by decode; encode does not check.
            let want = if len > CONSOLE_WRITE_MAX { HypercallError::TooLong } else { HypercallError::BadAddress };
            assert_eq!(handle(&mem, 0x1000, &mut console, &mut scratch, far()), Ok(Outcome::Resume));
            assert_eq!(result(&mem, 0x1000), want.as_result(), "{gpa:#x}+{len}");
        }
        assert_eq!(console.bytes(), 0);
    }

    #[test]
    fn blocks_outside_memory_or_misaligned_stop_the_guest() {
        let (mem, mut console, mut scratch) = setup();
        for (gpa, why) in [
            (MEM, "lies outside guest memory"),
            (MEM - 8, "lies outside guest memory"),
            (u64::MAX - 7, "lies outside guest memory"),
            (0x1004, "is not 8-byte aligned"),
        ] {
            assert_eq!(handle(&mem, gpa, &mut console, &mut scratch, far()), Err(BadBlock { gpa, why }));
        }
    }

    #[test]
    fn unknown_ops_get_an_error_and_exit_stops() {
        let (mem, mut console, mut scratch) = setup();
        mem.write_obj(0xdead_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(handle(&mem, 0x1000, &mut console, &mut scratch, far()), Ok(Outcome::Resume));
        assert_eq!(result(&mem, 0x1000), HypercallError::UnknownOp.as_result());
        put(&mem, 0x1000, Hypercall::Exit { code: 42 });
        assert_eq!(handle(&mem, 0x1000, &mut console, &mut scratch, far()), Ok(Outcome::Exit(42)));
    }

    #[test]
    fn wait_sleeps_and_respects_the_deadline() {
        let (mem, mut console, mut scratch) = setup();
        put(&mem, 0x1000, Hypercall::Wait { timeout_ns: 20_000_000 });
        let t = Instant::now();
        assert_eq!(handle(&mem, 0x1000, &mut console, &mut scratch, far()), Ok(Outcome::Resume));
        assert!(t.elapsed() >= Duration::from_millis(20));
        put(&mem, 0x1000, Hypercall::Wait { timeout_ns: 10_000_000_000 });
        let t = Instant::now();
        let deadline = t + Duration::from_millis(30);
        assert_eq!(handle(&mem, 0x1000, &mut console, &mut scratch, deadline), Ok(Outcome::DeadlineReached));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
