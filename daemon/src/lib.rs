//! The `wasmvisor serve` daemon: the host side of many tenants.
//!
//! - [`store`]: the desired state (components and tenants' specs) and the runs' outcomes, in
//!   redb, committed before an answer.
//! - [`supervisor`]: a VMM child process per VM (`wasmvisor::child`), each watched by a thread;
//!   per tenant, the shared log and the capability broker its VMs relay to; reconciliation at
//!   start; restart policies.
//! - [`api`]: the HTTP API (axum) on a Unix socket and optionally TCP with a bearer token, and
//!   its OpenAPI document.
//! - [`frontdoor`]: the HTTP server (hyper) that routes requests by Host to HTTP tenants, and
//!   [`http_pool`]: each HTTP tenant's VMs (scaled between `instances.min` and `max`, queued).
//! - [`metrics`]: Prometheus metrics.
//!
//! [`serve`] ties them together: one tokio runtime for the API and the front door, plain
//! threads for the VMs.

#![forbid(unsafe_code)]

pub mod api;
pub mod error;
pub mod frontdoor;
pub mod http_pool;
pub mod jail;
pub mod metrics;
pub mod outgoing;
pub mod snapshots;
pub mod store;
pub mod supervisor;

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::supervisor::{Settings, Supervisor};

/// How `wasmvisor serve` was asked to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The API's Unix socket.
    pub api_socket: PathBuf,
    /// An extra TCP listener for the API (needs a token).
    pub api_listen: Option<SocketAddr>,
    /// The file holding the bearer token for TCP.
    pub api_token_file: Option<PathBuf>,
    /// The `wasmvisor` binary for the VMM children.
    pub exe: PathBuf,
    /// The guest image.
    pub guest: PathBuf,
    /// The artifact cache.
    pub cache_dir: PathBuf,
    /// Largest component upload, in bytes.
    pub max_component_bytes: usize,
    /// Per-tenant log rotation size, in bytes.
    pub log_limit: u64,
    /// Idle VMM children kept started.
    pub pool_size: usize,
    /// Whether they pre-boot a VM of the default size for the next launch.
    pub pool_pre_boot: bool,
    /// Whether launches start from snapshots of their components' ready states (made in the
    /// background after a component's first launch).
    pub snapshots: bool,
    /// The front door's address (None: no front door).
    pub http_listen: Option<SocketAddr>,
    /// The front door's limits.
    pub http_limits: frontdoor::Limits,
    /// Serve this one HTTP component as tenant `default` on every host (`wasmvisor serve
    /// app.wasm`).
    pub serve_component: Option<PathBuf>,
    /// Jail VMM children from this uid upwards (one per tenant); `None`: do not jail them
    /// (`--insecure-no-jail`).
    pub jail_uid_base: Option<u32>,
    /// Where tenants' preopened directories may be (`--dirs-root`); `None`: nowhere.
    pub dirs_root: Option<PathBuf>,
}

/// The API socket's default path: `$XDG_RUNTIME_DIR/wasmvisor/api.sock`, else `DATA/api.sock`.
pub fn default_api_socket(data_dir: &Path) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("wasmvisor").join("api.sock"),
        _ => data_dir.join("api.sock"),
    }
}

/// The shortest bearer token accepted.
const MIN_TOKEN_LEN: usize = 16;

fn read_token(path: Option<&Path>) -> Result<String, String> {
    let path = path.ok_or("--api-listen needs --api-token-file: the TCP API requires a bearer token")?;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the token in {} must be at least {MIN_TOKEN_LEN} printable characters without spaces",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// Claims the API socket path: refuses if a daemon answers there, removes a stale socket.
fn claim_socket(path: &Path) -> Result<(), String> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!("another wasmvisor daemon is listening on {}", path.display()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => return Err(format!("{} is a directory", path.display())),
        Ok(_) => {
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Uploads `path` and makes it tenant `default`, reached on every host (`*`).
fn serve_default(sup: &Arc<Supervisor>, path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let record = sup.upload(&bytes).map_err(|e| format!("{}: {}", path.display(), e.message))?;
    if record.kind != store::ComponentKind::Http {
        return Err(format!(
            "{} is not an HTTP component (it does not export wasi:http/incoming-handler): run it with `wasmvisor run`",
            path.display()
        ));
    }
    let spec: store::TenantSpec = serde_json::from_value(serde_json::json!({
        "component": record.digest.as_str(),
        "http": { "hosts": ["*"] },
    }))
    .map_err(|e| e.to_string())?;
    sup.put_tenant("default", spec).map_err(|e| format!("cannot serve {}: {}", path.display(), e.message))?;
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT; then stops every VM and returns.
pub fn serve(options: Options) -> Result<(), String> {
    let token = match options.api_listen {
        Some(_) => Some(read_token(options.api_token_file.as_deref())?),
        None => None,
    };
    claim_socket(&options.api_socket)?;
    // Before anything starts: a host that cannot jail refuses to run, naming what it lacks.
    let jail = match options.jail_uid_base {
        Some(base) => Some(Arc::new(jail::Jail::check(base)?)),
        None => {
            tracing::warn!("VMM children run unjailed (--insecure-no-jail): no cgroup, namespaces or uid of their own");
            None
        }
    };
    let dirs_root = match &options.dirs_root {
        Some(root) => Some(
            std::fs::canonicalize(root)
                .ok()
                .filter(|r| r.is_dir())
                .ok_or_else(|| format!("--dirs-root {}: not a directory", root.display()))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let settings = Settings {
        data_dir: options.data_dir.clone(),
        exe: options.exe.clone(),
        guest: options.guest.clone(),
        cache_dir: options.cache_dir.clone(),
        log_limit: options.log_limit,
        pool_size: options.pool_size,
        pool_pre_boot: options.pool_pre_boot,
        snapshots: options.snapshots,
        runtime: runtime.handle().clone(),
        jail,
        dirs_root,
    };
    let sup = Supervisor::start(settings, metrics)?;
    let result = runtime.block_on(async {
        // The front door is bound first: once the API answers, its health names the address.
        if let Some(addr) = options.http_listen {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let bound = listener.local_addr().map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            sup.set_http_addr(bound);
            tracing::info!(addr = %bound, "front door listening");
            tokio::spawn(frontdoor::serve(listener, sup.clone(), options.http_limits.clone()));
        }
        let router = api::router(sup.clone(), options.max_component_bytes);
        // Bound under a temporary name, restricted to the owner, then renamed into place: no
        // moment exists at which another user could connect.
        let socket = &options.api_socket;
        let tmp = socket.with_extension(format!("{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let unix =
            tokio::net::UnixListener::bind(&tmp).map_err(|e| format!("cannot listen on {}: {e}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, socket))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("cannot put the API socket in place at {}: {e}", socket.display())
            })?;
        tracing::info!(socket = %options.api_socket.display(), "API listening");
        let unix_router = router.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(unix, unix_router).await {
                tracing::error!(error = %e, "the API socket failed");
            }
        });
        if let (Some(addr), Some(token)) = (options.api_listen, token) {
            let tcp = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            tracing::info!(%addr, "API listening on TCP (bearer token required)");
            let tcp_router = api::with_token(router, token);
            tokio::spawn(async move {
                if let Err(e) = axum::serve(tcp, tcp_router).await {
                    tracing::error!(error = %e, "the TCP API failed");
                }
            });
        }
        if let Some(path) = &options.serve_component {
            let sup2 = sup.clone();
            let path2 = path.clone();
            tokio::task::spawn_blocking(move || serve_default(&sup2, &path2))
                .await
                .map_err(|e| format!("cannot serve {}: {e}", path.display()))??;
            match sup.http_addr() {
                Some(addr) => eprintln!("Serving HTTP on http://{addr}/"),
                None => eprintln!("wasmvisor: warning: serving the component with no front door (--http-listen none)"),
            }
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
        Ok::<(), String>(())
    });
    // Every VM stops and is reaped before the daemon exits (also on a listener error).
    sup.shutdown();
    let _ = std::fs::remove_file(&options.api_socket);
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    result
}
