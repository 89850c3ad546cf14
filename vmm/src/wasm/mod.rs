//! Wasm components on the host side: checking what a component imports before any VM exists
//! ([`inspect`]), finding what the cache knows of a component file from its identity
//! ([`index`]), and compiling it ahead of time for the guest with a content-addressed on-disk
//! cache ([`aot`]). The guest only ever sees the compiled artifact, mapped read-only.

pub mod aot;
pub mod index;
pub mod inspect;
pub mod preview1;

use std::path::PathBuf;

/// What went wrong with a component before it could run.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The component path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file changed between the look at its identity and the read of its bytes.
    #[error("{path} changed while wasmvisor was reading it; run again once it is written")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// Not WebAssembly at all.
    #[error("{path} is not a WebAssembly file (no `\\0asm` header)")]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    /// A core module that is not a wasip1 command.
    #[error(
        "{path} is a core WebAssembly module that wasmvisor cannot run: {why}. wasmvisor runs WASI 0.2 \
         components (`cargo build --target wasm32-wasip2`, componentize-py, jco, ...) and wasm32-wasip1 \
         command modules (made components on the fly)"
    )]
    CoreModule {
        /// The file.
        path: PathBuf,
        /// What it lacks.
        why: String,
    },
    /// The binary is malformed.
    #[error("{path} is not a valid component: {why}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        why: String,
    },
    /// It imports an interface wasmvisor does not provide.
    #[error("{path} imports `{import}`, which wasmvisor does not provide ({why})")]
    UnsupportedImport {
        /// The file.
        path: PathBuf,
        /// The import's name.
        import: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// It imports a capability its tenant was not granted.
    #[error(
        "{path} imports `{import}`, but tenant `{tenant}` was not granted the {capability} capability: \
         pass `--grant {capability}` to grant it"
    )]
    NotGranted {
        /// The file.
        path: PathBuf,
        /// The import's name.
        import: String,
        /// The tenant.
        tenant: String,
        /// The capability's `--grant` name.
        capability: &'static str,
    },
    /// It is not a command (no `wasi:cli/run` export).
    #[error("{path} does not export `wasi:cli/run@0.2.x`: it is not a command component (exports: {exports})")]
    NotACommand {
        /// The file.
        path: PathBuf,
        /// What it does export.
        exports: String,
    },
    /// An HTTP component given where a command is run.
    #[error(
        "{path} is an HTTP component (it exports `wasi:http/incoming-handler`, not `wasi:cli/run`): serve it with \
         `wasmvisor serve {path}`"
    )]
    HttpNotCommand {
        /// The file.
        path: PathBuf,
    },
    /// Not an HTTP component (no `wasi:http/incoming-handler` export).
    #[error(
        "{path} does not export `wasi:http/incoming-handler@0.2.x`: it is not an HTTP component (exports: {exports})"
    )]
    NotHttp {
        /// The file.
        path: PathBuf,
        /// What it does export.
        exports: String,
    },
    /// Cranelift could not compile it.
    #[error("cannot compile {path} for the guest: {why}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// wasmtime's message, with its causes.
        why: String,
    },
    /// The artifact cache could not be used.
    #[error("artifact cache {dir}: {source}")]
    Cache {
        /// The cache directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
