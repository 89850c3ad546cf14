//! Hypercalls: how the guest asks the VMM for something, one exit per request.
//!
//! The guest fills a [`HypercallBlock`] in its own memory and executes `out dx, eax` with
//! `dx = HYPERCALL_PORT` and `eax` = the block's guest-physical address. The VMM decodes the
//! block with [`Hypercall::decode`], validates every address and length against guest memory,
//! performs the request and writes the outcome into `result` (a non-negative value, or the
//! negated [`HypercallError`]) before resuming the guest. `Exit` never returns.

/// The request block, 8-byte aligned in guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallBlock {
    /// An [`Op`] as `u32`.
    pub op: u32,
    /// Zero.
    pub reserved: u32,
    /// Operation-specific arguments.
    pub args: [u64; 4],
    /// Written by the VMM: `>= 0` on success, `-(HypercallError as i64)` on failure.
    pub result: i64,
}

/// Size of [`HypercallBlock`] in bytes.
pub const HYPERCALL_BLOCK_SIZE: usize = 48;
/// Byte offset of [`HypercallBlock::result`], where the VMM writes the outcome.
pub const HYPERCALL_RESULT_OFFSET: u64 = 40;
const _: () = assert!(core::mem::size_of::<HypercallBlock>() == HYPERCALL_BLOCK_SIZE);
const _: () = assert!(core::mem::offset_of!(HypercallBlock, result) as u64 == HYPERCALL_RESULT_OFFSET);

/// Largest buffer one `ConsoleWrite`, `StdWrite` or `StdRead` may carry; the guest splits
/// longer transfers.
pub const BUFFER_MAX: u64 = 64 * 1024;
/// Longest single `Wait` the VMM honours; longer waits are cut to this and return early.
pub const WAIT_MAX_NS: u64 = 10_000_000_000;

/// Operation codes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `args[1]` bytes at guest-physical `args[0]` to the console.
    ConsoleWrite = 1,
    /// Stop the VM with exit code `args[0]` (0..=255).
    Exit = 2,
    /// Sleep for `args[0]` nanoseconds (capped at [`WAIT_MAX_NS`]).
    Wait = 3,
    /// Write `args[2]` bytes at guest-physical `args[1]` to the tenant's stdout (`args[0]` = 1)
    /// or stderr (`args[0]` = 2).
    StdWrite = 4,
    /// Read up to `args[1]` bytes of the tenant's stdin into guest-physical `args[0]`; blocks
    /// until at least one byte or end of input (result 0).
    StdRead = 5,
    /// Stop the VM because the component artifact was rejected at load (`args[0]` = the
    /// message's guest-physical address, `args[1]` its length, at most [`BUFFER_MAX`]): the
    /// host may recompile it rather than report a failure.
    ArtifactRejected = 6,
    /// Sleep until the vsock device has used buffers the guest may not have seen yet, or for
    /// `args[0]` nanoseconds (capped at [`WAIT_MAX_NS`]), whichever comes first. Result 1 when
    /// the device woke it, 0 on timeout. The guest polls its used rings before it sleeps.
    WaitDevice = 7,
    /// Do nothing: one exit and back (the yardstick the benchmarks compare a round trip with).
    Nop = 8,
    /// Hand the VMM the guest's [`crate::cpu::CpuReport`]: `args[0]` = the guest-physical
    /// address of its encoding, `args[1]` = its length, exactly [`crate::cpu::CPU_REPORT_SIZE`].
    /// Sent in a feature-report boot (`BOOT_FLAG_CPU_REPORT`), before the guest exits.
    CpuReport = 9,
    /// The component ran out of memory: a linear memory could not grow to `args[0]` bytes (0
    /// if unknown) within the guest's RAM. Sent before the guest exits, so that a supervisor
    /// can say why the run failed.
    OutOfMemory = 10,
    /// Block until the VMM has handed this pre-booted VM its launch (a pooled VM, booted with
    /// `BOOT_FLAG_AWAIT_LAUNCH`): on return `BootInfo` describes the launch (component, strings,
    /// seed, clocks, flags) and the guest reads it again. Allowed once, and only in such a boot.
    AwaitLaunch = 11,
    /// The component is ready to serve (engine built, component deserialized, linked into an
    /// `InstancePre`) and nothing of a tenant's has been read yet: a VMM making a snapshot
    /// (`BOOT_FLAG_SNAPSHOT`) takes it here. Result 0: go on; 1: this VM was restored from
    /// that snapshot, and `BootInfo` now describes the launch (strings, seed, clocks), which
    /// the guest reads again. Allowed once, and only in such a boot.
    Ready = 12,
}

/// [`Op::Ready`]'s result in a VM restored from a snapshot.
pub const READY_RESTORED: u64 = 1;

impl TryFrom<u32> for Op {
    type Error = HypercallError;

    fn try_from(value: u32) -> Result<Self, HypercallError> {
        Ok(match value {
            1 => Self::ConsoleWrite,
            2 => Self::Exit,
            3 => Self::Wait,
            4 => Self::StdWrite,
            5 => Self::StdRead,
            6 => Self::ArtifactRejected,
            7 => Self::WaitDevice,
            8 => Self::Nop,
            9 => Self::CpuReport,
            10 => Self::OutOfMemory,
            11 => Self::AwaitLaunch,
            12 => Self::Ready,
            _ => return Err(HypercallError::UnknownOp),
        })
    }
}

/// Why the VMM refused a hypercall. Returned to the guest as `result = -(error as i64)`.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallError {
    /// `op` is not an [`Op`].
    UnknownOp = 1,
    /// An address or length points outside guest RAM.
    BadAddress = 2,
    /// A length exceeds the operation's limit.
    TooLong = 3,
    /// An argument is out of range or a reserved field is not zero.
    BadArgument = 4,
    /// The host side of the stream failed (for example, a closed pipe).
    Io = 5,
}

impl HypercallError {
    /// The value the VMM stores in `result`.
    pub const fn as_result(self) -> i64 {
        -(self as i64)
    }

    /// Decodes a negative `result`; `None` for success or an unknown code.
    pub fn from_result(result: i64) -> Option<Self> {
        Some(match result {
            -1 => Self::UnknownOp,
            -2 => Self::BadAddress,
            -3 => Self::TooLong,
            -4 => Self::BadArgument,
            -5 => Self::Io,
            _ => return None,
        })
    }
}

/// A decoded, range-checked request. Addresses are still unchecked against guest memory:
/// only the VMM knows its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// Write a buffer to the console.
    ConsoleWrite {
        /// Guest-physical address of the first byte.
        gpa: u64,
        /// Length in bytes, at most [`BUFFER_MAX`].
        len: u64,
    },
    /// Stop the VM.
    Exit {
        /// The tenant's exit code.
        code: u8,
    },
    /// Block the vCPU for a while.
    Wait {
        /// How long, in nanoseconds, at most [`WAIT_MAX_NS`].
        timeout_ns: u64,
    },
    /// Write a buffer to the tenant's stdout or stderr.
    StdWrite {
        /// Which stream.
        stream: StdStream,
        /// Guest-physical address of the first byte.
        gpa: u64,
        /// Length in bytes, at most [`BUFFER_MAX`].
        len: u64,
    },
    /// Read from the tenant's stdin.
    StdRead {
        /// Guest-physical address of the buffer.
        gpa: u64,
        /// Its length, at most [`BUFFER_MAX`].
        len: u64,
    },
    /// The artifact could not be loaded; stop.
    ArtifactRejected {
        /// Guest-physical address of the message.
        gpa: u64,
        /// Its length, at most [`BUFFER_MAX`].
        len: u64,
    },
    /// Block the vCPU until the vsock device has used buffers, or for a while.
    WaitDevice {
        /// How long at most, in nanoseconds, at most [`WAIT_MAX_NS`].
        timeout_ns: u64,
    },
    /// Nothing.
    Nop,
    /// The guest's CPU feature report.
    CpuReport {
        /// Guest-physical address of the encoded report.
        gpa: u64,
    },
    /// The component ran out of memory.
    OutOfMemory {
        /// The size a memory could not grow to, in bytes (0: unknown).
        wanted: u64,
    },
    /// Wait for the launch of a pre-booted VM.
    AwaitLaunch,
    /// The component is ready: the snapshot point.
    Ready,
}

/// An output stream of the tenant.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdStream {
    /// Standard output.
    Stdout = 1,
    /// Standard error.
    Stderr = 2,
}

impl Hypercall {
    /// Validates and decodes a block read from guest memory.
    pub fn decode(block: &HypercallBlock) -> Result<Self, HypercallError> {
        if block.reserved != 0 {
            return Err(HypercallError::BadArgument);
        }
        let [a0, a1, _, _] = block.args;
        match Op::try_from(block.op)? {
            Op::ConsoleWrite => {
                if a1 > BUFFER_MAX {
                    return Err(HypercallError::TooLong);
                }
                Ok(Self::ConsoleWrite { gpa: a0, len: a1 })
            }
            Op::Exit => {
                let code = u8::try_from(a0).map_err(|_| HypercallError::BadArgument)?;
                Ok(Self::Exit { code })
            }
            Op::Wait => Ok(Self::Wait { timeout_ns: a0.min(WAIT_MAX_NS) }),
            Op::StdWrite => {
                let stream = match a0 {
                    1 => StdStream::Stdout,
                    2 => StdStream::Stderr,
                    _ => return Err(HypercallError::BadArgument),
                };
                let len = block.args[2];
                if len > BUFFER_MAX {
                    return Err(HypercallError::TooLong);
                }
                Ok(Self::StdWrite { stream, gpa: a1, len })
            }
            Op::StdRead => {
                if a1 > BUFFER_MAX {
                    return Err(HypercallError::TooLong);
                }
                Ok(Self::StdRead { gpa: a0, len: a1 })
            }
            Op::ArtifactRejected => {
                if a1 > BUFFER_MAX {
                    return Err(HypercallError::TooLong);
                }
                Ok(Self::ArtifactRejected { gpa: a0, len: a1 })
            }
            Op::WaitDevice => Ok(Self::WaitDevice { timeout_ns: a0.min(WAIT_MAX_NS) }),
            Op::Nop => Ok(Self::Nop),
            Op::CpuReport => {
                if a1 != crate::cpu::CPU_REPORT_SIZE as u64 {
                    return Err(HypercallError::BadArgument);
                }
                Ok(Self::CpuReport { gpa: a0 })
            }
            Op::OutOfMemory => Ok(Self::OutOfMemory { wanted: a0 }),
            Op::AwaitLaunch => Ok(Self::AwaitLaunch),
            Op::Ready => Ok(Self::Ready),
        }
    }

    /// The block the guest sends for this request.
    pub fn encode(&self) -> HypercallBlock {
        let (op, args) = match *self {
            Self::ConsoleWrite { gpa, len } => (Op::ConsoleWrite, [gpa, len, 0, 0]),
            Self::Exit { code } => (Op::Exit, [u64::from(code), 0, 0, 0]),
            Self::Wait { timeout_ns } => (Op::Wait, [timeout_ns, 0, 0, 0]),
            Self::StdWrite { stream, gpa, len } => (Op::StdWrite, [stream as u64, gpa, len, 0]),
            Self::StdRead { gpa, len } => (Op::StdRead, [gpa, len, 0, 0]),
            Self::ArtifactRejected { gpa, len } => (Op::ArtifactRejected, [gpa, len, 0, 0]),
            Self::WaitDevice { timeout_ns } => (Op::WaitDevice, [timeout_ns, 0, 0, 0]),
            Self::Nop => (Op::Nop, [0; 4]),
            Self::CpuReport { gpa } => (Op::CpuReport, [gpa, crate::cpu::CPU_REPORT_SIZE as u64, 0, 0]),
            Self::OutOfMemory { wanted } => (Op::OutOfMemory, [wanted, 0, 0, 0]),
            Self::AwaitLaunch => (Op::AwaitLaunch, [0; 4]),
            Self::Ready => (Op::Ready, [0; 4]),
        };
        HypercallBlock { op: op as u32, reserved: 0, args, result: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for call in [
            Hypercall::ConsoleWrite { gpa: 0x1234, len: BUFFER_MAX },
            Hypercall::Exit { code: 255 },
            Hypercall::Wait { timeout_ns: 5 },
            Hypercall::StdWrite { stream: StdStream::Stderr, gpa: 8, len: BUFFER_MAX },
            Hypercall::StdRead { gpa: 16, len: 1 },
            Hypercall::ArtifactRejected { gpa: 32, len: 7 },
            Hypercall::WaitDevice { timeout_ns: 9 },
            Hypercall::Nop,
            Hypercall::CpuReport { gpa: 0x2000 },
            Hypercall::OutOfMemory { wanted: 1 << 30 },
            Hypercall::AwaitLaunch,
            Hypercall::Ready,
        ] {
            assert_eq!(Hypercall::decode(&call.encode()), Ok(call));
        }
    }

    #[test]
    fn rejects_bad_blocks() {
        let mut b = Hypercall::Exit { code: 1 }.encode();
        b.op = 0;
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::UnknownOp));
        b.op = u32::MAX;
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::UnknownOp));
        let mut b = Hypercall::Exit { code: 1 }.encode();
        b.args[0] = 256;
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::BadArgument));
        let mut b = Hypercall::Exit { code: 1 }.encode();
        b.reserved = 1;
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::BadArgument));
        let b = Hypercall::ConsoleWrite { gpa: 0, len: BUFFER_MAX + 1 }.encode();
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::TooLong));
        let mut b = Hypercall::StdWrite { stream: StdStream::Stdout, gpa: 0, len: 1 }.encode();
        b.args[0] = 0;
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::BadArgument));
        let b = Hypercall::StdRead { gpa: 0, len: BUFFER_MAX + 1 }.encode();
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::TooLong));
        let mut b = Hypercall::CpuReport { gpa: 0 }.encode();
        b.args[1] -= 1;
        assert_eq!(Hypercall::decode(&b), Err(HypercallError::BadArgument));
        let b = Hypercall::Wait { timeout_ns: u64::MAX }.encode();
        assert_eq!(Hypercall::decode(&b), Ok(Hypercall::Wait { timeout_ns: WAIT_MAX_NS }));
    }

    #[test]
    fn error_codes_round_trip() {
        for e in [
            HypercallError::UnknownOp,
            HypercallError::BadAddress,
            HypercallError::TooLong,
            HypercallError::BadArgument,
            HypercallError::Io,
        ] {
            assert!(e.as_result() < 0);
            assert_eq!(HypercallError::from_result(e.as_result()), Some(e));
        }
        assert_eq!(HypercallError::from_result(0), None);
        assert_eq!(HypercallError::from_result(-99), None);
    }
}
