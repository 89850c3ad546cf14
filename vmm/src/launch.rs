//! The one launch path of a component, shared by `wasmvisor run`, the benchmarks and the tests:
//! identify it (from the component index, or by reading it) and check it against the tenant's
//! grants ([`Component::open`]), learn the CPU features
//! the guest detects ([`GuestCpu`]), compile for exactly those or find the cached artifact, boot
//! the VM, and recover when the guest still refuses the artifact ([`run`]).
//!
//! Recovery: an artifact the guest rejects is deleted from the cache, whatever the reason. If
//! wasmtime named a CPU setting the guest lacks, the setting is recorded as refused in the
//! cached CPU report and the component is compiled again without it, as many times as it
//! takes down to the baseline; any other rejection of a cached artifact (damaged, or from a
//! build the key does not capture) is compiled again once.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasmvisor_providers::Capability;

use crate::guest_cpu::{self, GuestCpu, GuestCpuError};
use crate::hypercall::GuestIo;
use crate::vcpu::FailureReason;
use crate::vm::{self, EXIT_SETUP_FAILED, RunReport, VmConfig, VmError};
use crate::wasm::aot::{self, Artifact};
use crate::wasm::index::{self, ContentDigest};
use crate::wasm::{WasmError, inspect, preview1};

/// A component file, identified and checked: its imports are all provided, and every
/// capability it imports was granted.
#[derive(Debug)]
pub struct Component {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its content digest.
    pub digest: ContentDigest,
    /// Its size in bytes.
    pub size: u64,
    /// Its top-level imports and exports.
    pub interfaces: inspect::Interfaces,
    /// The capabilities it imports (each granted).
    pub capabilities: BTreeSet<Capability>,
    /// Whether the component index knew the file (so its bytes were not read).
    pub indexed: bool,
    /// The file is a wasip1 command module, run as the component the preview 1 adapter makes
    /// of it (`digest` and `size` are the file's; `interfaces` the component's).
    pub preview1: bool,
    /// The component's bytes, when the file was read (the index did not know it).
    bytes: Option<Vec<u8>>,
}

impl Component {
    /// Opens the component at `path` and checks its imports and exports against `grants`.
    /// The index in `cache_dir` gives its digest and interfaces when it knows the file as it is
    /// now; otherwise the file is read, hashed and parsed, and the index told.
    pub fn open(path: &Path, grants: &inspect::Grants<'_>, cache_dir: &Path) -> Result<Self, WasmError> {
        let mut component = Self::identify(path, cache_dir)?;
        component.capabilities = inspect::check(path, &component.interfaces, grants)?;
        Ok(component)
    }

    /// Opens the component at `path` as [`Self::open`] does, checking only that it is one
    /// (its imports are not checked and no capability is recorded).
    pub fn identify(path: &Path, cache_dir: &Path) -> Result<Self, WasmError> {
        use std::io::Read;
        let read_err = |source| WasmError::Read { path: path.to_owned(), source };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let before = index::FileIdentity::of(&file.metadata().map_err(read_err)?);
        let found = |indexed: index::Indexed, bytes: Option<Vec<u8>>| Self {
            path: path.to_owned(),
            digest: indexed.digest,
            size: before.size(),
            interfaces: indexed.interfaces,
            capabilities: BTreeSet::new(),
            indexed: bytes.is_none(),
            preview1: indexed.preview1,
            bytes,
        };
        if let Some(indexed) = index::lookup(cache_dir, &before) {
            return Ok(found(indexed, None));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(before.size()).unwrap_or(0));
        file.read_to_end(&mut bytes).map_err(read_err)?;
        let after = index::FileIdentity::of(&file.metadata().map_err(read_err)?);
        let digest = ContentDigest::of(&bytes);
        let (component, preview1) = preview1::component(path, &bytes)?;
        let indexed = index::Indexed { digest, interfaces: inspect::interfaces(path, &component)?, preview1 };
        let component = component.into_owned();
        // What was hashed is what runs; the index learns it only if nothing wrote meanwhile.
        if before == after {
            index::record(cache_dir, &after, &indexed, std::time::SystemTime::now());
        }
        Ok(found(indexed, Some(component)))
    }

    /// The component's bytes: those `open` made, or the file read now, checked against the
    /// digest (and made a component again if it is a wasip1 module).
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>, WasmError> {
        if let Some(bytes) = &self.bytes {
            return Ok(Cow::Borrowed(bytes));
        }
        let bytes = std::fs::read(&self.path).map_err(|source| WasmError::Read { path: self.path.clone(), source })?;
        if ContentDigest::of(&bytes) != self.digest {
            return Err(WasmError::Changed { path: self.path.clone() });
        }
        Ok(Cow::Owned(preview1::component(&self.path, &bytes)?.0.into_owned()))
    }
}

/// What happened on the way to the guest, for the caller to show (`run -v`).
#[derive(Debug)]
pub enum Event<'a> {
    /// The guest's CPU features are known (from the cache, or a feature-report boot).
    GuestCpu(&'a GuestCpu),
    /// The component is not in the artifact cache: compiling it (`bytes` long) starts.
    Compiling {
        /// The component's size.
        bytes: usize,
    },
    /// The artifact is ready: found in the cache, or compiled, in `elapsed`.
    Artifact {
        /// The artifact.
        artifact: &'a Artifact,
        /// Time spent finding or compiling it.
        elapsed: Duration,
    },
    /// The component's snapshot could not be used; it is deleted, and the VM boots and makes
    /// a new one.
    SnapshotDiscarded {
        /// Why.
        why: &'a VmError,
    },
    /// The guest rejected the artifact; it is deleted and the component compiled again.
    Recompiling {
        /// The guest's reason.
        reason: &'a FailureReason,
        /// The CPU setting left out from now on, if the reason named one.
        refused_setting: Option<&'a str>,
    },
}

/// Why a component did not run.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Compiling it or the artifact cache.
    #[error(transparent)]
    Wasm(#[from] WasmError),
    /// Learning the guest's CPU features.
    #[error(transparent)]
    GuestCpu(#[from] GuestCpuError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl LaunchError {
    /// The process exit code this error maps to.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Vm(e) => e.exit_code(),
            Self::Wasm(_) | Self::GuestCpu(_) => EXIT_SETUP_FAILED,
        }
    }
}

/// Compiles `component` for the guest `config` describes, into `cache_dir`, unless its artifact
/// is there already (`wasmvisor compile`: warming the cache ahead of a run). Reports progress to
/// `events` as [`run`] does.
pub fn compile(
    component: &Component,
    cache_dir: &Path,
    config: &VmConfig,
    mut events: impl FnMut(Event<'_>),
) -> Result<Artifact, LaunchError> {
    let cpu = GuestCpu::for_vm(cache_dir, config)?;
    events(Event::GuestCpu(&cpu));
    let t = Instant::now();
    let artifact = artifact(component, cache_dir, &cpu, &mut events)?;
    events(Event::Artifact { artifact: &artifact, elapsed: t.elapsed() });
    Ok(artifact)
}

/// Boots `config` from the artifact's snapshot if there is a usable one, else boots it and
/// makes the snapshot (written beside, renamed into place once whole).
fn with_snapshot(
    config: &mut VmConfig,
    snapshots: crate::snapshot::RamRestore,
    artifact: &Path,
    cpu: &GuestCpu,
    io: &mut impl FnMut() -> GuestIo,
    events: &mut impl FnMut(Event<'_>),
) -> Result<RunReport, VmError> {
    use crate::snapshot::{SnapshotKey, SnapshotMode, SnapshotPlan};
    let path = snapshot_path(artifact, config, cpu.report.detected.0);
    let component = artifact.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let ram = snapshots;
    let key = SnapshotKey { component, cpu_features: cpu.report.detected.0 };
    if path.is_file() {
        let verified = snapshot_verified(&path);
        let plan = SnapshotPlan { mode: SnapshotMode::Restore, path: path.clone(), key: key.clone(), verified, ram };
        config.snapshot = Some(plan);
        match vm::boot(config, io()) {
            Err(why @ VmError::Snapshot(_)) => {
                events(Event::SnapshotDiscarded { why: &why });
                remove_snapshot(&path);
            }
            other => {
                config.snapshot = None;
                // It verified (or was known to): the next restore checks its header only.
                if !verified && !matches!(other, Err(VmError::Snapshot(_))) {
                    mark_snapshot_verified(&path);
                }
                return other;
            }
        }
    }
    let mut tmp = path.clone().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    config.snapshot = Some(SnapshotPlan { mode: SnapshotMode::Make, path: tmp.clone(), key, verified: false, ram });
    let report = vm::boot(config, io());
    config.snapshot = None;
    match &report {
        // Written by this process, whole: its checksum is known good.
        Ok(r) if matches!(r.snapshot, Some(Ok(_))) && std::fs::rename(&tmp, &path).is_ok() => {
            mark_snapshot_verified(&path)
        }
        _ => {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    report
}

/// What a snapshot file was when its checksum was last known good: its identity (device,
/// inode, size, times), kept beside it in `<snapshot>.verified`. A file that is still that
/// file is restored checking its header only; any change (a rewrite, a copy, a touch) and it
/// is verified whole again.
fn verified_marker(path: &Path) -> PathBuf {
    let mut marker = path.as_os_str().to_owned();
    marker.push(".verified");
    PathBuf::from(marker)
}

fn identity_of(path: &Path) -> Option<String> {
    std::fs::metadata(path).ok().map(|m| format!("{:?}", index::FileIdentity::of(&m)))
}

/// Whether the snapshot at `path` is the very file whose checksum was last known good (by
/// this process or an earlier one: `wasmvisor run --snapshot`, or a daemon before a restart).
pub fn snapshot_verified(path: &Path) -> bool {
    let recorded = std::fs::read_to_string(verified_marker(path)).ok();
    recorded.is_some() && recorded == identity_of(path)
}

/// Records that the snapshot at `path`, as it is now, verified whole.
pub fn mark_snapshot_verified(path: &Path) {
    if let Some(identity) = identity_of(path) {
        let _ = std::fs::write(verified_marker(path), identity);
    }
}

/// Removes the snapshot at `path` and its record of verification.
pub fn remove_snapshot(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(verified_marker(path));
}

fn artifact(
    component: &Component,
    cache_dir: &Path,
    cpu: &GuestCpu,
    events: &mut impl FnMut(Event<'_>),
) -> Result<Artifact, WasmError> {
    aot::compile_cached_with(
        &component.path,
        &component.digest,
        cache_dir,
        &cpu.isa_flags(),
        || component.bytes(),
        || events(Event::Compiling { bytes: component.size as usize }),
    )
}

/// Where the snapshot of `artifact` run as `config` describes lives in the cache: beside the
/// artifact, named by what shapes the guest's ready state besides the artifact (memory, mode,
/// CPU mask, the guest's CPU features); the header pins all of it, and more.
pub fn snapshot_path(artifact: &Path, config: &VmConfig, cpu_features: u64) -> PathBuf {
    let shape = format!(
        "{}m-{}{}{}-{:x}-{:x}",
        config.memory_mib,
        if config.http { "h" } else { "c" },
        if config.vsock.is_some() { "v" } else { "n" },
        if config.exception_handlers { "e" } else { "x" },
        config.cpu_features_masked.0,
        cpu_features,
    );
    let mut name = artifact.file_stem().unwrap_or_default().to_os_string();
    name.push(format!(".{shape}.snap"));
    artifact.with_file_name(name)
}

/// Runs `component` in the VM `config` describes (its `component` field is set here), with
/// artifacts in `cache_dir`; `io` gives the guest's streams for each boot (a recompile boots
/// again). Reports progress to `events`.
///
/// With `snapshots` (how to restore RAM), a run starts from the snapshot of the component's
/// ready state in the cache when there is one, and otherwise makes it on the way (the guest
/// goes on once it is written). A snapshot that does not match or verify is deleted and made
/// again.
pub fn run(
    component: &Component,
    cache_dir: &Path,
    mut config: VmConfig,
    snapshots: Option<crate::snapshot::RamRestore>,
    mut io: impl FnMut() -> GuestIo,
    mut events: impl FnMut(Event<'_>),
) -> Result<RunReport, LaunchError> {
    // Bad arguments are refused before any VM, the feature-report boot included.
    vm::check(&config)?;
    let mut cpu = GuestCpu::for_vm(cache_dir, &config)?;
    events(Event::GuestCpu(&cpu));
    let mut recompiled_cached = false;
    loop {
        let t = Instant::now();
        let artifact = artifact(component, cache_dir, &cpu, &mut events)?;
        events(Event::Artifact { artifact: &artifact, elapsed: t.elapsed() });
        config.component = Some(artifact.path.clone());
        let booted = match snapshots {
            Some(ram) => with_snapshot(&mut config, ram, &artifact.path, &cpu, &mut io, &mut events),
            None => vm::boot(&config, io()),
        };
        let failure = match booted {
            Err(VmError::Guest(failure)) if failure.reason.is_artifact_rejected() => failure,
            other => return Ok(other?),
        };
        // The cache never keeps an artifact a guest refused.
        let _ = std::fs::remove_file(&artifact.path);
        let FailureReason::ArtifactRejected(why) = &failure.reason else { unreachable!("checked above") };
        // Each pass either drops a setting the guest refused (finitely many) or is the one
        // recompile of a cached artifact.
        let refused = guest_cpu::refused_setting(why).filter(|flag| cpu.refuse(flag));
        if refused.is_none() && (recompiled_cached || !artifact.cache_hit) {
            return Err(VmError::Guest(failure).into());
        }
        recompiled_cached |= refused.is_none();
        events(Event::Recompiling { reason: &failure.reason, refused_setting: refused });
    }
}
