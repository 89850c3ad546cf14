//! The VMM child's jail, its own half: what the child does to itself, as root, before it
//! reads anything a guest wrote (the supervisor's half, the cgroup and the directories, is
//! the daemon's).
//!
//! A jailed child is started by [`crate::child::VmmChild`] in new PID, mount, network, IPC and
//! UTS namespaces ([`NAMESPACES`]). Before it reads its config it [`enter`]s its jail: its
//! mounts stop propagating to the host, a fresh tmpfs becomes its root (`pivot_root`, the old
//! root detached), holding one directory, [`RUN_DIR`], bound from the supervisor's per-child
//! directory (its sockets: the tenant's broker, the vsock listener, the HTTP socket). It needs
//! no file of the host: its KVM device, guest image and artifact come open with its config.
//! With the config come the tenant's uid and gid, and it [`drop_privileges`]: supplementary
//! groups cleared, gid and uid set (which empties its capabilities), the capability bounding
//! set emptied before that, `no_new_privs` set. Its threads then confine themselves with
//! seccomp before the guest runs, as without a jail.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The namespaces a jailed child is started in (`clone` flags).
pub const NAMESPACES: libc::c_int =
    libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

/// Where a jailed child sees its run directory (its root holds nothing else).
pub const RUN_DIR: &str = "/run";

/// A child's two host directories: an empty one its root is mounted on, and the one holding
/// its sockets, seen inside as [`RUN_DIR`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailDirs {
    /// Where its tmpfs root is mounted (an empty directory of the supervisor's).
    pub root: PathBuf,
    /// Its sockets' directory.
    pub run: PathBuf,
}

/// The unprivileged identity a jailed child takes once it has its config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunAs {
    /// The tenant's uid.
    pub uid: u32,
    /// The tenant's gid.
    pub gid: u32,
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("a NUL byte in a path"))
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|t| CString::new(t).expect("no NUL"));
    let data = data.map(|d| CString::new(d).expect("no NUL"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(ptr(&source), target_c.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) };
    check(rc, &format!("mount on {}", target.display()))
}

/// Enters the jail: the calling process must be root in its own mount namespace (a child
/// started with [`NAMESPACES`]). Afterwards `/` is a tmpfs holding only [`RUN_DIR`].
pub fn enter(dirs: &JailDirs) -> io::Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // Nothing done here may reach the host's mount table.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(Some(Path::new("tmpfs")), &dirs.root, Some("tmpfs"), flags, Some("size=64k,nr_inodes=16,mode=0755"))?;
    let run = dirs.root.join(RUN_DIR.trim_start_matches('/'));
    let old = dirs.root.join("old");
    for dir in [&run, &old] {
        // SAFETY: a NUL-terminated path that outlives the call.
        check(unsafe { libc::mkdir(cstr(dir)?.as_ptr(), 0o755) }, &format!("mkdir {}", dir.display()))?;
    }
    mount(Some(&dirs.run), &run, None, libc::MS_BIND | libc::MS_REC, None)?;
    mount(None, &run, None, libc::MS_REMOUNT | libc::MS_BIND | flags, None)?;
    let (root_c, old_c) = (cstr(&dirs.root)?, cstr(&old)?);
    // SAFETY: pivot_root takes two NUL-terminated paths that outlive the call; the new root
    // is a mount point (the tmpfs) and `old` lies beneath it.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, root_c.as_ptr(), old_c.as_ptr()) };
    check(rc as libc::c_int, "pivot_root")?;
    // SAFETY: plain path arguments, as above.
    unsafe {
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
        check(libc::umount2(c"/old".as_ptr(), libc::MNT_DETACH), "detach the old root")?;
        check(libc::rmdir(c"/old".as_ptr()), "rmdir /old")?;
    }
    // The root itself is read-only from here on; only the run directory takes sockets.
    mount(None, Path::new("/"), None, libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags, None)?;
    Ok(())
}

/// Empties the calling thread's capability bounding set (it is per thread, and only a thread
/// that has `CAP_SETPCAP` may drop from it: an unprivileged process gets `EPERM`).
pub fn drop_bounding_set() -> io::Result<()> {
    let mut cap = 0;
    // SAFETY: prctl reads or changes only this thread's bounding set; plain integers.
    while unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } >= 0 {
        // SAFETY: as above.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) }, "drop a capability from the bounding set")?;
        cap += 1;
    }
    Ok(())
}

/// Becomes `run_as`, for good: supplementary groups cleared, the capability bounding set
/// emptied, gid then uid set (a non-root uid keeps no capabilities), `no_new_privs` set.
/// Checked afterwards: a process that could still regain root is an error.
pub fn drop_privileges(run_as: RunAs) -> io::Result<()> {
    if run_as.uid == 0 || run_as.gid == 0 {
        return Err(io::Error::other("a jailed VMM child must not run as root"));
    }
    drop_bounding_set()?;
    // SAFETY: each call changes only this process's credentials and takes plain integers.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(run_as.gid, run_as.gid, run_as.gid), "setresgid")?;
        check(libc::setresuid(run_as.uid, run_as.uid, run_as.uid), "setresuid")?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")?;
        if libc::setresuid(0, 0, 0) == 0 || libc::geteuid() == 0 {
            return Err(io::Error::other("the jailed VMM child could become root again"));
        }
    }
    Ok(())
}
