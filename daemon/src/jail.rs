//! The supervisor's half of a VMM child's jail (the child's half is `wasmvisor::jail`): what the
//! host must lend a child, and the limits put on it, all set before it reads a byte a guest
//! wrote.
//!
//! - [`Jail::check`] at start: the daemon runs as root, the kernel has the namespaces, and a
//!   writable cgroup hierarchy with the memory, cpu and pids controllers exists (cgroup v2
//!   where its controllers are available to the daemon's cgroup, else the v1 hierarchies).
//!   A missing piece is named, and the daemon refuses to start unless `--insecure-no-jail`.
//! - [`Cell`]: a child's two directories under the data directory, `jail/c<N>` (an empty
//!   directory its tmpfs root is mounted on, in its own mount namespace) and `run/c<N>` (its
//!   sockets, seen inside as `/run`), made before the child starts and removed after it.
//! - At hand-out, [`Cell::lend`]: the sockets the VM uses (its tenant's broker socket, the
//!   HTTP socket of its pool) are hard-linked into `run/c<N>` and given to the tenant's uid,
//!   the directory too, and the config's paths rewritten to the child's view.
//! - [`VmCgroup`]: per runner (the thread that owns a child, pooled ahead of launches, so that
//!   the cgroup's creation is off the request path), its idle child added at once; at
//!   hand-out the VM's limits: memory (guest RAM plus [`MEMORY_OVERHEAD`]), CPU quota, pids,
//!   written before its config is sent; removed after the runner's last child is reaped. A VM
//!   the kernel killed for memory is reported as out of memory.
//!
//! Tenant uids come from `--jail-uid-base` upwards, one per tenant for the daemon's life (files
//! the children own are their run directories only, remade at every start).

use std::io::Write;
use std::path::{Path, PathBuf};

use wasmvisor::jail::{JailDirs, RUN_DIR, RunAs};
use wasmvisor::vm::{Capabilities, VmConfig};

/// What a VMM child may use beyond its guest's RAM (the VMM's own code and heap, thread
/// stacks, the vsock device's buffers, KVM's page tables), in its cgroup's memory limit.
/// Measured: a CPython run's peak beyond its 128 MiB of RAM is under 30 MiB (the README).
pub const MEMORY_OVERHEAD: u64 = 64 << 20;

/// The cgroup controllers a jail needs.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The jail as the daemon set it up at start.
#[derive(Debug)]
pub struct Jail {
    cgroups: Cgroups,
    uid_base: u32,
}

/// Where VM cgroups are made.
#[derive(Debug)]
enum Cgroups {
    /// cgroup v2: one directory per VM under this one (controllers enabled below it).
    V2(PathBuf),
    /// cgroup v1: one directory per VM under each controller's parent (memory, cpu, pids).
    V1 { memory: PathBuf, cpu: PathBuf, pids: PathBuf },
}

/// The limits a tenant's spec puts on each of its VMs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Guest RAM in MiB (the cgroup allows it plus [`MEMORY_OVERHEAD`]).
    pub memory_mib: u64,
    /// CPUs' worth of time per period (1.0: one core).
    pub cpus: f64,
    /// Most processes and threads.
    pub pids: u32,
}

impl Jail {
    /// Checks that this host can jail VMM children and prepares the cgroup parents
    /// (`wasmvisor-<pid>` below the daemon's own cgroups). The error names every missing piece.
    pub fn check(uid_base: u32) -> Result<Self, String> {
        let mut missing = Vec::new();
        if effective_uid() != Some(0) {
            missing.push("root (namespaces, pivot_root, cgroups and a uid per tenant need it)".to_string());
        }
        for ns in ["pid", "mnt", "net", "ipc", "uts"] {
            if !Path::new("/proc/self/ns").join(ns).exists() {
                missing.push(format!("the {ns} namespace (kernel support)"));
            }
        }
        if uid_base == 0 {
            missing.push("a non-zero --jail-uid-base".to_string());
        }
        let cgroups = if missing.is_empty() { Cgroups::discover().map_err(|e| missing.push(e)).ok() } else { None };
        match cgroups {
            Some(cgroups) if missing.is_empty() => Ok(Self { cgroups, uid_base }),
            _ => Err(format!(
                "cannot jail VMM children on this host: missing {}; pass --insecure-no-jail to run them unjailed",
                missing.join(", ")
            )),
        }
    }

    /// The identity of the `index`th tenant.
    pub fn run_as(&self, index: u32) -> RunAs {
        let id = self.uid_base.saturating_add(index);
        RunAs { uid: id, gid: id }
    }

    /// A cgroup for the VMs of one VMM runner, `name` unique among the daemon's: made ahead
    /// of any launch (creating a cgroup is the slow part, ~ms), given its limits at hand-out.
    pub fn cgroup(&self, name: &str) -> std::io::Result<VmCgroup> {
        let (dirs, v2) = match &self.cgroups {
            Cgroups::V2(parent) => (vec![parent.join(name)], true),
            Cgroups::V1 { memory, cpu, pids } => (vec![memory.join(name), cpu.join(name), pids.join(name)], false),
        };
        let mut group = VmCgroup { dirs: Vec::new(), v2 };
        for dir in dirs {
            std::fs::create_dir(&dir)?;
            group.dirs.push(dir);
        }
        Ok(group)
    }
}

/// Removes the `wasmvisor-<pid>` cgroups under `parent` left by daemons that died without
/// cleaning up (`kill -9`): those whose process is gone, and one with this daemon's own pid (a
/// reused pid: it cannot be ours yet). Their VMs' cgroups go first; a cgroup that still holds
/// a process cannot be removed and stays. Without this, a reused pid meets its predecessor's
/// `vmm-c0` and no VM can start.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let own = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("wasmvisor-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != own && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(children) = std::fs::read_dir(&dir) {
            for child in children.flatten().filter(|c| c.file_type().is_ok_and(|t| t.is_dir())) {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

/// This process's effective uid, from `/proc/self/status` (the daemon has no unsafe code).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
        .map_err(|e| std::io::Error::new(e.kind(), format!("write {value} to {}: {e}", path.display())))
}

impl Cgroups {
    /// v2 if the daemon's cgroup offers the three controllers, else the v1 hierarchies.
    fn discover() -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup ({e})"))?;
        let mounts =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo ({e})"))?;
        let v2_err = match Self::v2(&own, &mounts) {
            Ok(v2) => return Ok(v2),
            Err(e) => e,
        };
        Self::v1(&own, &mounts).map_err(|v1_err| format!("a cgroup hierarchy for VMs ({v2_err}; {v1_err})"))
    }

    /// The mount point of the cgroup file system whose super options satisfy `wanted`.
    fn mount_point(mounts: &str, fstype: &str, wanted: impl Fn(&str) -> bool) -> Option<PathBuf> {
        mounts.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split_whitespace();
            let (fs, _source, options) = (right.next()?, right.next()?, right.next().unwrap_or(""));
            if fs == fstype && wanted(options) { left.split_whitespace().nth(4).map(PathBuf::from) } else { None }
        })
    }

    fn v2(own: &str, mounts: &str) -> Result<Self, String> {
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2 membership")?;
        let mount = Self::mount_point(mounts, "cgroup2", |_| true).ok_or("no cgroup v2 mount")?;
        let dir = mount.join(path.trim_start_matches('/'));
        let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        if let Some(c) = CONTROLLERS.iter().find(|c| !available.split_whitespace().any(|a| a == **c)) {
            return Err(format!("cgroup v2 at {} lacks the {c} controller", dir.display()));
        }
        // No process may sit in a cgroup whose controllers are enabled below it: the daemon
        // moves into a leaf of its own first.
        let daemon = dir.join("wasmvisor-daemon");
        let vms = dir.join(format!("wasmvisor-{}", std::process::id()));
        let err = |e: std::io::Error| format!("cannot set up cgroup v2 under {} ({e})", dir.display());
        std::fs::create_dir_all(&daemon).map_err(err)?;
        sweep_stale(&dir);
        write(&daemon.join("cgroup.procs"), &std::process::id().to_string()).map_err(err)?;
        let enable = "+memory +cpu +pids";
        write(&dir.join("cgroup.subtree_control"), enable).map_err(err)?;
        std::fs::create_dir_all(&vms).map_err(err)?;
        write(&vms.join("cgroup.subtree_control"), enable).map_err(err)?;
        Ok(Self::V2(vms))
    }

    fn v1(own: &str, mounts: &str) -> Result<Self, String> {
        let mut dirs = Vec::new();
        for controller in CONTROLLERS {
            let has = |list: &str| list.split(',').any(|c| c == controller);
            let path = own
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
                    has(list).then_some(path)
                })
                .ok_or_else(|| format!("no cgroup v1 {controller} hierarchy"))?;
            let mount = Self::mount_point(mounts, "cgroup", has)
                .ok_or_else(|| format!("the cgroup v1 {controller} hierarchy is not mounted"))?;
            let parent = mount.join(path.trim_start_matches('/'));
            sweep_stale(&parent);
            let dir = parent.join(format!("wasmvisor-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {} ({e})", dir.display()))?;
            dirs.push(dir);
        }
        let [memory, cpu, pids]: [PathBuf; 3] = dirs.try_into().expect("three controllers");
        Ok(Self::V1 { memory, cpu, pids })
    }

    fn parents(&self) -> Vec<&Path> {
        match self {
            Self::V2(dir) => vec![dir],
            Self::V1 { memory, cpu, pids } => vec![memory, cpu, pids],
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for dir in self.cgroups.parents() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// One VM's cgroup (a directory per hierarchy); removed when dropped, once its process is gone.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl VmCgroup {
    /// Sets the limits of the VM it is about to hold.
    pub fn set_limits(&self, limits: Limits) -> std::io::Result<()> {
        let memory = (limits.memory_mib << 20) + MEMORY_OVERHEAD;
        let period: u64 = 100_000;
        let quota = ((limits.cpus * period as f64) as u64).max(1000);
        if self.v2 {
            let dir = &self.dirs[0];
            write(&dir.join("memory.max"), &memory.to_string())?;
            let _ = write(&dir.join("memory.swap.max"), "0");
            write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            return write(&dir.join("pids.max"), &limits.pids.to_string());
        }
        write(&self.dirs[0].join("memory.limit_in_bytes"), &memory.to_string())?;
        write(&self.dirs[1].join("cpu.cfs_period_us"), &period.to_string())?;
        write(&self.dirs[1].join("cpu.cfs_quota_us"), &quota.to_string())?;
        write(&self.dirs[2].join("pids.max"), &limits.pids.to_string())
    }

    /// Moves the process `pid` (all its threads) into it.
    pub fn add(&self, pid: u32) -> std::io::Result<()> {
        self.dirs.iter().try_for_each(|dir| write(&dir.join("cgroup.procs"), &pid.to_string()))
    }

    /// How many of its processes the kernel killed for lack of memory so far.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 { ("memory.events", "oom_kill ") } else { ("memory.oom_control", "oom_kill ") };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok()))
            .unwrap_or(0)
    }

    /// Its memory limit, in bytes.
    pub fn memory_limit(&self) -> Option<u64> {
        let file = if self.v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::read_to_string(self.dirs[0].join(file)).ok()?.trim().parse().ok()
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A VMM child's directories (see the module doc), removed when dropped.
#[derive(Debug)]
pub struct Cell {
    /// Unique among the daemon's cells.
    pub id: u64,
    /// The directories, as the child is told them.
    pub dirs: JailDirs,
}

/// The name, inside a child's run directory, of its tenant's broker socket.
const BROKER_SOCKET: &str = "broker.sock";
/// The name, inside a child's run directory, of its vsock socket (`_<port>` ones beside it).
const VSOCK_SOCKET: &str = "vsock.sock";

impl Cell {
    /// Makes the directories of cell `id` under `data_dir` (root's, mode 0700).
    pub fn new(data_dir: &Path, id: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dirs = JailDirs {
            root: data_dir.join("jail").join(format!("c{id}")),
            run: data_dir.join("run").join(format!("c{id}")),
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for dir in [&dirs.root, &dirs.run] {
            let _ = std::fs::remove_dir_all(dir);
            builder.create(dir)?;
        }
        Ok(Self { id, dirs })
    }

    /// Lends the cell to a VM run as `run_as`: the sockets `config` names are linked into its
    /// run directory (owned by `run_as`, as is the directory) and its paths rewritten to
    /// the child's view; `config.run_as` is set.
    pub fn lend(&self, config: &VmConfig, run_as: RunAs) -> std::io::Result<VmConfig> {
        let mut config = config.clone();
        let own = |path: &Path| std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid));
        let link = |host: &Path, name: &str| -> std::io::Result<PathBuf> {
            let inside = self.dirs.run.join(name);
            let _ = std::fs::remove_file(&inside);
            std::fs::hard_link(host, &inside)?;
            own(&inside)?;
            Ok(Path::new(RUN_DIR).join(name))
        };
        if let Some(vsock) = config.vsock.as_mut() {
            if let Capabilities::Relay(path) = &vsock.capabilities {
                vsock.capabilities = Capabilities::Relay(link(path, BROKER_SOCKET)?);
            }
            if let Some(base) = vsock.uds_path.take() {
                let port = wasmvisor_abi::vsock::HTTP_PORT;
                let host_port = PathBuf::from(format!("{}_{port}", base.display()));
                if host_port.exists() {
                    link(&host_port, &format!("{VSOCK_SOCKET}_{port}"))?;
                }
                vsock.uds_path = Some(Path::new(RUN_DIR).join(VSOCK_SOCKET));
            }
        }
        own(&self.dirs.run)?;
        config.run_as = Some(run_as);
        Ok(config)
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dirs.run);
        let _ = std::fs::remove_dir(&self.dirs.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";

    #[test]
    fn mount_points_are_found_by_controller() {
        let has = |c: &'static str| move |o: &str| o.split(',').any(|x| x == c);
        assert_eq!(Cgroups::mount_point(MOUNTINFO, "cgroup", has("memory")), Some("/sys/fs/cgroup/memory".into()));
        assert_eq!(Cgroups::mount_point(MOUNTINFO, "cgroup", has("pids")), Some("/sys/fs/cgroup/pids".into()));
        assert_eq!(Cgroups::mount_point(MOUNTINFO, "cgroup", has("blkio")), None);
        assert_eq!(Cgroups::mount_point(MOUNTINFO, "cgroup2", |_| true), Some("/sys/fs/cgroup/unified".into()));
    }

    #[test]
    fn v2_without_controllers_is_refused_naming_the_missing_one() {
        // The unified mount exists, but a cgroup under a tmpfs path has no controllers file.
        let err = Cgroups::v2("0::/nonexistent-wasmvisor-test\n", MOUNTINFO).unwrap_err();
        assert!(err.contains("lacks the memory controller"), "{err}");
        let err = Cgroups::v2("4:memory:/x\n", MOUNTINFO).unwrap_err();
        assert!(err.contains("no cgroup v2 membership"), "{err}");
    }
}
