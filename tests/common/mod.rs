//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

/// Whether KVM tests can run here: they skip loudly where `/dev/kvm` is absent, and fail when
/// `CI=true`.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but /dev/kvm is missing: KVM tests must run in CI");
    }
    eprintln!("SKIPPED {test}: /dev/kvm is missing on this host");
    false
}

/// A process's stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A process's exit code (it must have exited, not been killed).
pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// A directory under the system's temporary directory, private to this test process, removed
/// when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty `wasmvisor-<name>-<pid>`.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("wasmvisor-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The pids of live (not zombie) processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // After the command's closing parenthesis: state, then the parent's pid.
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) && fields.first() != Some(&"Z") {
            out.push(pid);
        }
    }
    out
}

/// Writes files whose sizes sit at the edges of the guest's file reads (empty, one byte, a
/// frame's chunk and a placed chunk, each one byte either side, and one of several chunks)
/// into `dir`; returns their paths as the guest sees them under `guest` and the lines
/// `fs-probe sum` prints for them (the length and FNV-1a hash of each).
pub fn read_edge_files(dir: &Path, guest: &str) -> (Vec<String>, Vec<String>) {
    use wasmvisor_abi::fs::{FS_CHUNK, FS_PLACED_CHUNK};
    let (frame, placed) = (FS_CHUNK as usize, FS_PLACED_CHUNK as usize);
    let sizes = [0, 1, frame - 1, frame, frame + 1, placed - 1, placed, placed + 1, 2 * placed + frame + 12_345];
    let (mut paths, mut lines) = (Vec::new(), Vec::new());
    for (i, size) in sizes.into_iter().enumerate() {
        let bytes: Vec<u8> = (0..size).map(|b| (b.wrapping_mul(31) ^ i) as u8).collect();
        let name = format!("edge-{size}");
        std::fs::write(dir.join(&name), &bytes).unwrap();
        let hash =
            bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let path = format!("{guest}/{name}");
        lines.push(format!("{path}: ok ({size}, {hash})"));
        paths.push(path);
    }
    (paths, lines)
}
