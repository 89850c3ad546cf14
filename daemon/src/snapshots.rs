//! The daemon's snapshots of components' ready states: which exist, which are being made, and
//! what a launch does with them.
//!
//! A snapshot is of one component artifact run in one shape (memory size, HTTP or command,
//! with or without the vsock device, CPU mask) on this host's guest CPU; its file lives beside
//! the artifact (`wasmvisor::launch::snapshot_path`). None exists until a component's first
//! launch: that launch boots as before and asks for one ([`Snapshots::plan`]), which the
//! supervisor makes in the background, in a pre-booted VMM child of its own that stops at the
//! guest's `Ready` (so the snapshot's page tables are the pool's, and a pooled VM can take it
//! in place of its own RAM). The daemon verifies the file's checksum once, when it is made;
//! launches after that restore from it and check its header only. A snapshot a VMM child
//! refuses (it does not match or fit) is deleted and made again, at most [`MAX_ATTEMPTS`]
//! times per shape. A verified file is recorded beside it (`<snapshot>.verified`, the file's
//! identity: device, inode, size, times), so a daemon that restarts restores from the
//! snapshots an earlier life made, unless a file changed since.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wasmvisor::snapshot::{RamRestore, SnapshotKey, SnapshotMode, SnapshotPlan};
use wasmvisor::vm::VmConfig;

/// Makes of one shape's snapshot before the daemon stops trying.
pub const MAX_ATTEMPTS: u32 = 3;

/// Where one shape's snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A maker runs (this many ran before it).
    Making(u32),
    /// The file is there and verified.
    Ready,
    /// Not there; made this many times already.
    Missing(u32),
}

/// The snapshots this daemon made, by file.
#[derive(Debug, Default)]
pub struct Snapshots {
    enabled: bool,
    states: Mutex<HashMap<PathBuf, State>>,
}

/// What a launch does about its snapshot.
#[derive(Debug)]
pub enum Plan {
    /// Nothing (snapshots are off, one is being made, or making them failed).
    None,
    /// Restore from this.
    Restore(SnapshotPlan),
    /// Boot as before; and make the snapshot in the background with this config.
    Make(Box<VmConfig>),
}

impl Snapshots {
    /// A store that plans snapshots if `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self { enabled, states: Mutex::new(HashMap::new()) }
    }

    fn states(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, State>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the launch of `config` (its artifact set) does about its snapshot, for a guest
    /// whose CPU shows `cpu_features`. A `Make` marks the snapshot as being made: the caller
    /// must call [`made`](Self::made) when its maker ends.
    pub fn plan(&self, config: &VmConfig, cpu_features: u64) -> Plan {
        let Some(artifact) = config.component.as_deref().filter(|_| self.enabled) else { return Plan::None };
        let path = wasmvisor::launch::snapshot_path(artifact, config, cpu_features);
        let key = SnapshotKey {
            component: artifact.file_name().unwrap_or_default().to_string_lossy().into_owned(),
            cpu_features,
        };
        let mut states = self.states();
        let state = match states.get(&path) {
            Some(state) => *state,
            // Made and verified before this daemon started, and still that very file.
            None if wasmvisor::launch::snapshot_verified(&path) => {
                states.insert(path.clone(), State::Ready);
                State::Ready
            }
            None => State::Missing(0),
        };
        match state {
            State::Making(_) => Plan::None,
            State::Missing(n) if n >= MAX_ATTEMPTS => Plan::None,
            State::Ready => Plan::Restore(SnapshotPlan {
                mode: SnapshotMode::Restore,
                path,
                key,
                verified: true,
                ram: RamRestore::Copied,
            }),
            State::Missing(n) => {
                states.insert(path.clone(), State::Making(n));
                let maker = VmConfig {
                    args: Vec::new(),
                    env: Vec::new(),
                    timeout: std::time::Duration::from_secs(30),
                    // The maker stops before the guest would connect to anything: it needs no
                    // tenant's broker (which may be gone by the time it runs) and no socket.
                    vsock: config.vsock.clone().map(|v| wasmvisor::vm::VsockConfig {
                        capabilities: wasmvisor::vm::Capabilities::Refused,
                        uds_path: None,
                        ..v
                    }),
                    files: None,
                    run_as: None,
                    snapshot: Some(SnapshotPlan {
                        mode: SnapshotMode::MakeOnly,
                        path: temporary(&path),
                        key,
                        verified: false,
                        ram: RamRestore::Copied,
                    }),
                    ..config.clone()
                };
                Plan::Make(Box::new(maker))
            }
        }
    }

    /// The maker of `plan`'s snapshot ended: `ok` if its VM wrote it and stopped there. The
    /// file is verified and moved into place, or removed.
    pub fn made(&self, plan: &SnapshotPlan, ok: bool) -> Result<(), String> {
        let tmp = &plan.path;
        let path = final_path(tmp);
        let result = if ok {
            wasmvisor::snapshot::Snapshot::verify(tmp)
                .map_err(|e| e.to_string())
                .and_then(|()| std::fs::rename(tmp, &path).map_err(|e| format!("cannot move it into place: {e}")))
                .map(|()| wasmvisor::launch::mark_snapshot_verified(&path))
        } else {
            Err("its VM did not write it".to_string())
        };
        if result.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        let mut states = self.states();
        let before = match states.get(&path) {
            Some(State::Making(n) | State::Missing(n)) => *n,
            _ => 0,
        };
        let now = if result.is_ok() { State::Ready } else { State::Missing(before + 1) };
        states.insert(path, now);
        result
    }

    /// A VMM child refused the snapshot at `path`: it is removed, to be made again.
    pub fn refused(&self, path: &Path) {
        wasmvisor::launch::remove_snapshot(path);
        let mut states = self.states();
        if states.get(path) == Some(&State::Ready) {
            states.insert(path.to_owned(), State::Missing(1));
        }
    }
}

/// The file a maker writes before it is verified and renamed.
fn temporary(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".making");
    PathBuf::from(tmp)
}

/// The snapshot a maker's file becomes.
fn final_path(tmp: &Path) -> PathBuf {
    let s = tmp.as_os_str().to_string_lossy();
    PathBuf::from(s.strip_suffix(".making").unwrap_or(&s).to_string())
}
