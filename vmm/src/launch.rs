//! The one launch path of a component, shared by `wasmvisor run`, the benchmarks and the tests:
//! read and check it against the tenant's grants ([`Component::open`]), learn the CPU features
//! the guest detects ([`GuestCpu`]), compile for exactly those or find the cached artifact, boot
//! the VM, and recover when the guest still refuses the artifact ([`run`]).
//!
//! Recovery: an artifact the guest rejects is deleted from the cache, whatever the reason. If
//! wasmtime named a CPU setting the guest lacks, the setting is recorded as refused in the
//! cached CPU report and the component is compiled again without it, as many times as it
//! takes down to the baseline; any other rejection of a cached artifact (damaged, or from a
//! build the key does not capture) is compiled again once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasmvisor_providers::Capability;

use crate::guest_cpu::{self, GuestCpu, GuestCpuError};
use crate::hypercall::GuestIo;
use crate::vcpu::FailureReason;
use crate::vm::{self, EXIT_SETUP_FAILED, RunReport, VmConfig, VmError};
use crate::wasm::aot::{self, Artifact};
use crate::wasm::{WasmError, inspect};

/// A component read from disk and checked: its imports are all provided, and every
/// capability it imports was granted.
#[derive(Debug)]
pub struct Component {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The capabilities it imports (each granted).
    pub capabilities: BTreeSet<Capability>,
}

impl Component {
    /// Reads the component at `path` and checks its imports and exports against `grants`.
    pub fn open(path: &Path, grants: &inspect::Grants<'_>) -> Result<Self, WasmError> {
        let bytes = std::fs::read(path).map_err(|source| WasmError::Read { path: path.to_owned(), source })?;
        let interfaces = inspect::interfaces(path, &bytes)?;
        let capabilities = inspect::check(path, &interfaces, grants)?;
        Ok(Self { path: path.to_owned(), bytes, capabilities })
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

/// Runs `component` in the VM `config` describes (its `component` field is set here), with
/// artifacts in `cache_dir`; `io` gives the guest's streams for each boot (a recompile boots
/// again). Reports progress to `events`.
pub fn run(
    component: &Component,
    cache_dir: &Path,
    mut config: VmConfig,
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
        let artifact =
            aot::compile_cached_with(&component.path, &component.bytes, cache_dir, &cpu.isa_flags(), || {
                events(Event::Compiling { bytes: component.bytes.len() })
            })?;
        events(Event::Artifact { artifact: &artifact, elapsed: t.elapsed() });
        config.component = Some(artifact.path.clone());
        let failure = match vm::boot(&config, io()) {
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
