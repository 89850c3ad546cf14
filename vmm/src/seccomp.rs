//! seccomp filters, one per thread role, all in this module.
//!
//! A thread installs its role's filter itself, first thing, before it touches guest state
//! (`apply`). Anything not on the list fails with `EPERM` rather than killing the process,
//! so that a missed syscall surfaces as a clear error naming the operation. Filters are
//! per-thread: the thread that builds VMs (the main thread, tests) is not confined by them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not compile to BPF.
    #[error("cannot build the seccomp filter for the {role} thread: {source}")]
    Build {
        /// The role.
        role: &'static str,
        /// The compiler's error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for the {role} thread: {source}")]
    Install {
        /// The role.
        role: &'static str,
        /// The installer's error.
        #[source]
        source: seccompiler::Error,
    },
}

/// What a thread does, and so what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// Runs `KVM_RUN` and serves exits: console writes, sleeps, register reads.
    Vcpu,
    /// Serves the vsock device: parses guest queues, runs capability providers (their files
    /// are opened before it starts), moves bytes on Unix sockets.
    Device,
    /// The thread that built the VM, from the moment the guest may run (VMM child mode): it
    /// only waits, kicks the vCPU at the timeout, tears the VM down and reports on the
    /// descriptors it holds.
    Launcher,
    /// Runs a tenant's capability broker in the VMM's own process when the tenant has
    /// preopened directories (`wasmvisor run --dir`): file syscalls relative to the
    /// descriptors it holds (cap-std confines the paths), no sockets, no KVM, no `execve`.
    Broker,
}

impl ThreadRole {
    /// The role's name, as used for the thread's name prefix and in errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Device => "vsock",
            Self::Launcher => "launcher",
            Self::Broker => "broker",
        }
    }
}

/// The KVM ioctl request numbers the vCPU thread may use (as in `linux/kvm.h`).
mod kvm_ioctls_nr {
    #![allow(missing_docs)]
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
}
use kvm_ioctls_nr::{KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_XSAVE, KVM_RUN};

fn ioctl_rule(request: u64) -> SeccompRule {
    let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
        .expect("argument 1 is a valid index");
    SeccompRule::new(vec![cond]).expect("one condition is a valid rule")
}

/// What every confined thread needs: reading and writing descriptors it holds, memory (never
/// executable), time and sleeping, futexes, signal return and masks, thread exit, and which
/// CPU the thread is on (`getcpu`, where the vDSO does not answer).
fn base_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in [
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_futex,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_sched_yield,
        libc::SYS_getcpu,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        rules.insert(nr, vec![]);
    }
    // mmap only without PROT_EXEC.
    let no_exec = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)
        .expect("argument 2 is a valid index");
    rules.insert(libc::SYS_mmap, vec![SeccompRule::new(vec![no_exec]).expect("one condition is a valid rule")]);
    rules
}

/// The base, and ioctl only for running the vCPU and reading its state for reports and
/// snapshots (the tenant's stdio, console output and `Wait` need nothing more); a snapshot
/// also asks which pages of guest RAM are resident (`mincore`) and writes them to the file the
/// VMM opened for it (`pwrite64`).
fn vcpu_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = base_rules();
    let ioctls = [KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS(), KVM_GET_XSAVE()];
    rules.insert(libc::SYS_ioctl, ioctls.into_iter().map(ioctl_rule).collect());
    rules.insert(libc::SYS_mincore, vec![]);
    rules.insert(libc::SYS_pwrite64, vec![]);
    rules
}

/// Calls on files a thread holds open already (the key-value store, the tenant log, a
/// preopen's files), and `getrandom`: the device and broker roles share them.
const HELD_FILES: [i64; 12] = [
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_flock,
    libc::SYS_getrandom,
];

/// The worker may touch only sockets and files it already holds, plus Unix sockets it opens
/// for forwarded ports: no `open`, no `execve`, no KVM ioctls, no executable memory.
fn device_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = base_rules();
    for nr in [
        // epoll.
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        // Unix sockets: host-initiated connections and forwarded ports.
        libc::SYS_accept4,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_fcntl,
        libc::SYS_close,
    ]
    .into_iter()
    .chain(HELD_FILES)
    {
        rules.insert(nr, vec![]);
    }
    // Sockets: Unix only.
    let unix = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)
        .expect("argument 0 is a valid index");
    rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![unix]).expect("one condition is a valid rule")]);
    // A placed read of a file the broker handed over moves to the vCPU's CPU.
    allow_own_affinity(&mut rules);
    // ioctl only to make sockets non-blocking (std's `set_nonblocking`).
    rules.insert(libc::SYS_ioctl, vec![ioctl_rule(libc::FIONBIO)]);
    rules
}

/// The broker thread answers capability requests handed over by the device thread: the
/// tenant's log and key-value files (open already) and its preopened directories, where every
/// path is resolved beneath a directory descriptor it holds (`openat2` with
/// `RESOLVE_BENEATH`, or cap-std's walk of `openat`s). Paths cannot be filtered here (they
/// are in memory); the allow-list keeps sockets, KVM, `execve` and memory protection out.
fn broker_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = base_rules();
    for nr in [
        libc::SYS_close,
        libc::SYS_fcntl,
        // The preopens.
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_readlinkat,
        libc::SYS_utimensat,
        libc::SYS_getdents64,
        libc::SYS_fadvise64,
        libc::SYS_fstatfs,
    ]
    .into_iter()
    .chain(HELD_FILES)
    {
        rules.insert(nr, vec![]);
    }
    // A placed read moves to the vCPU's CPU.
    allow_own_affinity(&mut rules);
    rules
}

/// `vm::move_to_cpu`: reading the thread's allowed CPUs, and setting its own (pid 0) only.
fn allow_own_affinity(rules: &mut BTreeMap<i64, Vec<SeccompRule>>) {
    rules.insert(libc::SYS_sched_getaffinity, vec![]);
    let this_thread =
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0).expect("argument 0 is a valid index");
    rules.insert(
        libc::SYS_sched_setaffinity,
        vec![SeccompRule::new(vec![this_thread]).expect("one condition is a valid rule")],
    );
}

/// The launcher waits (futexes, timed), signals its own vCPU thread (`tgkill`), reads KVM's
/// statistics and the resident-page count, closes and unmaps what it built: no `open`, no
/// sockets, no `ioctl`, no `execve`.
fn launcher_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = base_rules();
    for nr in [
        libc::SYS_close,
        libc::SYS_tgkill,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_mincore,
        libc::SYS_pread64,
        libc::SYS_sched_getaffinity,
    ] {
        rules.insert(nr, vec![]);
    }
    rules
}

/// Compiles the filter for `role` (once per process).
pub fn filter(role: ThreadRole) -> Result<&'static BpfProgram, SeccompError> {
    static VCPU: OnceLock<BpfProgram> = OnceLock::new();
    static DEVICE: OnceLock<BpfProgram> = OnceLock::new();
    static LAUNCHER: OnceLock<BpfProgram> = OnceLock::new();
    static BROKER: OnceLock<BpfProgram> = OnceLock::new();
    let cache = match role {
        ThreadRole::Vcpu => &VCPU,
        ThreadRole::Device => &DEVICE,
        ThreadRole::Launcher => &LAUNCHER,
        ThreadRole::Broker => &BROKER,
    };
    if let Some(p) = cache.get() {
        return Ok(p);
    }
    let rules = match role {
        ThreadRole::Vcpu => vcpu_rules(),
        ThreadRole::Device => device_rules(),
        ThreadRole::Launcher => launcher_rules(),
        ThreadRole::Broker => broker_rules(),
    };
    let build = |source| SeccompError::Build { role: role.name(), source };
    let arch = std::env::consts::ARCH.try_into().map_err(build)?;
    let program: BpfProgram =
        SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch)
            .and_then(TryInto::try_into)
            .map_err(build)?;
    Ok(cache.get_or_init(|| program))
}

/// Confines the calling thread to `role`'s allow-list. Irreversible for this thread.
pub fn apply(role: ThreadRole) -> Result<(), SeccompError> {
    let program = filter(role)?;
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { role: role.name(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_thread_refuses_unlisted_syscalls() {
        let (read_fd, write_fd) = {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe() writes.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        let outcome = std::thread::spawn(move || {
            apply(ThreadRole::Vcpu).unwrap();
            // Listed: write.
            // SAFETY: writes one byte from a live buffer to a pipe we own.
            let wrote = unsafe { libc::write(write_fd, b"x".as_ptr().cast(), 1) };
            // Unlisted: socket, openat, and an ioctl request that is not on the list.
            // SAFETY: plain syscalls with valid arguments; the filter refuses them.
            let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let socket_errno = std::io::Error::last_os_error().raw_os_error();
            let open = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            // SAFETY: FIONREAD on a pipe with a valid out-pointer; the filter refuses it.
            let ioctl = unsafe { libc::ioctl(read_fd, libc::FIONREAD, &mut 0i32) };
            (wrote, socket, socket_errno, open.err(), ioctl)
        })
        .join()
        .unwrap();
        assert_eq!(outcome.0, 1, "write is allowed");
        assert_eq!((outcome.1, outcome.2), (-1, Some(libc::EPERM)), "socket is refused");
        assert_eq!(outcome.3, Some(Some(libc::EPERM)), "open is refused");
        assert_eq!(outcome.4, -1, "an unlisted ioctl is refused");
        // This thread is not confined.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
        // SAFETY: closing the two descriptors pipe() gave us.
        unsafe {
            libc::close(read_fd);
            libc::close(write_fd);
        }
    }

    #[test]
    fn device_thread_may_use_unix_sockets_only() {
        let outcome = std::thread::spawn(|| {
            apply(ThreadRole::Device).unwrap();
            let unix = std::os::unix::net::UnixStream::pair().map(|(a, _)| a.set_nonblocking(true));
            // SAFETY: a plain socket() call; the filter refuses it.
            let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let open = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            (unix.is_ok_and(|r| r.is_ok()), inet, open.err())
        })
        .join()
        .unwrap();
        assert!(outcome.0, "Unix socket pairs, made non-blocking, are allowed");
        assert_eq!(outcome.1, -1, "AF_INET sockets are refused");
        assert_eq!(outcome.2, Some(Some(libc::EPERM)), "open is refused");
    }

    #[test]
    fn the_launcher_may_wait_but_not_open_spawn_or_ioctl() {
        let outcome = std::thread::spawn(|| {
            apply(ThreadRole::Launcher).unwrap();
            let (_tx, rx) = std::sync::mpsc::channel::<()>();
            let waited = rx.recv_timeout(std::time::Duration::from_millis(5));
            let open = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            let spawn = std::thread::Builder::new().spawn(|| ()).map(drop).map_err(|e| e.raw_os_error());
            // SAFETY: a plain socket() call; the filter refuses it.
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: FIONBIO on stdin with a valid pointer; the filter refuses every ioctl.
            let ioctl = unsafe { libc::ioctl(0, libc::FIONBIO, &mut 0i32) };
            (waited, open.err(), spawn.err(), unix, ioctl)
        })
        .join()
        .unwrap();
        assert_eq!(outcome.0, Err(std::sync::mpsc::RecvTimeoutError::Timeout), "a timed wait works");
        assert_eq!(outcome.1, Some(Some(libc::EPERM)), "open is refused");
        assert!(outcome.2.is_some(), "no new threads");
        assert_eq!((outcome.3, outcome.4), (-1, -1), "sockets and ioctls are refused");
    }

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
    }
}
