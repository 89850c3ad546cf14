//! Where the guest images and the example components are: the one place the binary, the
//! tests and the benchmarks ask.
//!
//! `scripts/build-guest.sh` builds the guest workspace for `x86_64-unknown-none` into the
//! shared target directory. Lookup order: `$WASMVISOR_GUEST_DIR`, the directory of the
//! running executable (an installed layout), then this workspace's build output.
//! `scripts/build-images.sh` builds the example components (`images/`) for `wasm32-wasip2`.

use std::path::{Path, PathBuf};

/// The production guest.
pub const GUEST: &str = "wasmvisor-guest";
/// The misbehaving guest used by the tests.
pub const TEST_GUEST: &str = "test-guest";
/// Environment variable naming a directory that holds the guest images.
pub const GUEST_DIR_ENV: &str = "WASMVISOR_GUEST_DIR";

fn workspace_dir() -> &'static Path {
    let vmm_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    vmm_dir.parent().unwrap_or(vmm_dir)
}

/// Where `scripts/build-guest.sh` leaves the images in this workspace.
pub fn build_dir() -> PathBuf {
    workspace_dir().join("target/x86_64-unknown-none/release")
}

/// The example component `name` (e.g. `hello`) as `scripts/build-images.sh` builds it.
pub fn component(name: &str) -> PathBuf {
    workspace_dir().join("target/wasm32-wasip2/release").join(format!("{name}.wasm"))
}

/// The example `name` built as a wasm32-wasip1 core module (hello, echo, exit-code, cat).
pub fn preview1_module(name: &str) -> PathBuf {
    workspace_dir().join("target/wasm32-wasip1/release").join(format!("{name}.wasm"))
}

/// The path of guest image `name`. The first candidate that exists wins; if none does, the
/// workspace build path is returned so that the error names where it was expected.
pub fn guest_image(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(GUEST_DIR_ENV) {
        return Path::new(&dir).join(name);
    }
    let beside_exe = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(name)));
    match beside_exe {
        Some(p) if p.is_file() => p,
        _ => build_dir().join(name),
    }
}
