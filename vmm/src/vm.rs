//! Launching one micro-VM: configuration in, exit code (or a failure report) out.
//!
//! [`VmConfig`] is plain data. [`boot`] validates all of it and the guest image before any
//! KVM object exists, then builds the VM in phases that it times ([`Phases`]): create the
//! VM, set up memory and system structures, load the image, set up the vCPU and BootInfo,
//! run the guest on a confined vCPU thread under a watchdog, tear down. Memory setup runs on
//! the vCPU thread in parallel with the VM and vCPU creation.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;
use wasmvisor_abi::boot::MemoryKind;
use wasmvisor_abi::cpu::{CpuReport, FeatureSet};
use wasmvisor_abi::layout::{ARTIFACT_GPA, ARTIFACT_MAX_SIZE, BOOT_INFO_GPA, LARGE_PAGE_SIZE, STACK_TOP};
use wasmvisor_providers::{Broker, BrokerClient, BrokerError, CapabilityService, TenantSpec};

use crate::arch::{self, ArchError, cpu::CpuError};
use crate::bootinfo::{self, BootInfoError, BootStrings, Clocks};
use crate::devices::virtio::vsock::{RegisterPage, VsockDevice};
use crate::devices::virtio::worker::{VsockReport, VsockWorker};
use crate::hypercall::GuestIo;
use crate::kvm::{self, KvmError, KvmFlavor};
use crate::loader::{Backing, GuestImage, ImageError};
use crate::memory::{self, FileMapping, MemoryError};
use crate::seccomp::{self, ThreadRole};
use crate::snapshot::{Identity, Snapshot, SnapshotMode, SnapshotPlan};
use crate::vcpu::{ExitCounts, FailureReason, KICK_SIGNAL_OFFSET, VcpuOutcome, VcpuRunner};

/// Everything needed to launch a VM: plain data (a VMM child receives it over its socket).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Guest RAM in MiB (a multiple of 2).
    pub memory_mib: u64,
    /// The guest ELF image.
    pub guest: PathBuf,
    /// The tenant's arguments.
    pub args: Vec<String>,
    /// The tenant's environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Wall-clock limit for the guest's run.
    pub timeout: Duration,
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// Install the exception-reporting IDT (tests turn it off to reach the triple-fault path).
    pub exception_handlers: bool,
    /// A precompiled component artifact to map read-only into the guest for it to run.
    pub component: Option<PathBuf>,
    /// Ask the guest to report its own phases (engine, deserialize, instantiate, run) on the
    /// console, as one `guest phases:` line.
    pub report_guest_phases: bool,
    /// Count guest RAM pages resident at exit (`RunReport::resident_pages`); costs a `mincore`
    /// over all of RAM, so only benchmarks and `-v` ask for it.
    pub count_resident_pages: bool,
    /// The vsock device and the tenant behind it; `None` for a VM without one.
    pub vsock: Option<VsockConfig>,
    /// Read KVM's own exit counters for the vCPU (`RunReport::kvm_exits`); benchmarks and
    /// `-v` ask for them.
    pub kvm_exit_stats: bool,
    /// A feature-report boot: the guest only reports the CPU features it detects
    /// (`RunReport::cpu_report`) and exits (see `guest_cpu`).
    pub cpu_report: bool,
    /// CPU features the guest must treat as absent although its CPU has them, as a CPU
    /// template would (the guest's detection leaves them out; so does its feature report).
    pub cpu_features_masked: FeatureSet,
    /// Confine the launching thread (`seccomp::ThreadRole::Launcher`) before the guest runs:
    /// for a process that does nothing after the VM but report (the VMM child mode).
    pub confine_launcher: bool,
    /// KVM's supported CPUID as the supervisor got it (`arch::cpu::supported_cpuid_entries`),
    /// so that a fresh VMM process need not ask again (~300 µs); empty: ask KVM.
    pub supported_cpuid: Vec<crate::arch::cpu::CpuidEntry>,
    /// The component is an HTTP handler: the guest serves requests that arrive on the vsock
    /// connection it makes to `HTTP_PORT` (forwarded to `<uds_path>_<HTTP_PORT>`), one after
    /// another, until the VM is stopped. Needs `vsock` with a `uds_path`.
    pub http: bool,
    /// The KVM device, guest image and artifact already open, used instead of their paths
    /// (which then only name them in messages): a jailed VMM child has no filesystem to open
    /// them from, and gets them from its supervisor with its config.
    #[serde(skip)]
    pub files: Option<VmFiles>,
    /// In a jailed VMM child: the unprivileged identity it takes once it has this config.
    #[serde(default)]
    pub run_as: Option<crate::jail::RunAs>,
    /// Make a snapshot of the component's ready state, or start from one (see `snapshot`).
    #[serde(default)]
    pub snapshot: Option<SnapshotPlan>,
}

/// The files a VM needs, open: see [`VmConfig::files`].
#[derive(Clone, Debug)]
pub struct VmFiles {
    /// The KVM device, open read-write.
    pub kvm: Arc<std::fs::File>,
    /// The guest image.
    pub guest: Arc<std::fs::File>,
    /// The component artifact, when `component` is set.
    pub artifact: Option<Arc<std::fs::File>>,
    /// The snapshot, when `snapshot` is set: open for reading to restore, for writing to make.
    pub snapshot: Option<Arc<std::fs::File>>,
}

impl VmFiles {
    /// Opens the files `config` names (its `kvm_device`, `guest`, `component` and `snapshot`;
    /// a snapshot to make is created, or emptied).
    pub fn open(config: &VmConfig) -> std::io::Result<Self> {
        let open = |p: &std::path::Path| std::fs::File::open(p).map(Arc::new);
        let kvm = std::fs::OpenOptions::new().read(true).write(true).open(&config.kvm_device).map(Arc::new)?;
        let artifact = config.component.as_deref().map(open).transpose()?;
        let snapshot = match &config.snapshot {
            None => None,
            Some(plan) if plan.mode == SnapshotMode::Restore => Some(open(&plan.path)?),
            Some(plan) => {
                Some(Arc::new(std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&plan.path)?))
            }
        };
        Ok(Self { kvm, guest: open(&config.guest)?, artifact, snapshot })
    }
}

/// The snapshot `config` says to restore from, opened and checked for its launch (in `ready`,
/// a pre-booted VM, if given): it matches (all but the TSC frequency, when no VM exists yet,
/// which [`boot_from`] checks), verifies, and fits the pre-booted VM's system area. `None`
/// when the config restores nothing. A VMM child opens it first, to say whether the launch
/// restores, and hands it to [`boot_from`] or [`ReadyVm::launch`].
pub fn open_restore(config: &VmConfig, ready: Option<&ReadyVm>) -> Result<Option<Arc<Snapshot>>, VmError> {
    let Some(plan) = config.snapshot.as_ref().filter(|p| p.mode == SnapshotMode::Restore) else { return Ok(None) };
    let memory_size = memory::size_from_mib(config.memory_mib)?;
    let (guest_image, tsc_khz) = match ready {
        Some(vm) => (vm.core.image.identity(), vm.core.clocks.tsc_khz),
        None => {
            let image = match config.files.as_ref() {
                Some(files) => crate::loader::file_identity(&files.guest),
                None => std::fs::File::open(&config.guest)
                    .map_or_else(|_| "file:unknown".into(), |f| crate::loader::file_identity(&f)),
            };
            (image, 0)
        }
    };
    let snap = open_snapshot(config, plan, &identity(config, guest_image, memory_size, tsc_khz, plan))?;
    if let Some(vm) = ready
        && !snap.same_system_area(&vm.core.mem)?
    {
        let why = "its page tables and system structures are not this VM's".into();
        return Err(crate::snapshot::SnapshotError::Invalid { path: plan.path.clone(), why }.into());
    }
    Ok(Some(Arc::new(snap)))
}

/// Opens the snapshot `plan` names for `config`'s launch (the descriptor `config.files` holds,
/// or its path), checked against `want`.
fn open_snapshot(config: &VmConfig, plan: &SnapshotPlan, want: &Identity) -> Result<Snapshot, VmError> {
    let t = Instant::now();
    let opened = match config.files.as_ref().and_then(|f| f.snapshot.as_ref()) {
        None => Snapshot::open(&plan.path, want, plan.verified),
        Some(file) => file
            .try_clone()
            .map_err(|source| crate::snapshot::SnapshotError::Io { path: plan.path.clone(), source })
            .and_then(|f| Snapshot::from_file(&plan.path, f, want, plan.verified)),
    };
    tracing::debug!(verified = plan.verified, elapsed = ?t.elapsed(), ok = opened.is_ok(), "snapshot opened");
    Ok(opened?)
}

/// Where the KVM device comes from: its path, or a descriptor already open.
#[derive(Debug)]
enum KvmSource {
    Path(PathBuf),
    File(std::fs::File),
}

impl KvmSource {
    fn of(config: &VmConfig) -> Result<Self, VmError> {
        match &config.files {
            None => Ok(Self::Path(config.kvm_device.clone())),
            Some(files) => files
                .kvm
                .try_clone()
                .map(Self::File)
                .map_err(|source| VmError::Host { what: "duplicate the KVM device descriptor", source }),
        }
    }

    fn open(self, path: &std::path::Path) -> Result<Kvm, KvmError> {
        match self {
            Self::Path(p) => kvm::open(&p),
            Self::File(f) => kvm::from_file(path, f),
        }
    }
}

/// Who answers a VM's capability requests.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Capabilities {
    /// The tenant's providers, opened in this process (`wasmvisor run`): its name, grants,
    /// configuration and data directory.
    InProcess(TenantSpec),
    /// A broker in another process listening on this Unix socket (a VMM child's supervisor,
    /// which owns the tenant's files and checks its grants): this process opens no tenant file.
    Relay(PathBuf),
    /// None: every capability request is refused. For a VM that makes a snapshot and stops
    /// (`SnapshotMode::MakeOnly`): its guest stops before it would ask for one.
    Refused,
}

/// A VM's vsock device: whose capabilities it serves and where host sockets live.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// Who answers capability requests.
    pub capabilities: Capabilities,
    /// Unix socket path for host-initiated connections (`CONNECT <port>`); guest connections
    /// to host ports other than the capability port go to `<path>_<port>`. None: neither.
    pub uds_path: Option<PathBuf>,
    /// A relayed broker has preopened directories for this VM (in process, the spec says).
    #[serde(default)]
    pub relay_preopens: bool,
}

impl VsockConfig {
    /// Whether the guest has preopened directories to ask for.
    pub fn has_preopens(&self) -> bool {
        match &self.capabilities {
            Capabilities::InProcess(spec) => !spec.preopens().is_empty(),
            Capabilities::Relay(_) | Capabilities::Refused => self.relay_preopens,
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            guest: crate::images::guest_image(crate::images::GUEST),
            args: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(30),
            kvm_device: kvm::device_path(),
            exception_handlers: true,
            component: None,
            report_guest_phases: false,
            count_resident_pages: false,
            vsock: None,
            kvm_exit_stats: false,
            cpu_report: false,
            cpu_features_masked: FeatureSet::EMPTY,
            confine_launcher: false,
            supported_cpuid: Vec::new(),
            http: false,
            files: None,
            run_as: None,
            snapshot: None,
        }
    }
}

/// Time spent in each phase of a launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Phases {
    /// Open /dev/kvm, `KVM_CREATE_VM`.
    pub vm_create: Duration,
    /// Map guest RAM, register it, write GDT/IDT/page tables.
    pub memory: Duration,
    /// Read and validate the ELF, copy it into RAM.
    pub image_load: Duration,
    /// Create the vCPU, CPUID, registers, clocks, BootInfo.
    pub vcpu_setup: Duration,
    /// From spawning the vCPU thread to the guest's exit.
    pub guest_run: Duration,
    /// Close the vCPU and VM, unmap RAM.
    pub teardown: Duration,
    /// Wall-clock time of the whole launch. Less than the sum of the phases: `memory` and
    /// `image_load` run on the vCPU thread while the launching thread is in `vm_create` and
    /// `vcpu_setup`.
    pub wall: Duration,
}

impl Phases {
    /// Wall-clock time of the whole launch.
    pub fn total(&self) -> Duration {
        self.wall
    }
}

/// A guest that ran to its own exit.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The guest's exit code.
    pub exit_code: u8,
    /// Phase timings.
    pub phases: Phases,
    /// Exits served.
    pub exits: ExitCounts,
    /// Guest RAM pages resident at the guest's exit (touched by the VMM or the guest, or
    /// mapped from the page cache), if `VmConfig::count_resident_pages`; else 0.
    pub resident_pages: u64,
    /// Which KVM ran it.
    pub flavor: KvmFlavor,
    /// What the vsock device did, if the VM had one.
    pub vsock: Option<VsockReport>,
    /// KVM's exit counters (including exits completed in the kernel), if asked for and
    /// available.
    pub kvm_exits: Option<crate::kvm::KvmExitStats>,
    /// The guest's CPU feature report, from a feature-report boot (`VmConfig::cpu_report`).
    pub cpu_report: Option<CpuReport>,
    /// The component ran out of memory (the size it wanted, 0 if unknown).
    pub out_of_memory: Option<u64>,
    /// A snapshot was asked for: the RAM bytes it holds (it is at the plan's path), or why it
    /// was not made.
    pub snapshot: Option<Result<u64, String>>,
    /// The VM started from a snapshot.
    pub restored: bool,
}

/// A guest that stopped without asking to: why, where, and what it said last.
#[derive(Debug)]
pub struct GuestFailure {
    /// What happened.
    pub reason: FailureReason,
    /// The guest's RIP at the failure, if known.
    pub rip: Option<u64>,
    /// The function at `rip`, from the image's symbols.
    pub symbol: Option<(String, u64)>,
    /// The guest's last console lines.
    pub console_tail: Vec<String>,
}

impl fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest failed: {}", self.reason)?;
        if let Some(rip) = self.rip {
            write!(f, "; RIP {rip:#x}")?;
            if let Some((name, offset)) = &self.symbol {
                write!(f, " in {name}+{offset:#x}")?;
            }
        }
        if self.console_tail.is_empty() {
            if !self.reason.is_timeout() && !self.reason.is_artifact_rejected() {
                write!(f, "\nthe guest wrote nothing to its console")?;
            }
        } else {
            write!(f, "\nlast console lines:")?;
            for line in &self.console_tail {
                write!(f, "\n  | {line}")?;
            }
        }
        Ok(())
    }
}

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Guest RAM size or mapping.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Args, env or BootInfo.
    #[error(transparent)]
    BootInfo(#[from] BootInfoError),
    /// /dev/kvm.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A VM-level KVM ioctl.
    #[error("cannot {what}: {source}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing system structures.
    #[error(transparent)]
    Arch(#[from] ArchError),
    /// The component artifact could not be mapped.
    #[error("cannot map the component artifact {path}: {source}")]
    Artifact {
        /// The artifact's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// vCPU registers.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Host resources (threads, signals, randomness).
    #[error("cannot {what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tenant's capability providers could not be opened.
    #[error("cannot open the capabilities of the tenant: {0}")]
    Broker(#[from] BrokerError),
    /// The vsock device or its host socket.
    #[error("{0}")]
    Vsock(String),
    /// The guest stopped without asking to.
    #[error("{0}")]
    Guest(GuestFailure),
    /// The snapshot to start from is not usable (before any VM exists): discard it, and boot.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Process exit code for a guest that ran past its time limit.
pub const EXIT_TIMEOUT: u8 = 124;
/// Process exit code when wasmvisor could not start the VM.
pub const EXIT_SETUP_FAILED: u8 = 125;
/// Process exit code for a guest that crashed (exception, triple fault, bad request).
pub const EXIT_GUEST_CRASHED: u8 = 126;

impl VmError {
    /// The process exit code this error maps to.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Guest(g) if g.reason.is_timeout() => EXIT_TIMEOUT,
            Self::Guest(g) if g.reason.is_artifact_rejected() => EXIT_SETUP_FAILED,
            Self::Guest(_) => EXIT_GUEST_CRASHED,
            _ => EXIT_SETUP_FAILED,
        }
    }
}

fn setup_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { what, source }
}

fn timed<T>(slot: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *slot += t.elapsed();
    out
}

/// The flavor of the KVM in use, detected once per process.
pub fn kvm_flavor() -> KvmFlavor {
    static FLAVOR: std::sync::OnceLock<KvmFlavor> = std::sync::OnceLock::new();
    *FLAVOR.get_or_init(KvmFlavor::detect)
}

/// The checks of `config` that need no file and no KVM (memory size, args and env), which
/// [`boot`] also makes: for a caller with work to do before booting (`launch`).
pub fn check(config: &VmConfig) -> Result<(), VmError> {
    memory::size_from_mib(config.memory_mib)?;
    BootStrings::new(&config.args, &config.env)?;
    Ok(())
}

/// Boots the guest described by `config` with its console and the tenant's streams in `io`,
/// and waits for it to exit. Bad configuration and bad images fail before a VM is created.
///
/// Two threads share the work. The vCPU thread maps guest memory, writes the system
/// structures, loads the image, asks KVM for the supported CPUID and confines itself with
/// seccomp, while the launching thread creates the VM and the vCPU (the longest KVM calls
/// after that CPUID query); then the launching thread sets the vCPU's registers, registers
/// the memory, writes BootInfo and hands the vCPU over.
pub fn boot(config: &VmConfig, io: GuestIo) -> Result<RunReport, VmError> {
    boot_observed(config, io, |_, _| {})
}

/// As [`boot`], calling `guest_exited` with the guest's exit code (and, if its component ran out
/// of memory, the size it wanted) as soon as it has exited by itself, before the VM is torn
/// down (a supervisor can record the end ~1.5 ms earlier).
pub fn boot_observed(
    config: &VmConfig,
    io: GuestIo,
    guest_exited: impl FnOnce(u8, Option<u64>),
) -> Result<RunReport, VmError> {
    // A snapshot to start from is read and checked before anything else is made: one that
    // does not match or verify fails the launch here, and the caller boots instead.
    let restore = open_restore(config, None)?;
    boot_from(config, io, restore, guest_exited)
}

/// As [`boot_observed`], starting from `restore` ([`open_restore`]'s) if given; a restore plan
/// in `config` without it boots the component as usual.
pub fn boot_from(
    config: &VmConfig,
    io: GuestIo,
    restore: Option<Arc<Snapshot>>,
    guest_exited: impl FnOnce(u8, Option<u64>),
) -> Result<RunReport, VmError> {
    let wall = Instant::now();
    let mut phases = Phases::default();
    // Validation: no KVM object exists yet.
    let memory_size = memory::size_from_mib(config.memory_mib)?;
    let image = load_image(config, memory_size, &mut phases)?;
    let guest_ram = Arc::new(std::sync::OnceLock::new());
    let parts = LaunchParts::open(config, &mut phases, &guest_ram)?;
    let shape = Shape {
        artifact_window: parts.artifact_len(),
        for_component: parts.artifact.is_some(),
        exception_handlers: config.exception_handlers,
    };
    let from = CreateFrom { restore: restore.clone(), artifact: parts.artifact.as_ref() };
    let (core, vcpu) = Core::create(config, memory_size, image, shape, true, from, &mut phases)?;
    let mut device = None;
    let mut sink = None;
    if let Some(snap) = &restore {
        if snap.header.identity.tsc_khz != core.clocks.tsc_khz {
            let path = snap.path().to_owned();
            return Err(crate::snapshot::SnapshotError::Mismatch { path, what: "TSC frequency" }.into());
        }
        if let Some(saved) = &snap.header.device {
            device = Some(timed(&mut phases.vcpu_setup, || prepare_device(&core, Some(saved)))?);
        }
    } else if let Some(plan) = making(config) {
        sink = Some(snapshot_sink(config, &core, memory_size, plan)?);
    }
    let attached = core.attach(config, parts, device, &guest_ram, &mut phases)?;
    // The snapshot's vCPU state (registers past its `Ready`), over the boot's.
    if let Some(snap) = &restore {
        timed(&mut phases.vcpu_setup, || snap.restore_vcpu(&vcpu))?;
    }
    if config.confine_launcher {
        confine_launcher()?;
    }
    let t = Instant::now();
    let runner = VcpuRunner {
        vcpu,
        mem: core.mem.clone(),
        io,
        deadline: t + config.timeout,
        started: t,
        kick: Arc::new(AtomicBool::new(false)),
        vsock: attached.vsock_handle,
        launch: None,
        snapshot: sink,
    };
    let kick = runner.kick.clone();
    core.vcpu_thread.start(runner)?;
    let mut report = core.finish(config, attached.rest, kick, t, phases, wall, guest_exited)?;
    report.restored = restore.is_some();
    Ok(report)
}

/// The plan of a launch that makes a snapshot.
fn making(config: &VmConfig) -> Option<&SnapshotPlan> {
    config.snapshot.as_ref().filter(|p| p.mode != SnapshotMode::Restore)
}

/// What a snapshot for `config` must be of (its TSC frequency: `tsc_khz`, 0 until known).
fn identity(config: &VmConfig, guest_image: String, memory_size: u64, tsc_khz: u64, plan: &SnapshotPlan) -> Identity {
    Identity {
        version: env!("CARGO_PKG_VERSION").to_string(),
        key: plan.key.clone(),
        guest_image,
        memory_size,
        cpu_features_masked: config.cpu_features_masked.0,
        tsc_khz,
        http: config.http,
        vsock: config.vsock.is_some(),
        exception_handlers: config.exception_handlers,
    }
}

/// Opens the file a snapshot is written to (in place, sized for the whole RAM image, sparse).
fn snapshot_sink(
    config: &VmConfig,
    core: &Core,
    memory_size: u64,
    plan: &SnapshotPlan,
) -> Result<crate::vcpu::SnapshotSink, VmError> {
    let io = |source| VmError::Snapshot(crate::snapshot::SnapshotError::Io { path: plan.path.clone(), source });
    let file = match config.files.as_ref().and_then(|f| f.snapshot.as_ref()) {
        Some(file) => file.try_clone().map_err(io)?,
        None => std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&plan.path).map_err(io)?,
    };
    file.set_len(crate::snapshot::RAM_OFFSET + memory_size).map_err(io)?;
    let identity = identity(config, core.image.identity(), memory_size, core.clocks.tsc_khz, plan);
    let stop = plan.mode == SnapshotMode::MakeOnly;
    Ok(crate::vcpu::SnapshotSink { file, path: plan.path.clone(), identity, stop })
}

/// A vsock device registered with `core`'s VM, its register page mapped, without a thread or a
/// backend yet: in the state a snapshot `saved`, or reset.
fn prepare_device(
    core: &Core,
    saved: Option<&crate::devices::virtio::vsock::DeviceSnapshot>,
) -> Result<PreparedDevice, VmError> {
    let page = Arc::new(RegisterPage::new().map_err(VmError::Vsock)?);
    register_page(&core.vm, core.mem.num_regions() as u32 + 1, &page)?;
    let mut device = VsockDevice::new(core.mem.clone(), Box::new(NotLaunched), None);
    if let Some(saved) = saved {
        device.restore(saved).map_err(|e| VmError::Vsock(format!("cannot restore the vsock device: {e}")))?;
    }
    let device = device.with_register_page(page.clone());
    let worker = VsockWorker::prepare(&core.vm, device).map_err(|e| VmError::Vsock(e.to_string()))?;
    Ok(PreparedDevice { worker, page })
}

/// A VM booted ahead of its launch (the daemon's pool): its guest has set itself up and waits
/// (`AwaitLaunch`) for a component, which [`ReadyVm::launch`] hands it with a tenant's config.
/// Guest RAM, the system structures, the image, the vCPU and the guest's own boot are behind
/// it; the artifact's mapping, the vsock device and BootInfo's launch fields are the launch's.
///
/// Until the launch its threads are not confined: the guest has run only its own boot, which
/// reads nothing a tenant gave. At the launch the vCPU thread confines itself before the guest
/// runs again, and the launching thread does so if the launch's config says to.
pub struct ReadyVm {
    core: Core,
    /// The vsock device, made and brought up by the guest before the launch; its worker thread
    /// and its backend (capabilities, host sockets) are the launch's.
    device: PreparedDevice,
    launch: mpsc::SyncSender<crate::vcpu::Launch>,
    kick: Arc<AtomicBool>,
    /// What the launch must agree with (see [`ReadyVm::fits`]).
    template: VmConfig,
    /// The pre-boot's phases (`guest_run`: from the vCPU's start to the guest's wait).
    pub phases: Phases,
}

/// Boots `template`'s guest (its memory size, image, CPU mask; no component and no strings; a
/// vsock device without a backend, which the guest brings up) until the guest waits for its
/// launch. Fails as [`boot`] does, or if the guest does
/// not reach its wait within `template.timeout`.
pub fn boot_ready(template: &VmConfig, io: GuestIo) -> Result<ReadyVm, VmError> {
    let wall = Instant::now();
    let mut phases = Phases::default();
    let memory_size = memory::size_from_mib(template.memory_mib)?;
    let image = load_image(template, memory_size, &mut phases)?;
    let shape = Shape {
        artifact_window: ARTIFACT_MAX_SIZE,
        for_component: true,
        exception_handlers: template.exception_handlers,
    };
    let from = CreateFrom { restore: None, artifact: None };
    let (core, vcpu) = Core::create(template, memory_size, image, shape, false, from, &mut phases)?;
    let (device, vsock) = timed(&mut phases.vcpu_setup, || -> Result<_, VmError> {
        let device = prepare_device(&core, None)?;
        let handle = device.worker.vcpu_handle().map_err(|e| VmError::Vsock(e.to_string()))?;
        Ok((device, handle))
    })?;
    timed(&mut phases.vcpu_setup, || -> Result<(), VmError> {
        let strings = BootStrings::new(&[], &[])?;
        let mut info = bootinfo::build(memory_size, core.image.end(), core.clocks_now(), [0; 32], &strings);
        // The guest brings its device up while it waits: its register exits are paid here.
        info.flags = wasmvisor_abi::boot::BOOT_FLAG_AWAIT_LAUNCH | wasmvisor_abi::boot::BOOT_FLAG_VSOCK;
        info.cpu_features_masked = template.cpu_features_masked.0;
        Ok(bootinfo::write(&core.mem, &info, &strings)?)
    })?;
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let (launch_tx, launch_rx) = mpsc::sync_channel(1);
    let t = Instant::now();
    let runner = VcpuRunner {
        vcpu,
        mem: core.mem.clone(),
        io,
        // Until the launch the guest only waits for it; the readiness wait below bounds its boot.
        deadline: t + Duration::from_secs(365 * 24 * 3600),
        started: t,
        kick: Arc::new(AtomicBool::new(false)),
        vsock: Some(vsock),
        launch: Some(crate::vcpu::LaunchWait { ready: ready_tx, launch: launch_rx }),
        snapshot: None,
    };
    let kick = runner.kick.clone();
    core.vcpu_thread.start(runner)?;
    match ready_rx.recv_timeout(template.timeout) {
        Ok(()) => {
            phases.guest_run = t.elapsed();
            phases.wall = wall.elapsed();
            // The template's open files served the boot; the launch brings its own.
            let template = VmConfig { files: None, ..template.clone() };
            Ok(ReadyVm { core, device, launch: launch_tx, kick, template, phases })
        }
        // The guest stopped (or would not stop) before it waited: the run's own report says why.
        Err(waited) => {
            drop(launch_tx);
            // One past its time is kicked out at once, not after a second wait.
            let timeout = match waited {
                mpsc::RecvTimeoutError::Timeout => Duration::ZERO,
                mpsc::RecvTimeoutError::Disconnected => template.timeout,
            };
            let template = &VmConfig { timeout, files: None, ..template.clone() };
            let rest =
                AttachedRest { worker: Some(device.worker), register_page: Some(device.page), ..Default::default() };
            let failed = core.finish(template, rest, kick, t, phases, wall, |_, _| {});
            Err(match failed {
                Err(e) => e,
                Ok(run) => VmError::Guest(GuestFailure {
                    reason: FailureReason::RunFailed(format!(
                        "the pre-booted guest exited with {} instead of waiting for its launch",
                        run.exit_code
                    )),
                    rip: None,
                    symbol: None,
                    console_tail: Vec::new(),
                }),
            })
        }
    }
}

impl ReadyVm {
    /// Whether `config` can launch in this VM: what the guest's own boot depended on must be
    /// the same (memory size, image, exception handlers, CPU mask); else the reason.
    pub fn fits(&self, config: &VmConfig) -> Result<(), String> {
        fits_template(&self.template, config)
    }

    /// Launches `config` (which [`fits`](Self::fits)) in this VM and waits for the guest's end,
    /// as [`boot_observed`] does. The artifact is mapped, the device started and BootInfo
    /// rewritten before the guest resumes; the report's phases are the launch's only. With
    /// `restore` ([`open_restore`]'s for this VM) the snapshot's RAM goes over this VM's and
    /// its device and vCPU state are taken first; without it a restore plan in `config` is
    /// not used and the guest loads the component itself.
    pub fn launch(
        self,
        config: &VmConfig,
        restore: Option<Arc<Snapshot>>,
        guest_exited: impl FnOnce(u8, Option<u64>),
    ) -> Result<RunReport, VmError> {
        self.fits(config)
            .map_err(|why| VmError::Host { what: "launch in the pre-booted VM", source: std::io::Error::other(why) })?;
        let wall = Instant::now();
        let mut phases = Phases::default();
        let memory_size = self.core.memory_size;
        let Self { core, device, launch, kick, .. } = self;
        let mut vcpu_restore = None;
        if let Some(snap) = &restore {
            timed(&mut phases.memory, || -> Result<(), VmError> {
                let (copied, zeroed) = snap.overwrite_ram(&core.mem)?;
                tracing::debug!(copied, zeroed, "snapshot RAM in place of the pre-booted guest's");
                if let Some(saved) = &snap.header.device {
                    let mut dev = device.worker.device().lock().unwrap_or_else(|e| e.into_inner());
                    dev.restore(saved).map_err(|e| VmError::Vsock(format!("cannot restore the vsock device: {e}")))?;
                }
                Ok(())
            })?;
            vcpu_restore = Some(snap.vcpu_state());
        }
        let sink = match making(config) {
            Some(plan) => Some(snapshot_sink(config, &core, memory_size, plan)?),
            None => None,
        };
        let guest_ram = Arc::new(std::sync::OnceLock::new());
        let parts = LaunchParts::open(config, &mut phases, &guest_ram)?;
        let attached = core.attach(config, parts, Some(device), &guest_ram, &mut phases)?;
        if config.confine_launcher {
            confine_launcher()?;
        }
        let t = Instant::now();
        let handed = launch.send(crate::vcpu::Launch {
            deadline: t + config.timeout,
            started: t,
            restore: vcpu_restore,
            snapshot: sink,
        });
        if handed.is_err() {
            // The vCPU thread has ended (the guest stopped while it waited): its report says why.
            tracing::debug!("the pre-booted vCPU ended before its launch");
        }
        let mut report = core.finish(config, attached.rest, kick, t, phases, wall, guest_exited)?;
        report.restored = restore.is_some();
        Ok(report)
    }
}

/// Whether `config` can launch in a VM pre-booted from `template` ([`boot_ready`]): what the
/// guest's own boot depended on must be the same (memory size, image, KVM device, exception
/// handlers, CPU mask); else the reason.
pub fn fits_template(template: &VmConfig, config: &VmConfig) -> Result<(), String> {
    let t = template;
    if config.memory_mib != t.memory_mib {
        return Err(format!("it has {} MiB of RAM, the launch wants {}", t.memory_mib, config.memory_mib));
    }
    if config.guest != t.guest || config.kvm_device != t.kvm_device {
        return Err("it runs another guest image or KVM device".into());
    }
    if config.exception_handlers != t.exception_handlers || config.cpu_features_masked != t.cpu_features_masked {
        return Err("its guest was booted with other CPU settings".into());
    }
    if config.cpu_report {
        return Err("a feature-report boot is not a launch".into());
    }
    Ok(())
}

/// Confines the launching thread: from here on it only waits, kicks, tears down and reports.
fn confine_launcher() -> Result<(), VmError> {
    seccomp::apply(ThreadRole::Launcher)
        .map_err(|e| VmError::Host { what: "confine the launching thread", source: std::io::Error::other(e) })
}

/// Reads and checks the guest image (it must fit `memory_size`): before any KVM object exists.
fn load_image(config: &VmConfig, memory_size: u64, phases: &mut Phases) -> Result<Arc<GuestImage>, VmError> {
    let image = timed(&mut phases.image_load, || -> Result<GuestImage, ImageError> {
        let image = match &config.files {
            None => GuestImage::open(&config.guest)?,
            Some(files) => {
                let read_err = |source| ImageError::Read { path: config.guest.clone(), source };
                GuestImage::from_file(&config.guest, files.guest.try_clone().map_err(read_err)?)?
            }
        };
        image.check_fits(memory_size)?;
        Ok(image)
    })?;
    Ok(Arc::new(image))
}

/// What a launch brings to a VM: its artifact mapped, its strings checked, its capabilities
/// opening (on a thread, while the VM is built), its host socket bound, its random seed.
struct LaunchParts {
    artifact: Option<FileMapping>,
    strings: BootStrings,
    vsock: Option<OpeningDevice>,
    socket_file: Option<SocketFile>,
    seed: [u8; 32],
}

/// The vsock device's parts while its capabilities open.
struct OpeningDevice {
    opening: std::thread::JoinHandle<Result<Box<dyn CapabilityService>, VmError>>,
    listener: Option<std::os::unix::net::UnixListener>,
    uds_path: Option<PathBuf>,
}

impl LaunchParts {
    fn open(
        config: &VmConfig,
        phases: &mut Phases,
        guest_ram: &Arc<std::sync::OnceLock<GuestRam>>,
    ) -> Result<Self, VmError> {
        let artifact = match &config.component {
            None => None,
            Some(path) => Some(timed(&mut phases.image_load, || {
                let opened = config.files.as_ref().and_then(|f| f.artifact.as_ref());
                match opened {
                    None => FileMapping::open(path, ARTIFACT_MAX_SIZE),
                    Some(file) => file.try_clone().and_then(|f| FileMapping::from_file(path, f, ARTIFACT_MAX_SIZE)),
                }
                .map_err(|source| VmError::Artifact { path: path.clone(), source })
            })?),
        };
        let strings = BootStrings::new(&config.args, &config.env)?;
        let mut socket_file = None;
        // The tenant's providers open (redb checks its file: milliseconds) on a thread of their
        // own while the VM is built; the socket is bound here, so that a bad path fails first.
        let vsock = match &config.vsock {
            None => None,
            Some(v) => {
                let listener = bind_listener(v.uds_path.as_deref())?;
                socket_file = v.uds_path.clone().map(SocketFile);
                let capabilities = v.capabilities.clone();
                let ram = Arc::clone(guest_ram);
                let opening = std::thread::Builder::new()
                    .name("providers".into())
                    .spawn(move || {
                        let t = Instant::now();
                        let service = open_capabilities(capabilities, ram);
                        tracing::debug!(elapsed = ?t.elapsed(), "capability providers opened");
                        service
                    })
                    .map_err(|source| VmError::Host { what: "spawn the thread that opens the providers", source })?;
                Some(OpeningDevice { opening, listener, uds_path: v.uds_path.clone() })
            }
        };
        let seed = bootinfo::random_seed().map_err(|source| VmError::Host { what: "read the random seed", source })?;
        Ok(Self { artifact, strings, vsock, socket_file, seed })
    }

    fn artifact_len(&self) -> u64 {
        self.artifact.as_ref().map_or(0, |a| a.len() as u64)
    }
}

/// How guest RAM is laid out for what will run: the artifact window its page tables map, and
/// whether a component runs (huge pages, a pre-populated heap, the image copied into RAM),
/// and whether the exception-reporting IDT is installed.
#[derive(Clone, Copy)]
struct Shape {
    artifact_window: u64,
    for_component: bool,
    exception_handlers: bool,
}

/// What a VM is created from besides its config: a snapshot to restore (its RAM, then its
/// vCPU state), and the artifact, whose slot a fresh VM gets at its creation.
struct CreateFrom<'a> {
    restore: Option<Arc<Snapshot>>,
    artifact: Option<&'a FileMapping>,
}

/// A VM with its RAM registered and its vCPU set up, and the thread that will run it.
struct Core {
    kvm: Kvm,
    vm: VmFd,
    flavor: KvmFlavor,
    mem: GuestMemoryMmap,
    image: Arc<GuestImage>,
    memory_size: u64,
    vcpu_thread: VcpuThread,
    stats: Option<crate::kvm::VcpuStats>,
    /// The guest TSC and the wall clock, read together once, and when.
    clocks: Clocks,
    clocks_at: Instant,
    /// The artifact's slot was added at the VM's creation.
    artifact_slot: bool,
}

/// A pre-booted VM's vsock device: registered, its register page mapped, no thread yet.
struct PreparedDevice {
    worker: VsockWorker,
    page: Arc<RegisterPage>,
}

/// The capability port of a device whose VM has not been launched: nothing to serve.
struct NotLaunched;

impl CapabilityService for NotLaunched {
    fn handle(&mut self, _: &[u8], _: &mut Vec<u8>) -> Result<(), wasmvisor_providers::RelayError> {
        Err(wasmvisor_providers::RelayError::Relay("the VM has not been launched".into()))
    }
}

/// What [`Core::attach`] set up for one launch.
#[derive(Default)]
struct Attached {
    vsock_handle: Option<crate::devices::virtio::worker::VsockVcpuHandle>,
    rest: AttachedRest,
}

/// What a launch holds until its VM is gone.
#[derive(Default)]
struct AttachedRest {
    worker: Option<VsockWorker>,
    /// Kept until the VM is gone: KVM maps it.
    register_page: Option<Arc<RegisterPage>>,
    artifact: Option<FileMapping>,
    socket_file: Option<SocketFile>,
}

impl Core {
    /// Two threads share the work. The vCPU thread maps guest memory, writes the system
    /// structures, loads the image, asks KVM for the supported CPUID (and confines itself with
    /// seccomp if `confine_vcpu`), while this thread creates the VM and the vCPU (the longest
    /// KVM calls after that CPUID query); then this thread registers the memory and sets the
    /// vCPU's registers. Returns the vCPU, for the caller to hand to the vCPU thread.
    fn create(
        config: &VmConfig,
        memory_size: u64,
        image: Arc<GuestImage>,
        shape: Shape,
        confine_vcpu: bool,
        from: CreateFrom<'_>,
        phases: &mut Phases,
    ) -> Result<(Self, VcpuFd), VmError> {
        let CreateFrom { restore, artifact } = from;
        if !config.supported_cpuid.is_empty() {
            arch::cpu::preset_supported_cpuid(&config.supported_cpuid)
                .map_err(|e| VmError::Host { what: "use the supervisor's CPUID", source: std::io::Error::other(e) })?;
        }
        crate::vcpu::install_kick_handler().map_err(|e| VmError::Host {
            what: "install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let vcpu_thread = VcpuThread::spawn(
            memory_size,
            shape,
            image.clone(),
            KvmSource::of(config)?,
            config.kvm_device.clone(),
            confine_vcpu,
            restore.clone().map(|s| (s, config.snapshot.as_ref().map(|p| p.ram).unwrap_or_default())),
        )?;
        let (kvm, vm) = timed(&mut phases.vm_create, || -> Result<(Kvm, VmFd), VmError> {
            let kvm = KvmSource::of(config)?.open(&config.kvm_device)?;
            let vm = kvm.create_vm().map_err(setup_err("create the VM (KVM_CREATE_VM)"))?;
            Ok((kvm, vm))
        })?;
        if let Some(artifact) = artifact {
            // Its read-only slot first, while the VM is empty: in a VM restored from a snapshot,
            // adding it after the RAM and vCPU were in place took KVM 4-11 ms instead of ~20 us
            // (the cost then shows at the VM's teardown instead, after the guest's exit).
            timed(&mut phases.memory, || register_artifact(&vm, ARTIFACT_SLOT, artifact))?;
        }
        let flavor = kvm_flavor();
        tracing::debug!(%flavor, "KVM");
        let vcpu = timed(&mut phases.vcpu_setup, || vm.create_vcpu(0).map_err(setup_err("create the vCPU")))?;
        let stats = if config.kvm_exit_stats { crate::kvm::VcpuStats::open(&vcpu) } else { None };
        let prepared = vcpu_thread.prepared()?;
        phases.memory += prepared.memory;
        phases.image_load += prepared.image_load;
        phases.vcpu_setup += prepared.cpuid_time;
        let mem = prepared.mem;
        timed(&mut phases.memory, || register_memory(&vm, &mem))?;
        let clocks = timed(&mut phases.vcpu_setup, || -> Result<Clocks, VmError> {
            // SysV entry: RSP + 8 is 16-byte aligned, as after a `call`.
            arch::cpu::setup(&kvm, &vcpu, &prepared.cpuid, image.entry(), STACK_TOP - 8, BOOT_INFO_GPA)?;
            clocks(&vcpu)
        })?;
        let core = Self {
            kvm,
            vm,
            flavor,
            mem,
            image,
            memory_size,
            vcpu_thread,
            stats,
            clocks,
            clocks_at: Instant::now(),
            artifact_slot: artifact.is_some(),
        };
        Ok((core, vcpu))
    }

    /// The guest TSC and the wall clock now, from the pair read at creation (the TSC runs at
    /// `tsc_khz`): a pre-booted VM's vCPU belongs to its thread by its launch.
    fn clocks_now(&self) -> Clocks {
        let elapsed = self.clocks_at.elapsed();
        let ticks = (elapsed.as_nanos() * u128::from(self.clocks.tsc_khz) / 1_000_000) as u64;
        let wall_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Clocks {
            tsc_khz: self.clocks.tsc_khz,
            boot_tsc: if self.clocks.boot_tsc == 0 { 0 } else { self.clocks.boot_tsc.wrapping_add(ticks) },
            wall_ns,
        }
    }

    /// Gives the VM its launch: the artifact's read-only slot, BootInfo (memory map, clocks,
    /// seed, strings, flags), and the vsock device with its worker thread.
    /// A pre-booted VM's `device` exists already (the vCPU thread has its handle): it gets the
    /// launch's backend and its worker thread.
    fn attach(
        &self,
        config: &VmConfig,
        parts: LaunchParts,
        device: Option<PreparedDevice>,
        guest_ram: &Arc<std::sync::OnceLock<GuestRam>>,
        phases: &mut Phases,
    ) -> Result<Attached, VmError> {
        let LaunchParts { artifact, strings, vsock, socket_file, seed } = parts;
        let artifact_len = artifact.as_ref().map_or(0, |a| a.len() as u64);
        // A fresh VM has its artifact's slot from its creation; a pre-booted one gets it now.
        if let Some(artifact) = artifact.as_ref().filter(|_| !self.artifact_slot) {
            timed(&mut phases.memory, || register_artifact(&self.vm, ARTIFACT_SLOT, artifact))?;
        }
        timed(&mut phases.vcpu_setup, || -> Result<(), VmError> {
            let mut info = bootinfo::build(self.memory_size, self.image.end(), self.clocks_now(), seed, &strings);
            if artifact_len > 0 {
                info.push_region(ARTIFACT_GPA, artifact_len, MemoryKind::Component);
            }
            if config.report_guest_phases {
                info.flags |= wasmvisor_abi::boot::BOOT_FLAG_REPORT_PHASES;
            }
            if vsock.is_some() {
                info.flags |= wasmvisor_abi::boot::BOOT_FLAG_VSOCK;
            }
            if config.cpu_report {
                info.flags |= wasmvisor_abi::boot::BOOT_FLAG_CPU_REPORT;
            }
            if config.http {
                info.flags |= wasmvisor_abi::boot::BOOT_FLAG_HTTP;
            }
            // A restored guest is past its `Ready` already.
            if making(config).is_some() {
                info.flags |= wasmvisor_abi::boot::BOOT_FLAG_SNAPSHOT;
            }
            if vsock.is_some() && config.vsock.as_ref().is_some_and(VsockConfig::has_preopens) {
                info.flags |= wasmvisor_abi::boot::BOOT_FLAG_PREOPENS;
            }
            info.cpu_features_masked = config.cpu_features_masked.0;
            Ok(bootinfo::write(&self.mem, &info, &strings)?)
        })?;
        let mut rest = AttachedRest { artifact, socket_file, ..AttachedRest::default() };
        let join = |opening: std::thread::JoinHandle<Result<Box<dyn CapabilityService>, VmError>>| {
            opening.join().map_err(|_| VmError::Vsock("the thread opening the providers panicked".into()))?
        };
        if let Some(PreparedDevice { mut worker, page }) = device {
            rest.register_page = Some(page);
            if let Some(OpeningDevice { opening, listener, uds_path }) = vsock {
                timed(&mut phases.vcpu_setup, || -> Result<(), VmError> {
                    let broker = join(opening)?;
                    worker.device().lock().unwrap_or_else(|e| e.into_inner()).set_backend(broker, uds_path);
                    worker.run(listener).map_err(|e| VmError::Vsock(e.to_string()))
                })?;
            }
            // Without a device in the launch, it stays as the guest left it, with no thread and
            // no backend (the guest is not told it exists).
            let handle = worker.vcpu_handle().map_err(|e| VmError::Vsock(e.to_string()))?;
            let wake = Arc::clone(worker.wake());
            rest.worker = Some(worker);
            let _ = guest_ram.set(GuestRam { mem: self.mem.clone(), wake: Some(wake) });
            // A pre-booted VM's vCPU thread has its handle since the pre-boot; a restored one
            // takes this.
            return Ok(Attached { vsock_handle: Some(handle), rest });
        }
        if let Some(OpeningDevice { opening, listener, uds_path }) = vsock {
            let worker = timed(&mut phases.vcpu_setup, || {
                let broker = join(opening)?;
                let page = Arc::new(RegisterPage::new().map_err(VmError::Vsock)?);
                register_page(&self.vm, self.mem.num_regions() as u32 + 1, &page)?;
                rest.register_page = Some(page.clone());
                let device = VsockDevice::new(self.mem.clone(), broker, uds_path).with_register_page(page);
                VsockWorker::start(&self.vm, device, listener).map_err(|e| VmError::Vsock(e.to_string()))
            })?;
            rest.worker = Some(worker);
        }
        let wake = rest.worker.as_ref().map(|w| Arc::clone(w.wake()));
        let _ = guest_ram.set(GuestRam { mem: self.mem.clone(), wake });
        let vsock_handle = match &rest.worker {
            None => None,
            Some(w) => Some(w.vcpu_handle().map_err(|e| VmError::Vsock(e.to_string()))?),
        };
        Ok(Attached { vsock_handle, rest })
    }

    /// Waits for the guest's end under the watchdog (`config.timeout` from `started`), tears
    /// the VM down and reports.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        self,
        config: &VmConfig,
        rest: AttachedRest,
        kick: Arc<AtomicBool>,
        started: Instant,
        mut phases: Phases,
        wall: Instant,
        guest_exited: impl FnOnce(u8, Option<u64>),
    ) -> Result<RunReport, VmError> {
        let Self { kvm, vm, flavor, mem, image, stats, vcpu_thread, .. } = self;
        let (outcome, vcpu) = vcpu_thread.wait(kick, config.timeout)?;
        phases.guest_run = started.elapsed();
        if let Ok(code) = outcome.result.as_ref() {
            guest_exited(*code, outcome.out_of_memory);
        }
        let resident_pages = if config.count_resident_pages { memory::resident_pages(&mem) } else { 0 };
        let kvm_exits = stats.map(|s| s.read());

        // The device logged its faults when they happened; the report carries them to the caller.
        let AttachedRest { worker, register_page, artifact, socket_file } = rest;
        let vsock = worker.map(VsockWorker::stop);
        drop(socket_file);
        timed(&mut phases.teardown, || {
            drop(vcpu);
            drop(vm);
            drop(register_page);
            drop(mem);
            drop(artifact);
            drop(kvm);
        });
        phases.wall = wall.elapsed();

        let VcpuOutcome { result, exits, console_tail, cpu_report, out_of_memory, snapshot, .. } = outcome;
        tracing::debug!(?phases, ?exits, resident_pages, "guest stopped");
        match result {
            Ok(exit_code) => Ok(RunReport {
                exit_code,
                phases,
                exits,
                resident_pages,
                flavor,
                vsock,
                kvm_exits,
                cpu_report,
                out_of_memory,
                snapshot,
                restored: false,
            }),
            Err((reason, rip)) => {
                let symbol = rip.and_then(|r| image.symbolize(r));
                Err(VmError::Guest(GuestFailure { reason, rip, symbol, console_tail }))
            }
        }
    }
}

/// The tenant's providers, or a relay to the broker that has them.
fn open_capabilities(
    capabilities: Capabilities,
    guest_ram: Arc<std::sync::OnceLock<GuestRam>>,
) -> Result<Box<dyn CapabilityService>, VmError> {
    match capabilities {
        // Preopened directories mean opening files on the guest's behalf, which the device
        // thread's filter forbids: such a broker runs on a thread of its own, and reads files
        // straight into the guest's buffers.
        Capabilities::InProcess(tenant) if !tenant.preopens().is_empty() => {
            let mut broker = Broker::open(tenant)?;
            broker.place_reads(Box::new(GuestRamReads(guest_ram)));
            Ok(Box::new(BrokerThread::start(broker)?))
        }
        Capabilities::InProcess(tenant) => Ok(Box::new(Broker::open(tenant)?)),
        Capabilities::Refused => Ok(Box::new(NotLaunched)),
        Capabilities::Relay(path) => {
            let fail = |e: std::io::Error| {
                VmError::Vsock(format!("cannot reach the capability broker at {}: {e}", path.display()))
            };
            let stream = std::os::unix::net::UnixStream::connect(&path).map_err(fail)?;
            let mut client = BrokerClient::new(stream).map_err(fail)?;
            // Files the broker opens for the guest come with their descriptors: the device
            // thread reads them into guest RAM itself.
            client.place_reads(Box::new(GuestRamReads(guest_ram)));
            Ok(Box::new(client))
        }
    }
}

/// Guest RAM as a broker in this process places file reads in it, and where the guest waits.
struct GuestRam {
    mem: GuestMemoryMmap,
    wake: Option<Arc<crate::devices::virtio::DeviceWake>>,
}

/// File reads (`FsRead { into }`) read from the page cache straight into guest RAM: one copy,
/// where answering the bytes costs three (into the broker's buffer, into the answer frame, into
/// the guest). The range is the guest's, so it is checked to lie wholly within one region of
/// guest RAM (the artifact is not guest RAM); any other range is answered with the bytes, which
/// the device then refuses to place.
///
/// The read runs on the CPU the guest's vCPU thread sleeps on (it waits for this answer),
/// so that the bytes land in the caches the guest reads them from: read across CPUs, a
/// 64 MiB file took up to twice as long here (2 vCPUs, each read written by one and read by
/// the other).
struct GuestRamReads(Arc<std::sync::OnceLock<GuestRam>>);

impl wasmvisor_providers::PlaceReads for GuestRamReads {
    fn read_at(&mut self, file: &std::fs::File, offset: u64, into: u64, len: usize) -> Option<std::io::Result<usize>> {
        use std::os::fd::AsRawFd;
        let ram = self.0.get()?;
        let slice = ram.mem.get_slice(vm_memory::GuestAddress(into), len).ok()?;
        if let Some(cpu) = ram.wake.as_ref().and_then(|w| w.waiter_cpu()) {
            move_to_cpu(cpu);
        }
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        Some(wasmvisor_providers::read_full(len, offset, |from, at| {
            let at = i64::try_from(at).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: `base..base + len` is guest RAM, mapped for as long as `mem` (held here)
            // lives, as `get_slice` checked; `from < len`, so the kernel writes only within it.
            // No Rust reference to that memory exists (the kernel writes it, as the guest may at
            // the same time: a guest that does not wait for this answer only races itself).
            let n = unsafe { libc::pread(file.as_raw_fd(), base.add(from).cast(), len - from, at) };
            usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
        }))
    }
}

/// Moves the calling thread to `cpu` if it may run there and is elsewhere, and leaves its
/// allowed CPUs as they were (widening the mask again does not move a running thread). Best
/// effort: a refusal leaves the thread where it is.
fn move_to_cpu(cpu: usize) {
    use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
    // SAFETY: sched_getcpu only reads which CPU this thread runs on (-1 if it cannot).
    let here = unsafe { libc::sched_getcpu() };
    if usize::try_from(here).is_ok_and(|here| here == cpu) || cpu >= CpuSet::MAX_CPU {
        return;
    }
    let Ok(allowed) = sched_getaffinity(None) else { return };
    if !allowed.is_set(cpu) {
        return;
    }
    let mut only = CpuSet::new();
    only.set(cpu);
    if sched_setaffinity(None, &only).is_ok() {
        let _ = sched_setaffinity(None, &allowed);
    }
}

/// A broker on a thread of its own (seccomp role `Broker`), to which the device thread hands
/// each request frame and waits for the answer.
struct BrokerThread {
    /// A request body and a buffer for its answer (the last answer's, given back).
    requests: std::sync::mpsc::Sender<(Vec<u8>, Vec<u8>)>,
    answers: std::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    /// Buffers going back and forth, so that a 960 KiB answer is not a fresh allocation (and
    /// its page faults) each time.
    spare: Vec<u8>,
}

impl BrokerThread {
    fn start(mut broker: Broker) -> Result<Self, VmError> {
        let (requests, inbox) = std::sync::mpsc::channel::<(Vec<u8>, Vec<u8>)>();
        let (outbox, answers) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("broker".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadRole::Broker) {
                    let _ = outbox.send(Err(e.to_string()));
                    return;
                }
                // Ends when the device (the sender) is gone.
                while let Ok((body, mut out)) = inbox.recv() {
                    out.clear();
                    let answer = broker.handle(&body, &mut out).map(|()| out).map_err(|e| e.to_string());
                    if outbox.send(answer).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| VmError::Host { what: "spawn the capability broker's thread", source })?;
        Ok(Self { requests, answers, spare: Vec::new() })
    }
}

impl CapabilityService for BrokerThread {
    fn handle(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), wasmvisor_providers::RelayError> {
        let gone = || wasmvisor_providers::RelayError::Relay("the broker thread is gone".into());
        self.requests.send((body.to_vec(), std::mem::take(&mut self.spare))).map_err(|_| gone())?;
        let mut answer = self.answers.recv().map_err(|_| gone())?.map_err(wasmvisor_providers::RelayError::Relay)?;
        if out.is_empty() {
            // The caller's buffer goes back as the next answer's.
            std::mem::swap(out, &mut answer);
        } else {
            out.extend_from_slice(&answer);
        }
        self.spare = answer;
        Ok(())
    }
}

/// Heap bytes backed up front when the guest will run a component (see `prepare`).
const PREPOPULATE_FOR_COMPONENT: u64 = 2 << 20;

/// What the vCPU thread prepares while the launching thread creates the VM and vCPU.
struct Prepared {
    mem: GuestMemoryMmap,
    memory: Duration,
    image_load: Duration,
    cpuid: kvm_bindings::CpuId,
    cpuid_time: Duration,
}

/// Maps guest memory, writes the system structures, loads the image and asks KVM for the
/// supported CPUID.
fn prepare(
    memory_size: u64,
    shape: Shape,
    image: &GuestImage,
    kvm: KvmSource,
    kvm_device: &std::path::Path,
    restore: Option<(&Snapshot, crate::snapshot::RamRestore)>,
) -> Result<Prepared, VmError> {
    let t = Instant::now();
    let mem = memory::create(memory_size)?;
    if let Some((snap, ram)) = restore {
        // The snapshot's RAM holds the system structures, the image and the ready guest; what
        // it does not hold is zero, as fresh RAM is. Huge pages for that fresh RAM, as in a boot.
        memory::use_huge_pages(&mem, LARGE_PAGE_SIZE);
        let bytes = match ram {
            crate::snapshot::RamRestore::Shared => snap.map_ram(&mem)?,
            crate::snapshot::RamRestore::Copied => snap.copy_ram(&mem)?,
        };
        tracing::debug!(?ram, bytes, elapsed = ?t.elapsed(), "snapshot RAM in place");
        let memory = t.elapsed();
        let t = Instant::now();
        let cpuid = match arch::cpu::cached_supported_cpuid() {
            Some(cpuid) => cpuid,
            None => arch::cpu::supported_cpuid(&kvm.open(kvm_device)?)?,
        };
        return Ok(Prepared { mem, memory, image_load: Duration::ZERO, cpuid, cpuid_time: t.elapsed() });
    }
    if shape.for_component {
        // A component's instantiation writes megabytes of heap (CPython's memory image is
        // 14 MB): one shadow fault per 2 MiB rather than per 4 KiB. Advised before anything
        // touches that RAM, so that every 2 MiB of it can be one host page.
        memory::use_huge_pages(&mem, LARGE_PAGE_SIZE);
    }
    arch::write_system_structures(&mem, memory_size, shape.artifact_window, shape.exception_handlers)?;
    if shape.for_component {
        // A component's linear memory and the runtime's first allocations land at the start
        // of the heap, and wasmtime zeroes linear memory as it allocates it: back those pages
        // now, in parallel with VM creation, rather than page by page under the guest.
        memory::prepopulate(&mem, image.end(), PREPOPULATE_FOR_COMPONENT);
    }
    let memory = t.elapsed();
    let t = Instant::now();
    // A component makes the guest run most of its image: copied into (huge-page) RAM, its code
    // costs a fault per 2 MiB instead of one per 4 KiB page; a bare guest runs little of it.
    image.load(&mem, if shape.for_component { Backing::Copy } else { Backing::PageCache })?;
    let image_load = t.elapsed();
    let t = Instant::now();
    let cpuid = match arch::cpu::cached_supported_cpuid() {
        Some(cpuid) => cpuid,
        None => arch::cpu::supported_cpuid(&kvm.open(kvm_device)?)?,
    };
    Ok(Prepared { mem, memory, image_load, cpuid, cpuid_time: t.elapsed() })
}

/// The vCPU thread, from spawn to the guest's end: it prepares memory and CPUID, confines itself,
/// waits for its vCPU, runs it, and reports.
struct VcpuThread {
    handle: std::thread::JoinHandle<()>,
    prepared_rx: mpsc::Receiver<Result<Prepared, VmError>>,
    start_tx: mpsc::SyncSender<VcpuRunner>,
    done_rx: mpsc::Receiver<(VcpuOutcome, VcpuFd)>,
}

impl VcpuThread {
    fn spawn(
        memory_size: u64,
        shape: Shape,
        image: Arc<GuestImage>,
        kvm: KvmSource,
        kvm_device: PathBuf,
        confine: bool,
        restore: Option<(Arc<Snapshot>, crate::snapshot::RamRestore)>,
    ) -> Result<Self, VmError> {
        let (prepared_tx, prepared_rx) = mpsc::sync_channel(1);
        let (start_tx, start_rx) = mpsc::sync_channel::<VcpuRunner>(1);
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let prepared = prepare(
                    memory_size,
                    shape,
                    &image,
                    kvm,
                    &kvm_device,
                    restore.as_ref().map(|(s, ram)| (&**s, *ram)),
                );
                drop(restore);
                drop(image);
                let ok = prepared.is_ok();
                if prepared_tx.send(prepared).is_err() || !ok {
                    return;
                }
                // Confined before it can receive a vCPU, let alone run one; a pre-booted VM's
                // thread at its launch (`VcpuRunner::launch`), before the guest runs again.
                let confined = if confine { seccomp::apply(ThreadRole::Vcpu) } else { Ok(()) };
                // A closed channel means the launch failed: nothing to run.
                if let Ok(runner) = start_rx.recv() {
                    let _ = done_tx.send(runner.run(confined));
                }
            })
            .map_err(|source| VmError::Host { what: "spawn the vCPU thread", source })?;
        Ok(Self { handle, prepared_rx, start_tx, done_rx })
    }

    fn lost() -> VmError {
        VmError::Host {
            what: "run the vCPU thread",
            source: std::io::Error::other("the vCPU thread ended without a result"),
        }
    }

    /// Waits for the prepared memory.
    fn prepared(&self) -> Result<Prepared, VmError> {
        self.prepared_rx.recv().map_err(|_| Self::lost())?
    }

    /// Hands the vCPU over: the guest runs.
    fn start(&self, runner: VcpuRunner) -> Result<(), VmError> {
        self.start_tx.send(runner).map_err(|_| Self::lost())
    }

    /// Waits for the guest's end, kicking the vCPU out of `KVM_RUN` (setting `kick` first)
    /// when `timeout` passes.
    fn wait(self, kick: Arc<AtomicBool>, timeout: Duration) -> Result<(VcpuOutcome, VcpuFd), VmError> {
        let received = match self.done_rx.recv_timeout(timeout) {
            Ok(out) => Some(out),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kick.store(true, Ordering::Release);
                // Repeat the kick: a signal that lands just before KVM_RUN is entered is lost.
                let give_up = Instant::now() + Duration::from_secs(5);
                loop {
                    let _ = self.handle.kill(vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET);
                    match self.done_rx.recv_timeout(Duration::from_millis(2)) {
                        Ok(out) => break Some(out),
                        Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                        Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > give_up => {
                            return Err(VmError::Host {
                                what: "stop the vCPU after the timeout",
                                source: std::io::Error::other("the vCPU thread does not leave KVM_RUN"),
                            });
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                    }
                }
            }
        };
        let joined = self.handle.join();
        match (received, joined) {
            (Some(out), Ok(())) => Ok(out),
            _ => Err(Self::lost()),
        }
    }
}

/// Registers every region of `mem` as a KVM memory slot.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|e| VmError::Host {
            what: "find guest memory in the host",
            source: std::io::Error::other(e.to_string()),
        })?;
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM: `boot`
        // drops the VM (and vCPU) before the memory.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(setup_err("register guest memory with KVM"))?;
    }
    Ok(())
}

/// The artifact's memory slot (guest RAM is slot 0, the vsock register page slot 2).
const ARTIFACT_SLOT: u32 = 1;

/// Registers the artifact as the read-only slot `slot` at `ARTIFACT_GPA`: a guest write there
/// exits as MMIO instead of reaching the mapping.
fn register_artifact(vm: &VmFd, slot: u32, artifact: &FileMapping) -> Result<(), VmError> {
    {
        let region = kvm_userspace_memory_region {
            slot,
            flags: kvm_bindings::KVM_MEM_READONLY,
            guest_phys_addr: ARTIFACT_GPA,
            memory_size: artifact.mapped_len() as u64,
            userspace_addr: artifact.host_addr(),
        };
        // SAFETY: the artifact mapping is live and outlives the VM (`boot` drops the VM first);
        // the slot is read-only, and the host mapping is read-only too.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(setup_err("register the component artifact with KVM (read-only slot)"))?;
    }
    Ok(())
}

/// The bound vsock socket's file, removed when the launch ends however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the host-initiated vsock socket (`boot` removes it when the VM ends). A leftover
/// socket file nobody listens on (from a VMM that was killed) is replaced; a live one or any
/// other file is an error.
fn bind_listener(path: Option<&std::path::Path>) -> Result<Option<std::os::unix::net::UnixListener>, VmError> {
    use std::os::unix::fs::FileTypeExt;
    let Some(path) = path else { return Ok(None) };
    let fail = |why: String| VmError::Vsock(format!("cannot listen on the vsock socket {}: {why}", path.display()));
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let stale = meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err();
        if !stale {
            return Err(fail("it exists (another VM's socket, or not a socket)".into()));
        }
        std::fs::remove_file(path).map_err(|e| fail(e.to_string()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    Ok(Some(listener))
}

/// Maps the vsock register page read-only at the device's address in slot `slot`: guest reads
/// are served from it without an exit; writes exit as MMIO (or reach the notify ioeventfd).
fn register_page(vm: &VmFd, slot: u32, page: &RegisterPage) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: kvm_bindings::KVM_MEM_READONLY,
        guest_phys_addr: wasmvisor_abi::vsock::VSOCK_MMIO_GPA,
        memory_size: page.len() as u64,
        userspace_addr: page.host_addr(),
    };
    // SAFETY: the page is a live anonymous mapping that `boot` keeps until the VM is dropped;
    // the slot is read-only for the guest, and the host writes it only through volatile copies.
    unsafe { vm.set_user_memory_region(region) }.map_err(setup_err("map the vsock register page (read-only slot)"))
}

/// TSC frequency and the guest TSC paired with the wall clock.
fn clocks(vcpu: &VcpuFd) -> Result<Clocks, VmError> {
    const MSR_IA32_TSC: u32 = 0x10;
    let tsc_khz = u64::from(vcpu.get_tsc_khz().map_err(setup_err("read the TSC frequency (KVM_GET_TSC_KHZ)"))?);
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, ..Default::default() }])
        .map_err(|e| VmError::Host { what: "build an MSR list", source: std::io::Error::other(format!("{e:?}")) })?;
    let read = vcpu.get_msrs(&mut msrs).map_err(setup_err("read the guest TSC"))?;
    let wall_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let boot_tsc = if read == 1 { msrs.as_slice()[0].data } else { 0 };
    Ok(Clocks { tsc_khz, boot_tsc, wall_ns })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress};
    use wasmvisor_providers::PlaceReads;

    use super::*;

    fn file(bytes: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("wasmvisor-placed-{}-{}", std::process::id(), bytes.len()));
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn placed_reads_land_in_guest_ram_only_within_it() {
        let mem = memory::create(1 << 20).unwrap();
        let slot = Arc::new(std::sync::OnceLock::new());
        let mut reads = GuestRamReads(Arc::clone(&slot));
        let f = file(b"0123456789");
        // Before the VM's RAM exists, nothing is placed (the bytes would be answered).
        assert!(reads.read_at(&f, 0, 0x1000, 10).is_none());
        let _ = slot.set(GuestRam { mem: mem.clone(), wake: None });
        assert_eq!(reads.read_at(&f, 2, 0x1000, 4).unwrap().unwrap(), 4);
        let mut got = [0u8; 6];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got, b"2345\0\0");
        // Past the file's end: a short count, the rest of the buffer untouched.
        assert_eq!(reads.read_at(&f, 8, 0x2000, 100).unwrap().unwrap(), 2);
        assert_eq!(reads.read_at(&f, 1 << 40, 0x2000, 100).unwrap().unwrap(), 0);
        // An offset the kernel cannot take is an error, not a panic.
        assert!(reads.read_at(&f, u64::MAX, 0x2000, 1).unwrap().is_err());
        // Ranges that are not wholly guest RAM: refused, nothing written.
        for (gpa, len) in [(1 << 20, 1), ((1 << 20) - 4, 5), (u64::MAX - 2, 10), (0, (1 << 20) + 1)] {
            assert!(reads.read_at(&f, 0, gpa, len).is_none(), "{gpa:#x}+{len}");
        }
        let mut tail = [0u8; 4];
        mem.read_slice(&mut tail, GuestAddress((1 << 20) - 4)).unwrap();
        assert_eq!(tail, [0; 4]);
    }
}
