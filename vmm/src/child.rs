//! A VM in its own process: the VMM child mode (`wasmvisor __vmm`) and its parent's handle.
//!
//! A supervisor (the daemon) runs every VM in a child process of the same binary, as
//! Firecracker runs one process per microVM, so that a guest that crashes, spins or is killed
//! takes down only its own process. [`VmmChild::spawn`] starts `wasmvisor __vmm` with one end
//! of a `SOCK_SEQPACKET` socket pair as its fd 3 (the only descriptor it inherits besides
//! stdio, which are `/dev/null`), sends the plain-data [`VmConfig`] as one message, and then
//! reads the child's [`ChildEvent`]s: `Started`, the guest's output, and how the VM ended.
//!
//! In the child, [`serve`] arms `PR_SET_PDEATHSIG` first (a child never outlives its
//! supervisor), checks that the parent is still the one that spawned it, reads the config, and
//! boots through [`vm::boot`], whose vCPU and device threads confine themselves with seccomp
//! before they touch guest data, and whose launching thread (this one) does so before the
//! guest runs: every thread of the child is confined while the guest can act. Messages are postcard-encoded, one per datagram, at most
//! [`MAX_MESSAGE`] bytes; each side decodes what it reads with bounds checks only and refuses
//! anything else (a child cannot crash its supervisor by what it sends).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::hypercall::GuestIo;
use crate::jail::{self, JailDirs};
use crate::vcpu::ExitCounts;
use crate::vm::{self, EXIT_SETUP_FAILED, Phases, VmConfig};

/// The argument that tells a child where its jail is: `__vmm --jail ROOT RUN`.
const JAIL_ARG: &str = "--jail";

/// The descriptor the child finds its socket at.
pub const CHILD_SOCKET_FD: i32 = 3;
/// The hidden subcommand that runs the child mode.
pub const CHILD_SUBCOMMAND: &str = "__vmm";
/// Environment variable with the spawning parent's pid, for the child to check it is not
/// already orphaned.
const PARENT_PID_ENV: &str = "WASMVISOR_VMM_PARENT";
/// Largest message either side sends or accepts, in bytes (an output chunk plus its header).
pub const MAX_MESSAGE: usize = 80 * 1024;
/// Largest chunk of guest output in one [`ChildEvent::Output`].
const OUTPUT_CHUNK: usize = 64 * 1024;

/// Which stream a chunk of output belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// The tenant's stdout.
    Stdout,
    /// The tenant's stderr.
    Stderr,
    /// The guest kernel's console.
    Console,
}

/// What a parent tells its VMM child, one message each (with the files the config names, open).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Order {
    /// Boot this VM and run it to its end.
    Boot(VmConfig),
    /// Boot a VM like this one's (memory size, image, CPU mask) until its guest waits for a
    /// launch, report [`ChildEvent::PreBooted`], and wait for the `Boot` order, which launches
    /// in it if it fits (else the pre-booted VM goes and the launch boots afresh).
    PreBoot(VmConfig),
}

/// What a VMM child reports to its parent, in order: `Started`, any `Output`, then one of
/// `GuestExited` and `Exited`, or `Failed` (after a `PreBoot` order, first `PreBooted` or
/// `PreBootFailed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChildEvent {
    /// The child read its config and is building the VM.
    Started {
        /// The child's process id.
        pid: u32,
        /// The launch takes over the VM it pre-booted (else it boots one now).
        pre_booted: bool,
        /// The launch starts from a snapshot of its component's ready state.
        restored: bool,
    },
    /// Bytes the guest wrote.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes (at most 64 KiB).
        bytes: Vec<u8>,
    },
    /// The guest has exited with this code; the VM is being torn down (`Exited` follows).
    GuestExited {
        /// Its exit code.
        code: u8,
        /// Its component ran out of memory, wanting this many bytes (0: unknown).
        out_of_memory: Option<u64>,
    },
    /// The guest ran to its own exit and the VM is gone.
    Exited {
        /// Its exit code.
        code: u8,
        /// The launch's phases.
        phases: Phases,
        /// The exits served.
        exits: ExitCounts,
    },
    /// The pre-booted VM's guest waits for its launch.
    PreBooted {
        /// The pre-boot's phases.
        phases: Phases,
    },
    /// The launch's snapshot is not usable (it does not match or verify, or does not fit the
    /// pre-booted VM): the launch loads its component itself. Before `Started`.
    SnapshotRefused {
        /// Why.
        message: String,
    },
    /// The VM could not be pre-booted; a `Boot` order boots afresh.
    PreBootFailed {
        /// Why.
        message: String,
    },
    /// The VM could not be started, or the guest stopped without asking to.
    Failed {
        /// The process exit code `wasmvisor run` would give (124 timeout, 125 setup, 126 crash).
        exit_code: u8,
        /// The failure report (reason, RIP, last console lines).
        message: String,
    },
}

/// Why talking to a VMM child failed.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// Creating the socket pair or starting the process.
    #[error("cannot start the VMM child {exe}: {source}")]
    Spawn {
        /// The binary.
        exe: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket failed.
    #[error("the VMM child's socket: {0}")]
    Io(#[from] io::Error),
    /// A message that does not decode, or is too large.
    #[error("the VMM child sent a malformed message ({0})")]
    Malformed(String),
    /// The child could not pre-boot its VM.
    #[error("the VMM child could not pre-boot a VM: {0}")]
    PreBoot(String),
}

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let bytes = postcard::to_allocvec(value).map_err(|e| io::Error::other(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(io::Error::other(format!("a {} byte message exceeds {MAX_MESSAGE} bytes", bytes.len())));
    }
    Ok(bytes)
}

/// The parent's side of a running VMM child.
pub struct VmmChild {
    pid: libc::pid_t,
    status: Option<std::process::ExitStatus>,
    socket: UnixStream,
    buf: Vec<u8>,
}

impl VmmChild {
    /// Starts `exe` (the `wasmvisor` binary) in child mode and hands it `config`.
    ///
    /// With `posix_spawn(3)`, which glibc implements with `clone(CLONE_VM | CLONE_VFORK)`: a
    /// supervisor with many threads and mappings does not pay for copying its page tables (a
    /// `fork` here costs milliseconds under nested paging), and nothing runs in the child
    /// before `exec` but the file actions: stdio from `/dev/null`, the socket on fd 3.
    pub fn spawn(exe: &Path, config: &VmConfig) -> Result<Self, ChildError> {
        Self::spawn_in(exe, config, None)
    }

    /// As [`spawn`](Self::spawn), jailed when `jail` is given (see [`spawn_idle_in`](Self::spawn_idle_in)).
    pub fn spawn_in(exe: &Path, config: &VmConfig, jail: Option<&JailDirs>) -> Result<Self, ChildError> {
        let mut child = Self::spawn_idle_in(exe, jail)?;
        child.configure(config)?;
        Ok(child)
    }

    /// Starts the child process without a config: it starts up and waits on its socket, so
    /// that its process start overlaps whatever the supervisor does before it decides (commit
    /// the spec); [`configure`](Self::configure) then sends the config and the VM boots. A
    /// child dropped unconfigured is killed, having run no guest.
    pub fn spawn_idle(exe: &Path) -> Result<Self, ChildError> {
        Self::spawn_idle_in(exe, None)
    }

    /// As [`spawn_idle`](Self::spawn_idle); with `jail`, the child starts in its own
    /// namespaces ([`jail::NAMESPACES`]) and enters its jail in `dirs` before it reads its
    /// config, which then should say whom to run as ([`VmConfig::run_as`]).
    pub fn spawn_idle_in(exe: &Path, jail: Option<&JailDirs>) -> Result<Self, ChildError> {
        let spawn_err = |source| ChildError::Spawn { exe: exe.display().to_string(), source };
        let (ours, theirs) = seqpacket_pair().map_err(spawn_err)?;
        let pid = spawn_process(exe, &theirs, jail).map_err(spawn_err)?;
        drop(theirs);
        let socket = UnixStream::from(ours);
        Ok(Self { pid, status: None, socket, buf: vec![0; MAX_MESSAGE + 1] })
    }

    /// Sends the config to a child from [`spawn_idle`](Self::spawn_idle) (once), with the
    /// files it names open (the KVM device, the guest image, the artifact): a jailed child
    /// cannot open them itself. A file that does not open here is left for the child to open,
    /// and to report with the VM's own error if it cannot either.
    pub fn configure(&mut self, config: &VmConfig) -> Result<(), ChildError> {
        self.order(&Order::Boot(config.clone()), config)
    }

    /// Has a child from [`spawn_idle`](Self::spawn_idle) boot a VM like `template`'s until its
    /// guest waits for a launch, and waits for that (at most `template.timeout`): a later
    /// [`configure`](Self::configure) whose config fits it (same memory size, image and CPU
    /// settings) then launches in it, with the VM's creation and the guest's boot behind it.
    /// The child stays usable when this fails: its launch then boots afresh.
    pub fn pre_boot(&mut self, template: &VmConfig) -> Result<Phases, ChildError> {
        self.order(&Order::PreBoot(template.clone()), template)?;
        self.set_timeout(Some(template.timeout))?;
        let event = self.next_event();
        self.set_timeout(None)?;
        match event? {
            Some(ChildEvent::PreBooted { phases }) => Ok(phases),
            Some(ChildEvent::PreBootFailed { message }) => Err(ChildError::PreBoot(message)),
            Some(other) => Err(ChildError::Malformed(format!("{other:?} in answer to a pre-boot"))),
            None => Err(ChildError::PreBoot("the VMM child exited".into())),
        }
    }

    /// Sends `order` with the files `config` names, open.
    fn order(&mut self, order: &Order, config: &VmConfig) -> Result<(), ChildError> {
        let msg = encode(order)?;
        let files = match &config.files {
            Some(files) => Some(files.clone()),
            None => vm::VmFiles::open(config).ok(),
        };
        let fds: Vec<i32> = match &files {
            None => Vec::new(),
            Some(f) => [Some(&f.kvm), Some(&f.guest), f.artifact.as_ref(), f.snapshot.as_ref()]
                .into_iter()
                .flatten()
                .map(|f| f.as_raw_fd())
                .collect(),
        };
        if let Err(e) = send_with_fds(&self.socket, &msg, &fds) {
            self.kill();
            return Err(e.into());
        }
        Ok(())
    }

    /// Bounds how long [`next_event`](Self::next_event) waits (a timeout is an error).
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The next event, blocking; `None` once the child has closed its socket (it exited).
    pub fn next_event(&mut self) -> Result<Option<ChildEvent>, ChildError> {
        let n = match self.socket.read(&mut self.buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if n > MAX_MESSAGE {
            return Err(ChildError::Malformed(format!("a message over {MAX_MESSAGE} bytes")));
        }
        postcard::from_bytes(&self.buf[..n]).map(Some).map_err(|e| ChildError::Malformed(e.to_string()))
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            // SAFETY: kill(2) has no memory effects; the pid is our child, not yet reaped (so
            // not recycled).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.wait();
    }

    /// Waits for the child to exit and returns its exit status.
    pub fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(status) = self.status {
            return Ok(status);
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid writes the status into a live i32; the pid is our child.
            let rc = unsafe { libc::waitpid(self.pid, &mut raw, 0) };
            if rc == self.pid {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let status = std::process::ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok(status)
    }

    /// Whether the child still runs (it has not exited; not reaped by anyone).
    pub fn is_alive(&mut self) -> bool {
        !self.exited()
    }

    fn exited(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        if self.status.is_some() {
            return true;
        }
        let mut raw = 0;
        // SAFETY: as in `wait`, without blocking.
        let rc = unsafe { libc::waitpid(self.pid, &mut raw, libc::WNOHANG) };
        if rc == self.pid {
            self.status = Some(std::process::ExitStatus::from_raw(raw));
        }
        // An error (ECHILD) means someone else reaped it: nothing left to kill.
        rc != 0
    }
}

impl Drop for VmmChild {
    fn drop(&mut self) {
        // A handle dropped early (the supervisor gave up on it) takes its VM with it.
        if !self.exited() {
            self.kill();
        }
    }
}

/// Starts `exe __vmm` with `socket` as fd 3 and stdio on `/dev/null`; returns its pid. With
/// `jail`, in new namespaces and told where its jail is (`__vmm --jail ROOT RUN`).
fn spawn_process(exe: &Path, socket: &OwnedFd, jail: Option<&JailDirs>) -> io::Result<libc::pid_t> {
    use std::ffi::{CString, OsStr};
    use std::os::unix::ffi::OsStrExt;
    let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| io::Error::other("a NUL byte in an argument"));
    let path = cstr(exe.as_os_str())?;
    let mut args = vec![path.clone(), cstr(OsStr::new(CHILD_SUBCOMMAND))?];
    if let Some(dirs) = jail {
        args.extend([cstr(OsStr::new(JAIL_ARG))?, cstr(dirs.root.as_os_str())?, cstr(dirs.run.as_os_str())?]);
    }
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k != PARENT_PID_ENV {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env.push(CString::new(kv).map_err(|_| io::Error::other("a NUL byte in the environment"))?);
        }
    }
    env.push(CString::new(format!("{PARENT_PID_ENV}={}", std::process::id())).expect("no NUL"));
    let mut argv: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = env.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());
    // dup2 onto itself would keep FD_CLOEXEC on some libcs: give the action a different source.
    let source = if socket.as_raw_fd() == CHILD_SOCKET_FD {
        // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own (or -1).
        let fd = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD_CLOEXEC, CHILD_SOCKET_FD + 1) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    } else {
        None
    };
    let source_fd = source.as_ref().map_or(socket.as_raw_fd(), |f| f.as_raw_fd());
    if jail.is_some() {
        return clone_process(&path, &argv, &envp, source_fd);
    }
    let null = c"/dev/null";
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) };
    // SAFETY: the file actions and attributes are initialised before use and destroyed on
    // every path; argv, envp and the path are NUL-terminated arrays of live C strings that
    // outlive the call; posix_spawn writes the pid into a live variable.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut actions);
            return Err(e);
        }
        let result = (|| {
            check(libc::posix_spawn_file_actions_addopen(&mut actions, 0, null.as_ptr(), libc::O_RDONLY, 0))?;
            check(libc::posix_spawn_file_actions_addopen(&mut actions, 1, null.as_ptr(), libc::O_WRONLY, 0))?;
            check(libc::posix_spawn_file_actions_addopen(&mut actions, 2, null.as_ptr(), libc::O_WRONLY, 0))?;
            // dup2 clears FD_CLOEXEC on the copy: fd 3 is the only descriptor inherited
            // beyond stdio.
            check(libc::posix_spawn_file_actions_adddup2(&mut actions, source_fd, CHILD_SOCKET_FD))?;
            // And nothing else: not even descriptors the supervisor itself inherited without
            // close-on-exec.
            check(libc::posix_spawn_file_actions_addclosefrom_np(&mut actions, CHILD_SOCKET_FD + 1))?;
            // Signals: an empty mask and default dispositions, whatever the spawning thread had.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &empty))?;
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &all))?;
            check(libc::posix_spawnattr_setflags(
                &mut attr,
                (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
            ))?;
            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(&mut pid, path.as_ptr(), &actions, &attr, argv.as_ptr(), envp.as_ptr()))?;
            Ok(pid)
        })();
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        result
    }
}

/// What a jailed child's `clone` passes to [`cloned_child`], on the parent's memory.
struct CloneArgs {
    path: *const libc::c_char,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
    socket: libc::c_int,
    /// Set by the child when it could not `execve` (the parent is suspended meanwhile).
    errno: libc::c_int,
}

/// Starts a child in [`jail::NAMESPACES`] the way `posix_spawn` starts one (glibc's is a
/// `clone(CLONE_VM | CLONE_VFORK)` too, but takes no namespace flags): the child shares the
/// parent's memory until it calls `execve`, the parent waits for that, and in between the
/// child makes only raw system calls (its file actions and signal reset, as
/// [`spawn_process`]'s: stdio on `/dev/null`, the socket on fd 3, nothing else open, default
/// signal dispositions, an empty mask). Every signal is blocked in the calling thread meanwhile,
/// so that none of the parent's handlers runs on the child's stack.
fn clone_process(
    path: &std::ffi::CStr,
    argv: &[*mut libc::c_char],
    envp: &[*mut libc::c_char],
    socket: libc::c_int,
) -> io::Result<libc::pid_t> {
    const STACK: usize = 64 * 1024;
    let mut stack = vec![0u8; STACK];
    // The stack grows down from its end, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + STACK) & !15;
    let mut args = CloneArgs { path: path.as_ptr(), argv: argv.as_ptr(), envp: envp.as_ptr(), socket, errno: 0 };
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | jail::NAMESPACES | libc::SIGCHLD;
    // SAFETY: the signal sets are initialised before use and the old mask restored; clone runs
    // `cloned_child` on a live stack of ours with a pointer to `args`, which outlives the call
    // (CLONE_VFORK suspends this thread until the child has exec'd or exited).
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(cloned_child, top as *mut libc::c_void, flags, (&raw mut args).cast());
        let err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(err);
        }
        pid
    };
    drop(stack);
    if args.errno != 0 {
        // It could not exec and has exited; reap it.
        let mut status = 0;
        // SAFETY: waits for our own child, writing into a live i32.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(args.errno));
    }
    Ok(pid)
}

/// The cloned child, before `execve`: raw system calls only (it runs on the parent's memory
/// with the parent suspended, as after `vfork`).
extern "C" fn cloned_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the live `CloneArgs` of `clone_process`, whose thread waits for us; the
    // calls below take plain integers or pointers into it and its NUL-terminated arrays.
    unsafe {
        let args = &mut *arg.cast::<CloneArgs>();
        let fail = |args: &mut CloneArgs| -> libc::c_int {
            args.errno = *libc::__errno_location();
            if args.errno == 0 {
                args.errno = libc::EINVAL;
            }
            libc::_exit(127)
        };
        // The socket out of the way of stdio, then stdio on /dev/null and the socket on fd 3.
        let socket = libc::fcntl(args.socket, libc::F_DUPFD_CLOEXEC, 10);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if socket < 0 || null < 0 {
            return fail(args);
        }
        for fd in 0..3 {
            if libc::dup2(null, fd) < 0 {
                return fail(args);
            }
        }
        if libc::dup2(socket, CHILD_SOCKET_FD) < 0 {
            return fail(args);
        }
        libc::syscall(libc::SYS_close_range, CHILD_SOCKET_FD as libc::c_uint + 1, libc::c_uint::MAX, 0);
        // Default dispositions (what is ignored stays ignored only if it was SIG_IGN by
        // default, as with POSIX_SPAWN_SETSIGDEF over every signal), then an empty mask.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for signal in 1..libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::sigaction(signal, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(args.path, args.argv.cast(), args.envp.cast());
        fail(args)
    }
}

/// Sends one message: on a `SOCK_SEQPACKET` socket one `write` is one datagram, whole or not
/// at all. A plain write(2), not std's `sendto` with `MSG_NOSIGNAL`: the vCPU thread, which
/// sends the guest's output, may only `write` under its seccomp filter (a dead peer gives
/// `EPIPE`, since Rust binaries ignore SIGPIPE).
fn send(socket: &UnixStream, msg: &[u8]) -> io::Result<()> {
    // SAFETY: writes `msg.len()` bytes from a live slice to a descriptor `socket` owns.
    let n = unsafe { libc::write(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    match usize::try_from(n) {
        Err(_) => Err(io::Error::last_os_error()),
        Ok(n) if n == msg.len() => Ok(()),
        Ok(_) => Err(io::Error::other("a message was cut short")),
    }
}

/// Most descriptors a config message carries: the KVM device, the guest image, the artifact,
/// the snapshot.
const MAX_FDS: usize = 4;

/// Sends one message with `fds` attached (`SCM_RIGHTS`), as one datagram.
fn send_with_fds(socket: &UnixStream, msg: &[u8], fds: &[i32]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors");
    let mut iov = libc::iovec { iov_base: msg.as_ptr() as *mut libc::c_void, iov_len: msg.len() };
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: a zeroed msghdr is valid; every pointer set below points into live buffers
    // (`iov`, `control`) that outlive the sendmsg call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header with `payload` bytes of data
        // (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<i32>(), fds.len());
        }
    }
    // SAFETY: the header describes live buffers (see above); the socket is open.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
    match usize::try_from(n) {
        Err(_) => Err(io::Error::last_os_error()),
        Ok(n) if n == msg.len() => Ok(()),
        Ok(_) => Err(io::Error::other("a message was cut short")),
    }
}

/// Receives one message into `buf` and the descriptors attached to it (close-on-exec).
/// Descriptors beyond [`MAX_FDS`], or a cut-off control message, are an error (and closed).
fn recv_with_fds(socket: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<i32>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: as in `send_with_fds`: a zeroed msghdr pointing into live buffers.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space as _;
    // SAFETY: recvmsg writes at most the lengths the header gives into the buffers it names.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only
    // within it, and each SCM_RIGHTS payload is an array of descriptors now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<i32>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<i32>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        return Err(io::Error::other("the message carried more descriptors than a config may"));
    }
    Ok((n, fds))
}

/// A `SOCK_SEQPACKET` pair, close-on-exec: message boundaries without framing.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into the array we pass.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends each write as `Output` events (in chunks of at most 64 KiB). Threads share the
/// socket without a lock: each message is one `write` of one datagram.
struct EventWriter {
    socket: Arc<UnixStream>,
    stream: Stream,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let chunk = &buf[..buf.len().min(OUTPUT_CHUNK)];
        let msg = encode(&ChildEvent::Output { stream: self.stream, bytes: chunk.to_vec() })?;
        send(&self.socket, &msg)?;
        Ok(chunk.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The child mode: runs one VM for the parent on [`CHILD_SOCKET_FD`] and returns the process
/// exit code (the guest's, or the failure's).
pub fn serve() -> u8 {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    let jail = match args.as_slice() {
        [] => None,
        [flag, root, run] if flag == JAIL_ARG => Some(JailDirs { root: root.into(), run: run.into() }),
        _ => {
            eprintln!("wasmvisor: error: usage: wasmvisor {CHILD_SUBCOMMAND} [{JAIL_ARG} ROOT RUN]");
            return EXIT_SETUP_FAILED;
        }
    };
    // The parent may have died before the flag was set: then nobody would kill us (an orphan
    // is reparented to init or a subreaper, so compare with the pid the parent gave). In a
    // PID namespace of its own the parent is outside it (getppid is 0): there the socket
    // tells, as a dead parent's end is closed and the config read finds nothing.
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() };
    let spawner = std::env::var(PARENT_PID_ENV).ok().and_then(|p| p.parse::<i32>().ok());
    if jail.is_none() && spawner.map_or(ppid == 1, |p| p != ppid) {
        return EXIT_SETUP_FAILED;
    }
    // SAFETY: fd 3 is the socket the parent passed (checked below: a non-socket fails the read);
    // nothing else in this process owns it.
    let socket = UnixStream::from(unsafe { OwnedFd::from_raw_fd(CHILD_SOCKET_FD) });
    if let Some(dirs) = &jail {
        // Learnt while the host's /sys is still in view; the jail has none.
        let _ = vm::kvm_flavor();
        if let Err(e) = jail::enter(dirs) {
            return fail_early(&socket, &format!("cannot enter the jail: {e}"));
        }
    }
    let socket = Arc::new(socket);
    let report = |event: &ChildEvent| {
        if let Ok(msg) = encode(event) {
            let _ = send(&socket, &msg);
        }
    };
    let writer = |stream| -> Box<dyn Write + Send> { Box::new(EventWriter { socket: socket.clone(), stream }) };
    let new_io = || GuestIo {
        console: crate::console::Console::new(writer(Stream::Console)),
        stdout: writer(Stream::Stdout),
        stderr: writer(Stream::Stderr),
        stdin: Box::new(io::empty()),
    };
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut ready: Option<vm::ReadyVm> = None;
    let (mut config, fds) = loop {
        let (order, fds) = match read_order(&socket, &mut buf) {
            Ok(o) => o,
            Err(Some(message)) => return fail_early(&socket, &message),
            Err(None) => return EXIT_SETUP_FAILED,
        };
        match order {
            Order::Boot(config) => break (config, fds),
            Order::PreBoot(mut template) if ready.is_none() => {
                template.files = match with_files(&template, fds) {
                    Ok(files) => files,
                    Err(message) => return fail_early(&socket, &message),
                };
                match vm::boot_ready(&template, new_io()) {
                    Ok(vm) => {
                        report(&ChildEvent::PreBooted { phases: vm.phases });
                        ready = Some(vm);
                    }
                    Err(e) => report(&ChildEvent::PreBootFailed { message: e.to_string() }),
                }
            }
            Order::PreBoot(_) => report(&ChildEvent::PreBootFailed { message: "a VM is pre-booted already".into() }),
        }
    };
    drop(buf);
    config.files = match with_files(&config, fds) {
        Ok(files) => files,
        Err(message) => return fail_early(&socket, &message),
    };
    match (&jail, config.run_as) {
        (Some(_), Some(run_as)) => {
            if let Err(e) = jail::drop_privileges(run_as) {
                return fail_early(&socket, &format!("cannot drop privileges: {e}"));
            }
            // A change of uid clears the parent-death signal: armed again, then the socket
            // tells whether the parent died in between (its end closed: POLLHUP).
            // SAFETY: prctl sets a flag of this process; poll reads one live pollfd.
            let orphaned = unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                let mut fd = libc::pollfd { fd: socket.as_raw_fd(), events: 0, revents: 0 };
                libc::poll(&mut fd, 1, 0) > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR) != 0
            };
            if orphaned {
                return EXIT_SETUP_FAILED;
            }
        }
        (Some(_), None) => return fail_early(&socket, "a jailed VMM child needs a uid and gid to run as"),
        (None, _) => {}
    }
    // This process does nothing after its VM but report: its launching thread is confined
    // too before the guest runs (the vCPU and device threads confine themselves).
    config.confine_launcher = true;
    if let Some(why) = ready.as_ref().and_then(|vm| vm.fits(&config).err()) {
        tracing::debug!(why, "the pre-booted VM does not fit the launch");
        ready = None;
    }
    // Opened once, here, so that `Started` can say whether the launch restores.
    let restore = vm::open_restore(&config, ready.as_ref()).unwrap_or_else(|e| {
        report(&ChildEvent::SnapshotRefused { message: e.to_string() });
        None
    });
    report(&ChildEvent::Started { pid: std::process::id(), pre_booted: ready.is_some(), restored: restore.is_some() });
    let exited = |code, out_of_memory| report(&ChildEvent::GuestExited { code, out_of_memory });
    let ran = match ready {
        Some(vm) => vm.launch(&config, restore, exited),
        None => vm::boot_from(&config, new_io(), restore, exited),
    };
    match ran {
        Ok(run) => {
            report(&ChildEvent::Exited { code: run.exit_code, phases: run.phases, exits: run.exits });
            run.exit_code
        }
        Err(e) => {
            let exit_code = e.exit_code();
            report(&ChildEvent::Failed { exit_code, message: e.to_string() });
            exit_code
        }
    }
}

/// Reads the parent's next order and the descriptors that came with it. `Err(Some(why))` for
/// one that does not decode, `Err(None)` when the socket fails (the parent is gone, or fd 3 is
/// no socket: said on stderr).
fn read_order(socket: &UnixStream, buf: &mut [u8]) -> Result<(Order, Vec<OwnedFd>), Option<String>> {
    match recv_with_fds(socket, buf) {
        Ok((n, fds)) if n > 0 && n <= MAX_MESSAGE => match postcard::from_bytes(&buf[..n]) {
            Ok(order) => Ok((order, fds)),
            Err(e) => Err(Some(format!("malformed VM config from the parent: {e}"))),
        },
        Ok(_) => Err(Some("no VM config from the parent".into())),
        Err(e) => {
            eprintln!("wasmvisor: error: the VMM child mode needs its socket on fd {CHILD_SOCKET_FD}: {e}");
            Err(None)
        }
    }
}

/// The files that came open with `config`, in the order `order` sends them, or none.
fn with_files(config: &VmConfig, fds: Vec<OwnedFd>) -> Result<Option<vm::VmFiles>, String> {
    let mut fds = fds.into_iter().map(|fd| Arc::new(std::fs::File::from(fd)));
    let (component, snapshot) = (config.component.is_some(), config.snapshot.is_some());
    match fds.len() {
        0 => Ok(None),
        n if n == 2 + usize::from(component) + usize::from(snapshot) => {
            let (kvm, guest) = (fds.next().expect("counted"), fds.next().expect("counted"));
            let artifact = if component { fds.next() } else { None };
            Ok(Some(vm::VmFiles { kvm, guest, artifact, snapshot: fds.next() }))
        }
        n => Err(format!("the VM config came with {n} descriptors")),
    }
}

fn fail_early(socket: &UnixStream, message: &str) -> u8 {
    if let Ok(msg) = encode(&ChildEvent::Failed { exit_code: EXIT_SETUP_FAILED, message: message.to_owned() }) {
        let _ = send(socket, &msg);
    }
    EXIT_SETUP_FAILED
}
