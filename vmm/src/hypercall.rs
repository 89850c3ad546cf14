//! The VMM side of hypercalls: read a request block from guest memory, validate it, act.
//!
//! Everything here reads untrusted guest memory. The block must be 8-byte aligned and lie
//! wholly inside RAM, or the guest is stopped (there is nowhere to write an answer); every
//! address and length inside it is checked against RAM, and a bad one is answered with an
//! error code while the guest goes on.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use wasmvisor_abi::cpu::{CPU_REPORT_SIZE, CpuReport};
use wasmvisor_abi::hypercall::{
    HYPERCALL_BLOCK_SIZE, HYPERCALL_RESULT_OFFSET, Hypercall, HypercallBlock, HypercallError, StdStream,
};

use crate::console::Console;

/// Where the guest's console and the tenant's standard streams go.
pub struct GuestIo {
    /// The guest kernel's console (log, panics, UART).
    pub console: Console,
    /// The tenant's stdout.
    pub stdout: Box<dyn Write + Send>,
    /// The tenant's stderr.
    pub stderr: Box<dyn Write + Send>,
    /// The tenant's stdin.
    pub stdin: Box<dyn Read + Send>,
}

impl GuestIo {
    /// Console to `console`; the tenant's streams are the process's own.
    pub fn inherit(console: Box<dyn Write + Send>) -> Self {
        Self {
            console: Console::new(console),
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
            stdin: Box::new(std::io::stdin()),
        }
    }

    /// Everything captured or discarded: console and stdout/stderr to the given writers, no
    /// stdin (tests, benchmarks).
    pub fn captured(
        console: Box<dyn Write + Send>,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
    ) -> Self {
        Self { console: Console::new(console), stdout, stderr, stdin: Box::new(std::io::empty()) }
    }
}

/// What a hypercall may use besides guest memory.
pub struct Context<'a> {
    /// The streams.
    pub io: &'a mut GuestIo,
    /// A buffer reused across calls, to avoid allocating on the exit path.
    pub scratch: &'a mut Vec<u8>,
    /// The VM's time limit.
    pub deadline: Instant,
    /// Set when the watchdog wants the vCPU back.
    pub kick: &'a AtomicBool,
    /// What `WaitDevice` sleeps on, when the VM has a vsock device.
    pub device_wake: Option<&'a crate::devices::virtio::DeviceWake>,
    /// The VM was pre-booted and has not been launched yet: `AwaitLaunch` is allowed (once).
    pub awaiting_launch: bool,
    /// The VM snapshots its guest at `Ready` (once): the call is allowed.
    pub snapshot_point: bool,
}

/// What the vCPU loop does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the guest.
    Resume,
    /// The guest asked to stop with this exit code.
    Exit(u8),
    /// A `Wait` ran into the VM's deadline.
    DeadlineReached,
    /// The guest could not load the component artifact, for this reason.
    ArtifactRejected(String),
    /// The guest sent its CPU feature report (answered; the guest goes on to exit).
    CpuReport(CpuReport),
    /// The component ran out of memory (the guest goes on to exit): the size it wanted.
    OutOfMemory(u64),
    /// A pre-booted guest waits for its launch (answered 0 already; the vCPU blocks until the
    /// launch has rewritten BootInfo).
    AwaitLaunch,
    /// The guest's component is ready, at the block at this address (answered 0 already): the
    /// vCPU snapshots the VM here.
    Ready(u64),
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

/// Copies `len` bytes at guest-physical `gpa` into `scratch`; `BadAddress` unless all of it is RAM.
fn read_guest<'s>(
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: u64,
    scratch: &'s mut Vec<u8>,
) -> Result<&'s [u8], HypercallError> {
    let len = usize::try_from(len).map_err(|_| HypercallError::BadAddress)?;
    scratch.resize(len, 0);
    mem.read_slice(scratch, GuestAddress(gpa)).map_err(|_| HypercallError::BadAddress)?;
    Ok(scratch)
}

/// Writes a buffer from guest memory to one of the tenant's output streams.
fn std_write(mem: &GuestMemoryMmap, ctx: &mut Context<'_>, stream: StdStream, gpa: u64, len: u64) -> i64 {
    let bytes = match read_guest(mem, gpa, len, ctx.scratch) {
        Ok(b) => b,
        Err(e) => return e.as_result(),
    };
    let out = match stream {
        StdStream::Stdout => &mut ctx.io.stdout,
        StdStream::Stderr => &mut ctx.io.stderr,
    };
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => bytes.len() as i64,
        Err(_) => HypercallError::Io.as_result(),
    }
}

/// Reads the tenant's stdin into guest memory. `None` when the watchdog interrupted the read.
fn std_read(mem: &GuestMemoryMmap, ctx: &mut Context<'_>, gpa: u64, len: u64) -> Option<i64> {
    // Check the whole destination before consuming any input.
    if !mem.check_range(GuestAddress(gpa), len as usize) {
        return Some(HypercallError::BadAddress.as_result());
    }
    ctx.scratch.resize(len as usize, 0);
    loop {
        match ctx.io.stdin.read(ctx.scratch) {
            Ok(n) => {
                return Some(match mem.write_slice(&ctx.scratch[..n], GuestAddress(gpa)) {
                    Ok(()) => n as i64,
                    Err(_) => HypercallError::BadAddress.as_result(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                if ctx.kick.load(Ordering::Acquire) {
                    return None;
                }
            }
            Err(_) => return Some(HypercallError::Io.as_result()),
        }
    }
}

/// Serves the hypercall whose block is at `gpa`.
pub fn handle(mem: &GuestMemoryMmap, gpa: u64, ctx: &mut Context<'_>) -> Result<Outcome, BadBlock> {
    if !gpa.is_multiple_of(8) {
        return Err(BadBlock { gpa, why: "is not 8-byte aligned" });
    }
    let mut raw = [0u8; HYPERCALL_BLOCK_SIZE];
    mem.read_slice(&mut raw, GuestAddress(gpa)).map_err(|_| BadBlock { gpa, why: "lies outside guest memory" })?;
    let (result, outcome) = match Hypercall::decode(&parse_block(&raw)) {
        Err(e) => (e.as_result(), Outcome::Resume),
        Ok(Hypercall::Exit { code }) => return Ok(Outcome::Exit(code)),
        Ok(Hypercall::ArtifactRejected { gpa: buf, len }) => {
            let why = match read_guest(mem, buf, len, ctx.scratch) {
                Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Err(_) => String::from("(the reason lies outside guest memory)"),
            };
            return Ok(Outcome::ArtifactRejected(why));
        }
        Ok(Hypercall::ConsoleWrite { gpa: buf, len }) => match read_guest(mem, buf, len, ctx.scratch) {
            Ok(bytes) => {
                ctx.io.console.write(bytes);
                (bytes.len() as i64, Outcome::Resume)
            }
            Err(e) => (e.as_result(), Outcome::Resume),
        },
        Ok(Hypercall::StdWrite { stream, gpa: buf, len }) => (std_write(mem, ctx, stream, buf, len), Outcome::Resume),
        Ok(Hypercall::StdRead { gpa: buf, len }) => match std_read(mem, ctx, buf, len) {
            Some(result) => (result, Outcome::Resume),
            None => return Ok(Outcome::DeadlineReached),
        },
        Ok(Hypercall::Wait { timeout_ns }) => {
            let now = Instant::now();
            let wake = now + Duration::from_nanos(timeout_ns);
            if wake >= ctx.deadline {
                std::thread::sleep(ctx.deadline.saturating_duration_since(now));
                return Ok(Outcome::DeadlineReached);
            }
            std::thread::sleep(wake - now);
            (0, Outcome::Resume)
        }
        Ok(Hypercall::WaitDevice { timeout_ns }) => {
            let now = Instant::now();
            let wake = (now + Duration::from_nanos(timeout_ns)).min(ctx.deadline);
            let woken = match ctx.device_wake {
                Some(device) => device.wait(wake),
                None => {
                    std::thread::sleep(wake - now);
                    false
                }
            };
            if !woken && wake >= ctx.deadline {
                return Ok(Outcome::DeadlineReached);
            }
            (i64::from(woken), Outcome::Resume)
        }
        Ok(Hypercall::Nop) => (0, Outcome::Resume),
        Ok(Hypercall::OutOfMemory { wanted }) => (0, Outcome::OutOfMemory(wanted)),
        Ok(Hypercall::AwaitLaunch) if ctx.awaiting_launch => (0, Outcome::AwaitLaunch),
        // Not a pre-booted VM, or one already launched: nothing to wait for.
        Ok(Hypercall::AwaitLaunch) => (HypercallError::BadArgument.as_result(), Outcome::Resume),
        Ok(Hypercall::Ready) if ctx.snapshot_point => (0, Outcome::Ready(gpa)),
        // Not a VM that snapshots, or one that did already.
        Ok(Hypercall::Ready) => (HypercallError::BadArgument.as_result(), Outcome::Resume),
        Ok(Hypercall::CpuReport { gpa: buf }) => {
            let mut bytes = [0u8; CPU_REPORT_SIZE];
            match mem.read_slice(&mut bytes, GuestAddress(buf)) {
                Err(_) => (HypercallError::BadAddress.as_result(), Outcome::Resume),
                Ok(()) => match CpuReport::decode(&bytes) {
                    None => (HypercallError::BadArgument.as_result(), Outcome::Resume),
                    Some(report) => (0, Outcome::CpuReport(report)),
                },
            }
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
    use wasmvisor_abi::hypercall::BUFFER_MAX;

    use super::*;

    const MEM: u64 = 1 << 20;

    struct Harness {
        mem: GuestMemoryMmap,
        io: GuestIo,
        scratch: Vec<u8>,
        kick: AtomicBool,
        deadline: Instant,
        stdout: crate::console::SharedBuffer,
        awaiting_launch: bool,
        snapshot_point: bool,
    }

    impl Harness {
        fn new() -> Self {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
            let stdout = crate::console::SharedBuffer::default();
            let io = GuestIo::captured(Box::new(std::io::sink()), Box::new(stdout.clone()), Box::new(std::io::sink()));
            let deadline = Instant::now() + Duration::from_secs(60);
            Self {
                mem,
                io,
                scratch: Vec::new(),
                kick: AtomicBool::new(false),
                deadline,
                stdout,
                awaiting_launch: false,
                snapshot_point: false,
            }
        }

        fn call(&mut self, gpa: u64) -> Result<Outcome, BadBlock> {
            let mut ctx = Context {
                io: &mut self.io,
                scratch: &mut self.scratch,
                deadline: self.deadline,
                kick: &self.kick,
                device_wake: None,
                awaiting_launch: self.awaiting_launch,
                snapshot_point: self.snapshot_point,
            };
            handle(&self.mem, gpa, &mut ctx)
        }
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

    #[test]
    fn console_and_std_writes_reach_their_streams() {
        let mut h = Harness::new();
        h.mem.write_slice(b"hello\n", GuestAddress(0x2000)).unwrap();
        put(&h.mem, 0x1000, Hypercall::ConsoleWrite { gpa: 0x2000, len: 6 });
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), 6);
        assert_eq!(h.io.console.tail(), ["hello"]);
        put(&h.mem, 0x1000, Hypercall::StdWrite { stream: StdStream::Stdout, gpa: 0x2000, len: 5 });
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), 5);
        assert_eq!(h.stdout.contents(), b"hello");
    }

    #[test]
    fn stdin_reads_land_in_guest_memory() {
        let mut h = Harness::new();
        h.io.stdin = Box::new(&b"abc"[..]);
        put(&h.mem, 0x1000, Hypercall::StdRead { gpa: 0x3000, len: 16 });
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), 3);
        let mut got = [0u8; 3];
        h.mem.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(&got, b"abc");
        // End of input reads as 0.
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), 0);
        // A destination outside RAM is refused before any input is consumed.
        h.io.stdin = Box::new(&b"xyz"[..]);
        put(&h.mem, 0x1000, Hypercall::StdRead { gpa: MEM - 2, len: 16 });
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), HypercallError::BadAddress.as_result());
        put(&h.mem, 0x1000, Hypercall::StdRead { gpa: 0x3000, len: 16 });
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), 3, "the input is still there");
    }

    #[test]
    fn only_a_pre_booted_guest_may_wait_for_its_launch() {
        let mut h = Harness::new();
        put(&h.mem, 0x1000, Hypercall::AwaitLaunch);
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), HypercallError::BadArgument.as_result());
        h.awaiting_launch = true;
        put(&h.mem, 0x1000, Hypercall::AwaitLaunch);
        assert_eq!(h.call(0x1000), Ok(Outcome::AwaitLaunch));
        assert_eq!(result(&h.mem, 0x1000), 0);
    }

    #[test]
    fn only_a_vm_that_snapshots_may_say_its_component_is_ready() {
        let mut h = Harness::new();
        put(&h.mem, 0x1000, Hypercall::Ready);
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), HypercallError::BadArgument.as_result());
        h.snapshot_point = true;
        put(&h.mem, 0x1000, Hypercall::Ready);
        assert_eq!(h.call(0x1000), Ok(Outcome::Ready(0x1000)));
        assert_eq!(result(&h.mem, 0x1000), 0);
    }

    #[test]
    fn buffers_outside_memory_are_refused() {
        let mut h = Harness::new();
        for (gpa, len) in [(MEM - 4, 8), (MEM, 1), (u64::MAX - 2, 8), (0, BUFFER_MAX + 1)] {
            for call in [
                Hypercall::ConsoleWrite { gpa, len },
                Hypercall::StdWrite { stream: StdStream::Stderr, gpa, len },
                Hypercall::StdRead { gpa, len },
            ] {
                put(&h.mem, 0x1000, call);
                // An over-long buffer is rejected by decode; encode does not check.
                let want = if len > BUFFER_MAX { HypercallError::TooLong } else { HypercallError::BadAddress };
                assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
                assert_eq!(result(&h.mem, 0x1000), want.as_result(), "{call:?}");
            }
        }
        assert_eq!(h.io.console.bytes(), 0);
        assert!(h.stdout.contents().is_empty());
    }

    #[test]
    fn blocks_outside_memory_or_misaligned_stop_the_guest() {
        let mut h = Harness::new();
        for (gpa, why) in [
            (MEM, "lies outside guest memory"),
            (MEM - 8, "lies outside guest memory"),
            (u64::MAX - 7, "lies outside guest memory"),
            (0x1004, "is not 8-byte aligned"),
        ] {
            assert_eq!(h.call(gpa), Err(BadBlock { gpa, why }));
        }
    }

    #[test]
    fn unknown_ops_get_an_error_and_exit_stops() {
        let mut h = Harness::new();
        h.mem.write_obj(0xdead_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert_eq!(result(&h.mem, 0x1000), HypercallError::UnknownOp.as_result());
        put(&h.mem, 0x1000, Hypercall::Exit { code: 42 });
        assert_eq!(h.call(0x1000), Ok(Outcome::Exit(42)));
    }

    #[test]
    fn wait_sleeps_and_respects_the_deadline() {
        let mut h = Harness::new();
        put(&h.mem, 0x1000, Hypercall::Wait { timeout_ns: 20_000_000 });
        let t = Instant::now();
        assert_eq!(h.call(0x1000), Ok(Outcome::Resume));
        assert!(t.elapsed() >= Duration::from_millis(20));
        put(&h.mem, 0x1000, Hypercall::Wait { timeout_ns: 10_000_000_000 });
        let t = Instant::now();
        h.deadline = t + Duration::from_millis(30);
        assert_eq!(h.call(0x1000), Ok(Outcome::DeadlineReached));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
