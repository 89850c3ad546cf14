//! The vCPU thread: runs `KVM_RUN` and serves every exit until the guest stops.
//!
//! Exits are the guest's only way to the VMM: a hypercall (port `HYPERCALL_PORT`), an
//! exception report from the CPL 0 stubs (port `FAULT_PORT`), the UART. Anything else is a
//! guest failure, reported with the reason and RIP. The thread confines itself with the vCPU
//! seccomp filter before its first `KVM_RUN` (see `vm::boot`, which runs it). A watchdog on
//! the launching thread kicks it out of `KVM_RUN` with a signal when the timeout passes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use wasmvisor_abi::exception::{EXCEPTION_FRAME_SIZE, ExceptionFrame, exception_name};
use wasmvisor_abi::layout::{COM1_PORT, FAULT_PORT, HYPERCALL_PORT};
use wasmvisor_abi::vsock::{VSOCK_MMIO_GPA, VSOCK_MMIO_SIZE};

use crate::devices::serial::SerialConsole;
use crate::devices::virtio::worker::VsockVcpuHandle;
use crate::hypercall::{self, GuestIo, Outcome};
use crate::seccomp;

/// Exits served, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitCounts {
    /// Hypercalls.
    pub hypercall: u64,
    /// UART register accesses.
    pub serial: u64,
    /// virtio-mmio register accesses that reached the VMM (not the ioeventfd-caught notifies).
    pub mmio: u64,
    /// Exits for the timeout kick (`EINTR`).
    pub interrupted: u64,
    /// All exits, including the final one.
    pub total: u64,
}

/// Why the guest stopped other than by asking to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureReason {
    /// A CPU exception, reported by the stubs.
    Exception {
        /// The vector.
        vector: u64,
        /// The error code (0 where the CPU pushes none).
        error_code: u64,
        /// CR2 (the faulting address for #PF).
        cr2: u64,
    },
    /// `KVM_EXIT_SHUTDOWN`: usually a triple fault (an exception that could not be delivered).
    TripleFault,
    /// The guest ran past its time limit.
    Timeout(Duration),
    /// KVM could not emulate an instruction (under PVM: SSE at CPL 0, for one).
    InternalError,
    /// KVM could not enter the guest.
    FailEntry(u64),
    /// The guest executed `hlt` (it has no interrupts to wait for).
    Halted,
    /// A port access no device serves.
    UnhandledIo {
        /// The port.
        port: u16,
        /// Access size in bytes.
        size: usize,
        /// Write (`out`) or read (`in`).
        write: bool,
    },
    /// An MMIO access no device serves.
    UnhandledMmio {
        /// The guest-physical address.
        addr: u64,
        /// Write or read.
        write: bool,
    },
    /// A hypercall the VMM could not even answer.
    BadHypercall(hypercall::BadBlock),
    /// A write to the fault port that did not come from the exception stubs.
    ForgedFault,
    /// An exception report whose frame is not in guest memory.
    UnreadableFaultFrame {
        /// The stack pointer at the report.
        rsp: u64,
    },
    /// The guest could not load the component artifact (stale or corrupt cache entry, or CPU
    /// features the artifact needs and this CPU lacks).
    ArtifactRejected(String),
    /// `KVM_RUN` itself failed.
    RunFailed(String),
    /// Any other exit.
    UnexpectedExit(String),
}

impl FailureReason {
    /// Whether the failure is the time limit (the CLI gives it its own exit code).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }

    /// Whether the guest refused the component artifact (a failure to start, not a crash).
    pub fn is_artifact_rejected(&self) -> bool {
        matches!(self, Self::ArtifactRejected(_))
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exception { vector, error_code, cr2 } => {
                let (mnemonic, name) = exception_name(*vector);
                write!(f, "CPU exception {mnemonic} ({name}, vector {vector}), error code {error_code:#x}")?;
                if *vector == 14 {
                    write!(f, ", CR2 {cr2:#x}")?;
                }
                Ok(())
            }
            Self::TripleFault => f.write_str("triple fault (KVM_EXIT_SHUTDOWN): an exception could not be delivered"),
            Self::Timeout(d) => write!(f, "timed out after {:.3} s", d.as_secs_f64()),
            Self::InternalError => f.write_str("KVM internal error (instruction emulation failed)"),
            Self::FailEntry(reason) => write!(f, "KVM could not enter the guest (entry failure reason {reason:#x})"),
            Self::Halted => f.write_str("halted (hlt with nothing to wake it)"),
            Self::UnhandledIo { port, size, write } => {
                let dir = if *write { "write to" } else { "read from" };
                write!(f, "{size}-byte port {dir} {port:#x}, which no device serves")
            }
            Self::UnhandledMmio { addr, write } => {
                let dir = if *write { "write to" } else { "read from" };
                write!(f, "MMIO {dir} {addr:#x}, which no device serves")
            }
            Self::BadHypercall(bad) => bad.fmt(f),
            Self::ForgedFault => f.write_str("wrote to the exception-report port from CPL 3"),
            Self::UnreadableFaultFrame { rsp } => {
                write!(f, "reported a CPU exception with its frame at {rsp:#x}, outside guest memory")
            }
            Self::ArtifactRejected(why) => write!(f, "rejected the component artifact: {why}"),
            Self::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
            Self::UnexpectedExit(what) => write!(f, "unexpected KVM exit: {what}"),
        }
    }
}

/// How the guest stopped, as seen from the vCPU thread.
#[derive(Debug)]
pub struct VcpuOutcome {
    /// `Ok(exit code)` or the failure and the guest's RIP at it (if it could be read).
    pub result: Result<u8, (FailureReason, Option<u64>)>,
    /// Exits served.
    pub exits: ExitCounts,
    /// The last console lines.
    pub console_tail: Vec<String>,
    /// Bytes the guest wrote to its console.
    pub console_bytes: u64,
    /// The CPU feature report the guest sent, if it sent one (the last one counts).
    pub cpu_report: Option<wasmvisor_abi::cpu::CpuReport>,
    /// The guest said its component ran out of memory, wanting this many bytes (0: unknown).
    pub out_of_memory: Option<u64>,
    /// A snapshot was asked for: the RAM bytes it holds, or why it could not be made (the guest
    /// went on either way).
    pub snapshot: Option<Result<u64, String>>,
}

/// What the vCPU thread owns while the guest runs.
pub struct VcpuRunner {
    /// The vCPU, set up and ready to run.
    pub vcpu: VcpuFd,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The guest's console and the tenant's streams.
    pub io: GuestIo,
    /// The time limit.
    pub deadline: Instant,
    /// When the guest started (for the timeout message).
    pub started: Instant,
    /// Set by the watchdog before it kicks the thread out of `KVM_RUN`.
    pub kick: Arc<AtomicBool>,
    /// The vsock device's registers and wake-up, if the VM has one.
    pub vsock: Option<VsockVcpuHandle>,
    /// A pre-booted VM: where its launch comes from, once the guest waits for it.
    pub launch: Option<LaunchWait>,
    /// Snapshot the VM when the guest says its component is ready (`Ready`).
    pub snapshot: Option<SnapshotSink>,
}

/// Where a VM's snapshot goes, and what it is of.
pub struct SnapshotSink {
    /// The file, opened for writing and sized by the VMM.
    pub file: std::fs::File,
    /// Its path, for messages.
    pub path: std::path::PathBuf,
    /// What it is of.
    pub identity: crate::snapshot::Identity,
    /// Stop the VM once it is written (exit 0): nothing but the snapshot was wanted.
    pub stop: bool,
}

/// A pre-booted VM's side of its launch: the vCPU thread says when the guest waits
/// (`AwaitLaunch`), then blocks until the launching thread has written the launch's BootInfo
/// (and mapped its artifact and device) and sends the rest.
pub struct LaunchWait {
    /// Told once the guest waits for its launch.
    pub ready: std::sync::mpsc::SyncSender<()>,
    /// The launch; closed if the VM is discarded unlaunched.
    pub launch: std::sync::mpsc::Receiver<Launch>,
}

/// What a pre-booted VM's vCPU thread takes on at its launch (its vsock device it has had since
/// the pre-boot).
pub struct Launch {
    /// The launch's time limit.
    pub deadline: Instant,
    /// When the launch started.
    pub started: Instant,
    /// The launch starts from a snapshot (its RAM and device are in place): the vCPU state to
    /// take before the guest resumes.
    pub restore: Option<crate::snapshot::VcpuRestore>,
    /// The launch makes a snapshot.
    pub snapshot: Option<SnapshotSink>,
}

/// Signal the watchdog sends to kick a vCPU out of `KVM_RUN` (an offset from SIGRTMIN).
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// Installs the no-op handler for the kick signal (once per process); without a handler the
/// signal would kill the process, with one `KVM_RUN` returns `EINTR`.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> = std::sync::OnceLock::new();
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    *ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET, on_kick)
    })
}

impl VcpuRunner {
    /// Runs the guest to its end on a thread that `confined` says is (or failed to be)
    /// confined to the vCPU role; an unconfined thread never enters the guest. Returns the
    /// vCPU for teardown.
    pub fn run(mut self, confined: Result<(), seccomp::SeccompError>) -> (VcpuOutcome, VcpuFd) {
        let mut exits = ExitCounts::default();
        let mut serial = SerialConsole::new();
        let mut cpu_report = None;
        let mut out_of_memory = None;
        let mut snapshot = None;
        let asked = self.snapshot.is_some();
        let result = match confined {
            Err(e) => Err((FailureReason::RunFailed(e.to_string()), None)),
            Ok(()) => self.run_loop(&mut exits, &mut serial, &mut cpu_report, &mut out_of_memory, &mut snapshot),
        };
        if asked && snapshot.is_none() {
            snapshot = Some(Err("the guest stopped before its component was ready".into()));
        }
        serial.flush(&mut self.io.console);
        let outcome = VcpuOutcome {
            result,
            exits,
            console_tail: self.io.console.tail(),
            console_bytes: self.io.console.bytes(),
            cpu_report,
            out_of_memory,
            snapshot,
        };
        (outcome, self.vcpu)
    }

    fn rip(&self) -> Option<u64> {
        self.vcpu.get_regs().ok().map(|r| r.rip)
    }

    fn fail(&self, reason: FailureReason) -> Result<u8, (FailureReason, Option<u64>)> {
        Err((reason, self.rip()))
    }

    fn run_loop(
        &mut self,
        exits: &mut ExitCounts,
        serial: &mut SerialConsole,
        cpu_report: &mut Option<wasmvisor_abi::cpu::CpuReport>,
        out_of_memory: &mut Option<u64>,
        snapshot: &mut Option<Result<u64, String>>,
    ) -> Result<u8, (FailureReason, Option<u64>)> {
        let mut scratch = Vec::with_capacity(4096);
        loop {
            if self.kick.load(Ordering::Acquire) {
                return self.fail(FailureReason::Timeout(self.started.elapsed()));
            }
            exits.total += 1;
            // Copy what the exit says out of the kvm_run page, so that the vCPU can be used
            // (register reads) while it is served.
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut(port, data.len(), le_u32(data)),
                Ok(VcpuExit::IoIn(port, data)) => {
                    if let Some(offset) = port.checked_sub(COM1_PORT).filter(|o| *o < 8) {
                        exits.serial += 1;
                        let value = serial.read(offset as u8);
                        data.fill(0);
                        data[0] = value;
                        continue;
                    }
                    Exit::IoIn(port, data.len())
                }
                Ok(VcpuExit::MmioRead(addr, data)) => match (&self.vsock, vsock_offset(addr, data.len())) {
                    (Some(dev), Some(offset)) => {
                        exits.mmio += 1;
                        dev.read(offset, data);
                        continue;
                    }
                    _ => Exit::Mmio(addr, false),
                },
                Ok(VcpuExit::MmioWrite(addr, data)) => match (&self.vsock, vsock_offset(addr, data.len())) {
                    (Some(dev), Some(offset)) => {
                        exits.mmio += 1;
                        dev.write(offset, data);
                        continue;
                    }
                    _ => Exit::Mmio(addr, true),
                },
                Ok(VcpuExit::Shutdown) => Exit::Shutdown,
                Ok(VcpuExit::Hlt) => Exit::Hlt,
                Ok(VcpuExit::InternalError) => Exit::InternalError,
                Ok(VcpuExit::FailEntry(reason, _)) => Exit::FailEntry(reason),
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    exits.interrupted += 1;
                    continue;
                }
                Err(e) => Exit::RunError(e.to_string()),
            };
            match exit {
                Exit::IoOut(HYPERCALL_PORT, 4, gpa) => {
                    exits.hypercall += 1;
                    let mut ctx = hypercall::Context {
                        io: &mut self.io,
                        scratch: &mut scratch,
                        deadline: self.deadline,
                        kick: &self.kick,
                        device_wake: self.vsock.as_ref().map(|v| &*v.wake),
                        awaiting_launch: self.launch.is_some(),
                        snapshot_point: self.snapshot.is_some(),
                    };
                    match hypercall::handle(&self.mem, u64::from(gpa), &mut ctx) {
                        Ok(Outcome::Resume) => {}
                        Ok(Outcome::CpuReport(report)) => *cpu_report = Some(report),
                        Ok(Outcome::OutOfMemory(wanted)) => *out_of_memory = Some(wanted),
                        Ok(Outcome::AwaitLaunch) => self.await_launch()?,
                        Ok(Outcome::Ready(block)) => {
                            let stop = self.snapshot.as_ref().is_some_and(|s| s.stop);
                            let made = self.take_snapshot(block);
                            if let Err(why) = &made {
                                tracing::warn!(%why, "no snapshot");
                            }
                            let failed = made.as_ref().err().cloned();
                            *snapshot = Some(made);
                            match failed {
                                None if stop => return Ok(0),
                                Some(why) if stop => return Err((FailureReason::RunFailed(why), None)),
                                _ => {}
                            }
                        }
                        Ok(Outcome::Exit(code)) => return Ok(code),
                        Ok(Outcome::ArtifactRejected(why)) => return Err((FailureReason::ArtifactRejected(why), None)),
                        Ok(Outcome::DeadlineReached) => {
                            return self.fail(FailureReason::Timeout(self.started.elapsed()));
                        }
                        Err(bad) => return self.fail(FailureReason::BadHypercall(bad)),
                    }
                }
                Exit::IoOut(FAULT_PORT, _, _) => return Err(self.exception_report()),
                Exit::IoOut(port, 1, value) if (COM1_PORT..COM1_PORT + 8).contains(&port) => {
                    exits.serial += 1;
                    serial.write((port - COM1_PORT) as u8, value as u8, &mut self.io.console);
                }
                Exit::IoOut(port, size, _) => {
                    return self.fail(FailureReason::UnhandledIo { port, size, write: true });
                }
                Exit::IoIn(port, size) => {
                    return self.fail(FailureReason::UnhandledIo { port, size, write: false });
                }
                Exit::Mmio(addr, write) => {
                    return self.fail(FailureReason::UnhandledMmio { addr, write });
                }
                Exit::Shutdown => return self.fail(FailureReason::TripleFault),
                Exit::Hlt => return self.fail(FailureReason::Halted),
                Exit::InternalError => return self.fail(FailureReason::InternalError),
                Exit::FailEntry(reason) => return self.fail(FailureReason::FailEntry(reason)),
                Exit::Other(what) => return self.fail(FailureReason::UnexpectedExit(what)),
                Exit::RunError(e) => return self.fail(FailureReason::RunFailed(e)),
            }
        }
    }

    /// Blocks a pre-booted guest until its launch, then takes the launch on and confines this
    /// thread (it ran only the guest's own boot so far, which reads nothing from a tenant).
    fn await_launch(&mut self) -> Result<(), (FailureReason, Option<u64>)> {
        let Some(wait) = self.launch.take() else { return Ok(()) };
        // The launch may change this process's uid (a jailed child takes its tenant's): the
        // bounding set is per thread, and only while root may this thread drop from it, so it
        // goes now (an unprivileged VMM is refused, and has nothing to drop).
        let _ = crate::jail::drop_bounding_set();
        let _ = wait.ready.send(());
        let Ok(launch) = wait.launch.recv() else {
            return Err((FailureReason::RunFailed("the pre-booted VM was discarded before its launch".into()), None));
        };
        if let Some(state) = &launch.restore {
            // The guest's RAM is the snapshot's now: it resumes where the snapshot was taken.
            // KVM completes the wait's port write at the next KVM_RUN first, which with
            // `immediate_exit` returns at once.
            self.vcpu.set_kvm_immediate_exit(1);
            let completed = self.vcpu.run().map(|_| ());
            self.vcpu.set_kvm_immediate_exit(0);
            if let Some(e) = completed.err().filter(|e| e.errno() != libc::EINTR) {
                return Err((
                    FailureReason::RunFailed(format!("cannot complete the wait before the restore: {e}")),
                    None,
                ));
            }
            state.apply(&self.vcpu).map_err(|e| (FailureReason::RunFailed(e.to_string()), None))?;
        }
        self.snapshot = launch.snapshot;
        seccomp::apply(seccomp::ThreadRole::Vcpu).map_err(|e| (FailureReason::RunFailed(e.to_string()), None))?;
        self.deadline = launch.deadline;
        self.started = launch.started;
        Ok(())
    }

    /// Snapshots the VM, stopped at the guest's `Ready` hypercall whose block is at `block`
    /// (answered 0 already, which the guest goes on with): vCPU state past the hypercall, the
    /// device, and RAM, in which the block's answer reads `READY_RESTORED` for the restored VM.
    fn take_snapshot(&mut self, block: u64) -> Result<u64, String> {
        use wasmvisor_abi::hypercall::{HYPERCALL_RESULT_OFFSET, READY_RESTORED};
        let sink = self.snapshot.take().ok_or("no snapshot was asked for")?;
        fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
            move |e| format!("cannot read the vCPU's {what}: {e}")
        }
        // KVM completes a port write (moves RIP past the `out`) at the next KVM_RUN, which with
        // `immediate_exit` set returns at once without running the guest.
        self.vcpu.set_kvm_immediate_exit(1);
        let completed = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("cannot complete the hypercall: {e}")),
            Ok(exit) => Err(format!("the guest ran while its hypercall was completed: {exit:?}")),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        completed?;
        let regs = self.vcpu.get_regs().map_err(kvm("registers"))?;
        // The instruction before RIP must be the hypercall's `out dx, eax` (0xef).
        let before = self.mem.read_obj::<u8>(GuestAddress(regs.rip.wrapping_sub(1)));
        if before.ok() != Some(0xef) {
            return Err(format!("RIP {:#x} is not past the hypercall", regs.rip));
        }
        let sregs = self.vcpu.get_sregs().map_err(kvm("special registers"))?;
        let xsave = self.vcpu.get_xsave().map_err(kvm("XSAVE state"))?;
        let device = self.vsock.as_ref().map(VsockVcpuHandle::save).transpose()?;
        let state = crate::snapshot::VcpuState { regs, fs_base: sregs.fs.base, gs_base: sregs.gs.base, xsave };
        let answer = GuestAddress(block + HYPERCALL_RESULT_OFFSET);
        self.mem.write_obj(READY_RESTORED as i64, answer).map_err(|e| e.to_string())?;
        let written = crate::snapshot::write(&sink.file, &sink.path, sink.identity, &state, device, &self.mem);
        self.mem.write_obj(0i64, answer).map_err(|e| e.to_string())?;
        written.map_err(|e| e.to_string())
    }

    /// Reads the frame the exception stubs left at RSP, and CR2.
    fn exception_report(&self) -> (FailureReason, Option<u64>) {
        let (Ok(regs), Ok(sregs)) = (self.vcpu.get_regs(), self.vcpu.get_sregs()) else {
            return (FailureReason::RunFailed("cannot read the registers of a faulting vCPU".into()), None);
        };
        if sregs.cs.selector & 3 != 0 {
            return (FailureReason::ForgedFault, Some(regs.rip));
        }
        let mut raw = [0u8; EXCEPTION_FRAME_SIZE];
        if self.mem.read_slice(&mut raw, GuestAddress(regs.rsp)).is_err() {
            return (FailureReason::UnreadableFaultFrame { rsp: regs.rsp }, Some(regs.rip));
        }
        let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let frame = ExceptionFrame {
            vector: word(0),
            error_code: word(1),
            rip: word(2),
            cs: word(3),
            rflags: word(4),
            rsp: word(5),
            ss: word(6),
        };
        tracing::debug!(?frame, cr2 = sregs.cr2, "exception report");
        let reason = FailureReason::Exception { vector: frame.vector, error_code: frame.error_code, cr2: sregs.cr2 };
        (reason, Some(frame.rip))
    }
}

/// An exit, copied out of the kvm_run page.
enum Exit {
    IoOut(u16, usize, u32),
    IoIn(u16, usize),
    Mmio(u64, bool),
    Shutdown,
    Hlt,
    InternalError,
    FailEntry(u64),
    Other(String),
    RunError(String),
}

/// The offset in the vsock register page of an access of `len` bytes at `addr`, if it lies
/// wholly inside it.
fn vsock_offset(addr: u64, len: usize) -> Option<u64> {
    let offset = addr.checked_sub(VSOCK_MMIO_GPA)?;
    (offset.checked_add(len as u64)? <= VSOCK_MMIO_SIZE).then_some(offset)
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_well() {
        let pf = FailureReason::Exception { vector: 14, error_code: 4, cr2: 0xdead };
        assert_eq!(pf.to_string(), "CPU exception #PF (page fault, vector 14), error code 0x4, CR2 0xdead");
        let ud = FailureReason::Exception { vector: 6, error_code: 0, cr2: 0 };
        assert_eq!(ud.to_string(), "CPU exception #UD (invalid opcode, vector 6), error code 0x0");
        assert!(FailureReason::Timeout(Duration::from_millis(1500)).to_string().contains("1.500 s"));
        assert!(FailureReason::Timeout(Duration::ZERO).is_timeout());
        let io = FailureReason::UnhandledIo { port: 0x80, size: 1, write: true };
        assert_eq!(io.to_string(), "1-byte port write to 0x80, which no device serves");
    }

    #[test]
    fn le_u32_pads_short_data() {
        assert_eq!(le_u32(&[1, 2]), 0x0201);
        assert_eq!(le_u32(&[1, 2, 3, 4, 5]), 0x0403_0201);
    }
}
