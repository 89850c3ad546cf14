//! Ahead-of-time compilation for the guest, with a content-addressed artifact cache.
//!
//! The key is the component's BLAKE3 digest ([`ContentDigest`]; a file's is usually known from
//! the component index without reading it, see [`super::index`]) plus a digest of the wasmtime
//! version, the shared engine configuration (`wasmvisor_engine::CONFIG_FINGERPRINT`) and the
//! CPU features the code is compiled for, so the second run of a component skips Cranelift
//! entirely, and a change of any of them compiles afresh. Artifacts are written to a temporary
//! file and renamed into place, so a reader never sees a partial one.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmvisor_engine::wasmtime::{Config, Engine};
use wasmvisor_engine::{CONFIG_FINGERPRINT, TARGET, WASMTIME_VERSION};

use super::WasmError;
use super::index::ContentDigest;

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_ENV: &str = "WASMVISOR_CACHE_DIR";

/// The artifact cache: `$WASMVISOR_CACHE_DIR`, else `$XDG_CACHE_HOME/wasmvisor`, else
/// `$HOME/.cache/wasmvisor`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("wasmvisor")
}

/// The host-side engine: the shared configuration, compiling for the guest target with the
/// given ISA flags.
pub fn engine(isa_flags: &[&str]) -> Result<Engine, String> {
    let mut config: Config = wasmvisor_engine::config();
    config.target(TARGET).map_err(|e| format!("{e:#}"))?;
    for flag in isa_flags {
        // SAFETY: callers pass flags of ISA_FEATURES whose feature the guest reported
        // (`guest_cpu`); code built with a flag the CPU lacks never runs: the guest's wasmtime
        // refuses the artifact at load, checking each flag with the same detection.
        unsafe {
            config.cranelift_flag_enable(flag);
        }
    }
    Engine::new(&config).map_err(|e| format!("{e:#}"))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache file name for `component` compiled with `isa_flags`.
pub fn cache_key(component: &[u8], isa_flags: &[&str]) -> String {
    key_for(&ContentDigest::of(component), isa_flags)
}

/// The cache file name for the component with digest `content` compiled with `isa_flags`.
pub fn key_for(content: &ContentDigest, isa_flags: &[&str]) -> String {
    let mut settings = Sha256::new();
    settings.update(WASMTIME_VERSION.as_bytes());
    settings.update(b"\0");
    settings.update(CONFIG_FINGERPRINT.as_bytes());
    settings.update(b"\0");
    settings.update(TARGET.as_bytes());
    for flag in isa_flags {
        settings.update(b"\0");
        settings.update(flag.as_bytes());
    }
    format!("{}-{}.cwasm", content.hex(), &hex(&settings.finalize())[..16])
}

/// A compiled artifact on disk.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// Its path in the cache.
    pub path: PathBuf,
    /// Whether it was already there.
    pub cache_hit: bool,
}

/// Returns the cached artifact for `component` (read from `path`) compiled with `isa_flags`
/// (the guest's, from `guest_cpu::GuestCpu::isa_flags`), compiling and storing it first if
/// needed.
pub fn compile_cached(
    path: &Path,
    component: &[u8],
    cache_dir: &Path,
    isa_flags: &[&str],
) -> Result<Artifact, WasmError> {
    let digest = ContentDigest::of(component);
    compile_cached_with(path, &digest, cache_dir, isa_flags, || Ok(Cow::Borrowed(component)), || {})
}

/// The cached artifact of the component at `path` whose digest is `digest`, compiled with
/// `isa_flags`. Only on a miss are its bytes asked for (`load`, which must give bytes of that
/// digest) and `on_compile` called, just before compiling (Cranelift runs on every core:
/// wasmtime's `parallel-compilation`).
pub fn compile_cached_with<'a>(
    path: &Path,
    digest: &ContentDigest,
    cache_dir: &Path,
    isa_flags: &[&str],
    load: impl FnOnce() -> Result<Cow<'a, [u8]>, WasmError>,
    on_compile: impl FnOnce(),
) -> Result<Artifact, WasmError> {
    let artifact = cache_dir.join(key_for(digest, isa_flags));
    if artifact.is_file() {
        return Ok(Artifact { path: artifact, cache_hit: true });
    }
    let component = load()?;
    let component = &component[..];
    on_compile();
    let compile_err = |why: String| WasmError::Compile { path: path.to_owned(), why };
    let engine = engine(isa_flags).map_err(compile_err)?;
    let compiled = engine.precompile_component(component).map_err(|e| compile_err(format!("{e:#}")))?;

    let cache_err = |source| WasmError::Cache { dir: cache_dir.to_owned(), source };
    std::fs::create_dir_all(cache_dir).map_err(cache_err)?;
    let tmp = cache_dir.join(format!(
        ".{}.{}.tmp",
        std::process::id(),
        artifact.file_name().and_then(|n| n.to_str()).unwrap_or("artifact")
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&compiled)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &artifact)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(cache_err(e));
    }
    Ok(Artifact { path: artifact, cache_hit: false })
}

#[cfg(test)]
mod tests {
    use wasmvisor_engine::ISA_FEATURES;

    use super::*;

    #[test]
    fn keys_depend_on_content_and_settings() {
        let a = cache_key(b"one", &["has_sse3"]);
        assert_eq!(a, cache_key(b"one", &["has_sse3"]));
        assert_ne!(a, cache_key(b"two", &["has_sse3"]));
        assert_ne!(a, cache_key(b"one", &["has_sse3", "has_avx"]));
        assert!(a.ends_with(".cwasm") && a.len() == 64 + 1 + 16 + 6);
        assert_eq!(a, key_for(&ContentDigest::of(b"one"), &["has_sse3"]));
    }

    #[test]
    fn the_host_engine_builds_for_the_guest_target() {
        engine(&[]).unwrap();
        let every: Vec<&str> = ISA_FEATURES.iter().map(|(flag, _)| *flag).collect();
        engine(&every).unwrap();
    }

    #[test]
    fn bad_components_do_not_compile_or_enter_the_cache() {
        let dir = std::env::temp_dir().join(format!("wasmvisor-aot-test-{}", std::process::id()));
        let err = compile_cached(Path::new("bad.wasm"), b"\0asm\x0d\0\x01\0garbage", &dir, &[]).unwrap_err();
        assert!(err.to_string().starts_with("cannot compile bad.wasm for the guest"), "{err}");
        assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none());
    }
}
