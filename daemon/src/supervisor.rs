//! The supervisor: turns the desired state into VMM children and reports what they do.
//!
//! It owns, per tenant, the shared parts that outlive any VM: the tenant's log (rotated, with
//! the guest's stdout and stderr and its `wasi:logging` records, in order), its capability
//! broker (key-value store, config, log) behind a Unix socket that the tenant's VMM children
//! relay their guests' capability connections to, and its status. Each run is one VMM child
//! (`wasmvisor __vmm`, [`VmmChild`]) watched by one plain thread: the thread spawned the child
//! and lives exactly as long as it (the child's `PR_SET_PDEATHSIG` fires when the spawning
//! *thread* ends, so a daemon killed with -9 takes every child with it), reads its events, writes
//! its output to the log, records how it ended (durably, so that a restarted daemon knows which
//! runs are done) and applies the restart policy. The VMs' threads are plain threads and the
//! API calls in from `spawn_blocking`; tokio appears only in the tenants' relay accept tasks
//! and the channels that tell the API of status changes and new log lines.
//!
//! Runners: a run's thread is started with its VMM child before the run is decided (from the
//! pool of `Settings::pool_size` idle ones, or fresh while the spec commits); the child gets
//! its config only after the commit, so no guest runs for an uncommitted spec.
//!
//! Ordering: every change of a tenant (put, delete) happens under the tenant table's lock, with
//! the store commit first, so concurrent puts of one tenant are serialised and the last
//! committed is the one that runs. A run belongs to one generation; a newer put cancels it
//! (kills its child) and its thread then records nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use wasmvisor::child::{ChildError, ChildEvent, Stream, VmmChild};
use wasmvisor::guest_cpu::GuestCpu;
use wasmvisor::jail::RunAs;
use wasmvisor::vm::{self, Capabilities, VmConfig, VsockConfig};
use wasmvisor::wasm::{aot, inspect};
use wasmvisor_providers::{Broker, Capability, Preopen, TenantLog, TenantName, rfc3339_utc};

use crate::error::ApiError;
use crate::http_pool::{HttpPool, PoolSpec};
use crate::jail::{Cell, Jail, Limits, VmCgroup};
use crate::metrics::{Metrics, StateLabels};
use crate::store::{
    ComponentKind, ComponentRecord, Digest, Instances, Outcome, Put, RestartPolicy, Store, TenantRecord, TenantSpec,
};

/// A tenant's state, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// A VM is being started.
    Starting,
    /// Its VM runs.
    Running,
    /// Its last run exited (see `exit_code`).
    Exited,
    /// Its last run failed (see `reason`).
    Failed,
    /// Its run was stopped by the daemon (shutdown, replaced).
    Stopped,
}

impl State {
    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Exited => "exited",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    const ALL: [State; 5] = [Self::Starting, Self::Running, Self::Exited, Self::Failed, Self::Stopped];
}

/// What a tenant is doing and has done.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    /// The state.
    pub state: State,
    /// The generation of the spec this status is about.
    pub generation: u64,
    /// The last run's exit code, once it exited.
    pub exit_code: Option<u8>,
    /// Why the last run failed.
    pub reason: Option<String>,
    /// VMs running now.
    pub instances: u32,
    /// The running VMM child's process id.
    pub pid: Option<u32>,
    /// VMs launched for this tenant since the daemon started.
    pub launches: u64,
    /// Runs that failed since the daemon started.
    pub failures: u64,
    /// Runs started again by the restart policy.
    pub restarts: u64,
    /// When the last run started (RFC 3339).
    pub started_at: Option<String>,
    /// When the last run ended (RFC 3339).
    pub ended_at: Option<String>,
    /// Whether the restart policy will start it again.
    pub restart_pending: bool,
}

impl Status {
    fn new(generation: u64) -> Self {
        Self {
            state: State::Starting,
            generation,
            exit_code: None,
            reason: None,
            instances: 0,
            pid: None,
            launches: 0,
            failures: 0,
            restarts: 0,
            started_at: None,
            ended_at: None,
            restart_pending: false,
        }
    }

    /// Whether nothing more will happen without a new put.
    pub fn settled(&self) -> bool {
        matches!(self.state, State::Exited | State::Failed | State::Stopped) && !self.restart_pending
    }
}

/// A tenant as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TenantView {
    /// Its name.
    pub name: String,
    /// The generation of its spec (1 for the first put, one more for each replacement).
    pub generation: u64,
    /// Its spec.
    pub spec: TenantSpec,
    /// What it is doing.
    pub status: Status,
}

/// What the supervisor needs from its host.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The data directory (state store, components, tenants' files, broker sockets).
    pub data_dir: PathBuf,
    /// The `wasmvisor` binary the VMM children run.
    pub exe: PathBuf,
    /// The guest image.
    pub guest: PathBuf,
    /// The artifact cache.
    pub cache_dir: PathBuf,
    /// Per-tenant log rotation size, in bytes.
    pub log_limit: u64,
    /// Idle VMM children kept started, so that a launch does not wait for a process start.
    pub pool_size: usize,
    /// Pooled children pre-boot a VM of [`Supervisor::pool_template`], which a launch that fits
    /// it takes over (its VM created, its guest booted).
    pub pool_pre_boot: bool,
    /// Launches start from snapshots of their components' ready states (`snapshots`).
    pub snapshots: bool,
    /// The runtime the tenants' relay sockets are accepted on (a task each, not a thread).
    pub runtime: tokio::runtime::Handle,
    /// How VMM children are jailed; `None`: they are not (`--insecure-no-jail`).
    pub jail: Option<Arc<Jail>>,
    /// Where tenants' preopened directories may be, canonical (`--dirs-root`).
    pub dirs_root: Option<PathBuf>,
}

/// One run's handle, shared by its thread and whoever cancels it.
pub(crate) struct RunControl {
    /// The child's pid while it is alive and not yet reaped (so that a kill never hits a
    /// recycled pid).
    pid: Mutex<Option<u32>>,
    cancelled: AtomicBool,
    done: Mutex<bool>,
    done_cv: Condvar,
    wake: Condvar,
}

impl RunControl {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pid: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            done: Mutex::new(false),
            done_cv: Condvar::new(),
            wake: Condvar::new(),
        })
    }

    /// Stops the run: kills the child if it lives, wakes a restart backoff.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(pid) = *lock(&self.pid) {
            // The pid is our unreaped child (the run thread clears it under this lock before
            // reaping), so it cannot have been recycled.
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _done = lock(&self.done);
        self.wake.notify_all();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until the run's thread has finished, at most `timeout`.
    pub(crate) fn wait_done(&self, timeout: Duration) -> bool {
        let guard = lock(&self.done);
        let (guard, _) = self.done_cv.wait_timeout_while(guard, timeout, |d| !*d).unwrap_or_else(|p| p.into_inner());
        *guard
    }

    fn finish(&self) {
        *lock(&self.done) = true;
        self.done_cv.notify_all();
    }

    /// Sleeps `d` unless cancelled first; returns whether it was cancelled.
    fn sleep(&self, d: Duration) -> bool {
        let guard = lock(&self.done);
        let _ = self.wake.wait_timeout_while(guard, d, |_| !self.is_cancelled());
        self.is_cancelled()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct TenantState {
    record: TenantRecord,
    status: Status,
    run: Option<Arc<RunControl>>,
    /// The capabilities its component uses (the VM gets a vsock device only if any).
    uses: BTreeSet<Capability>,
    /// An HTTP tenant's VMs.
    http: Option<Arc<HttpPool>>,
}

/// A tenant the daemon holds: its shared providers and its state.
pub struct Tenant {
    name: TenantName,
    /// The unprivileged identity its jailed VMM children take.
    run_as: Option<RunAs>,
    log: Arc<TenantLog>,
    broker: Arc<Mutex<Broker>>,
    socket: PathBuf,
    accept: tokio::task::AbortHandle,
    state: Mutex<TenantState>,
    changed: watch::Sender<u64>,
    lines: broadcast::Sender<Arc<str>>,
}

impl Tenant {
    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Its name.
    pub fn name(&self) -> &TenantName {
        &self.name
    }

    /// Writes one line of the daemon's own into the tenant's log (`<time> TAG text`).
    pub fn log_line(&self, tag: &str, text: &str) {
        write_line(&self.log, tag, text.as_bytes());
    }

    /// An HTTP tenant's VM count, if `generation` is still its current one.
    pub(crate) fn set_instances(&self, generation: u64, live: u32) {
        let mut st = lock(&self.state);
        if st.record.generation == generation && st.http.is_some() {
            st.status.instances = live;
            drop(st);
            self.notify();
        }
    }

    /// Why an HTTP tenant's VMs cannot start (None once one did).
    pub(crate) fn set_http_failure(&self, why: Option<String>) {
        let mut st = lock(&self.state);
        if st.http.is_some() {
            st.status.state = if why.is_some() { State::Failed } else { State::Running };
            if why.is_some() {
                st.status.failures += 1;
            }
            st.status.reason = why;
            drop(st);
            self.notify();
        }
    }

    /// Its current view.
    pub fn view(&self) -> TenantView {
        let st = lock(&self.state);
        TenantView {
            name: self.name.to_string(),
            generation: st.record.generation,
            spec: st.record.spec.clone(),
            status: st.status.clone(),
        }
    }

    /// A receiver told of every status change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The log so far and a receiver of every later line, with nothing lost or doubled between.
    pub fn follow(&self) -> std::io::Result<(String, broadcast::Receiver<Arc<str>>)> {
        self.log.read(|| self.lines.subscribe())
    }

    /// The log so far (both files, oldest first).
    pub fn log_text(&self) -> std::io::Result<String> {
        Ok(self.log.read(|| ())?.0)
    }

    /// Releases the tenant's providers (its store closes now, not when the last relay
    /// thread lets go) and stops its listener.
    fn close(&self) {
        lock(&self.broker).close();
        self.stop_listener();
    }

    fn stop_listener(&self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The supervisor of every tenant.
pub struct Supervisor {
    settings: Settings,
    store: Store,
    metrics: Arc<Metrics>,
    cpu: Mutex<GuestCpu>,
    supported_cpuid: Vec<wasmvisor::arch::cpu::CpuidEntry>,
    host_memory_mib: u64,
    run_dir: PathBuf,
    tenants: Mutex<BTreeMap<TenantName, Arc<Tenant>>>,
    artifacts: Mutex<HashMap<Digest, PathBuf>>,
    upload: Mutex<()>,
    pool: Mutex<Vec<Runner>>,
    refill_due: Mutex<Option<Instant>>,
    refill_cv: Condvar,
    socket_seq: AtomicU64,
    /// Numbers tenants (their uids) and VMM children's cells.
    tenant_seq: std::sync::atomic::AtomicU32,
    cell_seq: AtomicU64,
    shutting_down: AtomicBool,
    /// The front door's routes: a host (lowercase, as the client names it, or `*`) to the
    /// HTTP tenant's VMs.
    routes: RwLock<HashMap<String, Arc<HttpPool>>>,
    /// Where the front door listens.
    http_addr: Mutex<Option<std::net::SocketAddr>>,
    /// The client of every tenant's `http-outgoing` requests.
    outgoing: Arc<crate::outgoing::Client>,
    /// Snapshots of components' ready states.
    snapshots: crate::snapshots::Snapshots,
}

/// The longest a Unix socket path may be (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The longest a tenant's run may be asked to last.
const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// Most preopened directories per tenant.
const MAX_DIRS: usize = 16;
/// Restart backoff: doubles from the first to the last after each quick end.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run longer than this resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How long after a launch took an idle VMM child the pool is topped up.
const REFILL_DELAY: Duration = Duration::from_millis(100);
/// How often an idle pooled runner checks that its VMM child is alive.
const POOL_WATCH: Duration = Duration::from_secs(1);
/// How long a pooled VMM child's pre-boot may take.
const PRE_BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a delete or shutdown waits for a killed child to be reaped.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Most VMs one HTTP tenant may ask for.
const MAX_INSTANCES: u32 = 256;
/// Longest request queue one HTTP tenant may ask for.
const MAX_QUEUE: u32 = 65_536;
/// Idle time after which an HTTP VM above `instances.min` stops, unless the spec says.
const DEFAULT_IDLE_TIMEOUT_S: u64 = 30;
/// The VMM's wall-clock limit for an HTTP VM (it serves until stopped).
const HTTP_VM_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Supervisor {
    /// Opens the state store, learns the guest's CPU and brings every tenant back: a tenant
    /// whose last run of its current spec is recorded as done (and whose policy does not ask
    /// for more) keeps that outcome; every other one runs.
    pub fn start(settings: Settings, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        let store = Store::open(&settings.data_dir).map_err(|e| e.to_string())?;
        let run_dir = settings.data_dir.join("run");
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        // The sockets are root's (or the daemon user's) alone; a jailed child reaches its own
        // through its cell's directory, bound into its root.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot restrict {}: {e}", run_dir.display()))?;
        }
        // Broker sockets are run/b<N>.sock; refuse a data directory too deep for them.
        if run_dir.join("b18446744073709551615.sock").as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "the data directory {} is too deep for Unix sockets (at most {MAX_SOCKET_PATH} bytes per path)",
                settings.data_dir.display()
            ));
        }
        // Sockets and cells of a previous daemon (killed) are stale: nobody listens on them.
        for dir in [&run_dir, &settings.data_dir.join("jail")] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path()).or_else(|_| std::fs::remove_dir_all(e.path()));
                }
            }
        }
        let probe = VmConfig { guest: settings.guest.clone(), ..VmConfig::default() };
        let cpu = GuestCpu::for_vm(&settings.cache_dir, &probe).map_err(|e| e.to_string())?;
        // Asked of KVM once here, handed to every VMM child (each would pay ~300 µs for it).
        let supported_cpuid = wasmvisor::kvm::open(&probe.kvm_device)
            .map_err(|e| e.to_string())
            .and_then(|kvm| wasmvisor::arch::cpu::supported_cpuid_entries(&kvm).map_err(|e| e.to_string()))?;
        tracing::info!(features = %cpu.isa_flags().join(" "), probed = cpu.probed, "guest CPU");
        let outgoing = crate::outgoing::Client::new(settings.runtime.clone())?;
        let snapshots = settings.snapshots;
        let sup = Arc::new(Self {
            settings,
            store,
            metrics,
            cpu: Mutex::new(cpu),
            supported_cpuid,
            host_memory_mib: host_memory_mib(),
            run_dir,
            tenants: Mutex::new(BTreeMap::new()),
            artifacts: Mutex::new(HashMap::new()),
            upload: Mutex::new(()),
            pool: Mutex::new(Vec::new()),
            refill_due: Mutex::new(None),
            refill_cv: Condvar::new(),
            socket_seq: AtomicU64::new(0),
            tenant_seq: std::sync::atomic::AtomicU32::new(0),
            cell_seq: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            routes: RwLock::new(HashMap::new()),
            http_addr: Mutex::new(None),
            outgoing,
            snapshots: crate::snapshots::Snapshots::new(snapshots),
        });
        sup.reconcile()?;
        sup.refill_pool();
        let keeper = sup.clone();
        std::thread::Builder::new()
            .name("vmm-pool".into())
            .spawn(move || keeper.keep_pool())
            .map_err(|e| format!("cannot start the pool keeper: {e}"))?;
        Ok(sup)
    }

    fn reconcile(self: &Arc<Self>) -> Result<(), String> {
        let records = self.store.tenants().map_err(|e| e.to_string())?;
        let mut tenants = lock(&self.tenants);
        for record in records {
            let name = record.name.clone();
            let outcome = self.store.outcome(&name).map_err(|e| e.to_string())?;
            let prepared = self
                .component_for(&record.name, &record.spec)
                .and_then(|(component, uses, kind)| Ok((self.prepare_tenant(&record, uses)?, component, kind)));
            let (tenant, component, kind) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    // The tenant stays in the desired state; it shows why it cannot run.
                    tracing::error!(tenant = %name, error = %e.message, "cannot bring the tenant back");
                    match self.prepare_tenant(&record, BTreeSet::new()) {
                        Ok(t) => {
                            self.fail_status(&t, &e.message);
                            tenants.insert(name, t);
                        }
                        Err(e) => tracing::error!(tenant = %name, error = %e.message, "tenant dropped from this run"),
                    }
                    continue;
                }
            };
            if kind == ComponentKind::Http {
                match self.hosts_for(&name, &record.spec) {
                    Ok(hosts) => self.serve_http(&tenant, &record, component, hosts),
                    Err(e) => self.fail_status(&tenant, &e.message),
                }
                tenants.insert(name, tenant);
                continue;
            }
            let done = outcome.filter(|o| o.generation == record.generation).filter(|o| match record.spec.restart {
                RestartPolicy::Never => true,
                RestartPolicy::OnFailure => o.succeeded(),
                RestartPolicy::Always => false,
            });
            match done {
                Some(o) => {
                    let mut st = lock(&tenant.state);
                    st.status.state = if o.failure.is_some() { State::Failed } else { State::Exited };
                    st.status.exit_code = o.exit_code;
                    st.status.reason = o.failure.clone();
                    st.status.ended_at = Some(o.ended_at.clone());
                }
                None => self.start_run(&tenant, component),
            }
            tenants.insert(name, tenant);
        }
        tracing::info!(tenants = tenants.len(), "reconciled");
        Ok(())
    }

    fn fail_status(&self, tenant: &Tenant, reason: &str) {
        let mut st = lock(&tenant.state);
        st.status.state = State::Failed;
        st.status.reason = Some(reason.to_owned());
        drop(st);
        tenant.notify();
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sets the tenants-by-state gauges (before a scrape).
    pub fn update_gauges(&self) {
        let mut counts = [0i64; 5];
        for t in lock(&self.tenants).values() {
            let state = lock(&t.state).status.state;
            counts[State::ALL.iter().position(|s| *s == state).expect("every state is listed")] += 1;
        }
        for (state, n) in State::ALL.iter().zip(counts) {
            self.metrics.tenants.get_or_create(&StateLabels { state: state.name() }).set(n);
        }
    }

    fn isa_flags(&self) -> Vec<&'static str> {
        lock(&self.cpu).isa_flags()
    }

    // ---- components ----

    /// Stores, inspects and compiles a component; answers once its artifact is cached.
    pub fn upload(&self, bytes: &[u8]) -> Result<ComponentRecord, ApiError> {
        self.refuse_if_stopping()?;
        // One upload at a time: compiling is CPU-bound, and the store's temporary files are
        // per process.
        let _one = lock(&self.upload);
        let flags = self.isa_flags();
        // A wasip1 command module is stored as the component the preview 1 adapter makes of it.
        let (bytes, _) = wasmvisor::wasm::preview1::component(Path::new("the upload"), bytes)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let bytes = &bytes[..];
        self.store.put_component(bytes, |digest, path| {
            let label = Path::new(digest.as_str());
            let interfaces = inspect::interfaces(label, bytes).map_err(|e| ApiError::bad_request(e.to_string()))?;
            let kind = kind_of(&interfaces.exports).ok_or_else(|| {
                let exports =
                    if interfaces.exports.is_empty() { "none".to_owned() } else { interfaces.exports.join(", ") };
                ApiError::bad_request(format!(
                    "the component exports neither wasi:cli/run (a command) nor wasi:http/incoming-handler \
                     (an HTTP handler); its exports: {exports}"
                ))
            })?;
            let t = Instant::now();
            let artifact = aot::compile_cached(path, bytes, &self.settings.cache_dir, &flags).map_err(|e| match e {
                // The daemon's cache failing is the daemon's problem, not the component's.
                wasmvisor::wasm::WasmError::Cache { .. } => ApiError::internal(e.to_string()),
                e => ApiError::bad_request(e.to_string()),
            })?;
            let compile_ms = t.elapsed().as_millis() as u64;
            lock(&self.artifacts).insert(digest.clone(), artifact.path);
            Ok(ComponentRecord {
                digest: digest.clone(),
                kind,
                imports: interfaces.imports,
                exports: interfaces.exports,
                size: bytes.len() as u64,
                compile_ms,
            })
        })?
    }

    /// Every component.
    pub fn components(&self) -> Result<Vec<ComponentRecord>, ApiError> {
        Ok(self.store.components()?)
    }

    /// One component.
    pub fn component(&self, digest: &str) -> Result<ComponentRecord, ApiError> {
        let digest = Digest::try_from(digest.to_owned())?;
        self.store.component(&digest)?.ok_or_else(|| ApiError::not_found(format!("no component {digest}")))
    }

    /// Deletes a component no tenant uses.
    pub fn delete_component(&self, digest: &str) -> Result<(), ApiError> {
        let digest = Digest::try_from(digest.to_owned())?;
        // Under the tenant lock: no put can start using it meanwhile.
        let _tenants = lock(&self.tenants);
        if !self.store.delete_component(&digest)? {
            return Err(ApiError::not_found(format!("no component {digest}")));
        }
        lock(&self.artifacts).remove(&digest);
        Ok(())
    }

    /// The artifact of a stored component (compiled again if the cache lost it) and the
    /// capabilities it would use under `spec`'s grants, checked.
    fn component_for(
        &self,
        tenant: &TenantName,
        spec: &TenantSpec,
    ) -> Result<(PathBuf, BTreeSet<Capability>, ComponentKind), ApiError> {
        let record = self.store.component(&spec.component)?.ok_or_else(|| {
            ApiError::bad_request(format!("no component {}: upload it first (POST /v1/components)", spec.component))
        })?;
        let label = Path::new(spec.component.as_str());
        let interfaces = inspect::Interfaces { imports: record.imports.clone(), exports: record.exports.clone() };
        let grants = inspect::Grants { tenant: tenant.as_str(), granted: &spec.grants };
        let uses = match record.kind {
            ComponentKind::Command => {
                if spec.http.is_some() || spec.instances.is_some() || spec.idle_timeout_s.is_some() {
                    return Err(ApiError::bad_request(format!(
                        "component {} is a command component: `http`, `instances` and `idle_timeout_s` are for \
                         HTTP components (which export wasi:http/incoming-handler)",
                        spec.component
                    )));
                }
                inspect::check(label, &interfaces, &grants)
            }
            ComponentKind::Http => inspect::check_http(label, &interfaces, &grants),
        }
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let known = lock(&self.artifacts).get(&spec.component).cloned();
        let artifact = match known.filter(|p| p.is_file()) {
            Some(p) => p,
            None => {
                let path = self.store.component_path(&spec.component);
                let bytes = std::fs::read(&path)
                    .map_err(|e| ApiError::internal(format!("cannot read component {}: {e}", path.display())))?;
                let artifact = aot::compile_cached(&path, &bytes, &self.settings.cache_dir, &self.isa_flags())
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                lock(&self.artifacts).insert(spec.component.clone(), artifact.path.clone());
                artifact.path
            }
        };
        Ok((artifact, uses, record.kind))
    }

    // ---- tenants ----

    fn refuse_if_stopping(&self) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the daemon is shutting down"));
        }
        Ok(())
    }

    fn check_spec(&self, spec: &TenantSpec) -> Result<(), ApiError> {
        if spec.memory_mib > self.host_memory_mib {
            return Err(ApiError::bad_request(format!(
                "memory_mib {} is more than this host has ({} MiB)",
                spec.memory_mib, self.host_memory_mib
            )));
        }
        if spec.timeout_s == 0 || spec.timeout_s > MAX_TIMEOUT_S {
            return Err(ApiError::bad_request(format!(
                "timeout_s {} is out of range: 1 to {MAX_TIMEOUT_S} seconds",
                spec.timeout_s
            )));
        }
        for key in spec.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(ApiError::bad_request(format!("env key {key:?} is empty or contains '=' or NUL")));
            }
        }
        if spec.config.keys().any(String::is_empty) {
            return Err(ApiError::bad_request("a config key is empty"));
        }
        self.preopens(spec)?;
        let config =
            VmConfig { memory_mib: spec.memory_mib, args: argv("t", spec), env: env(spec), ..VmConfig::default() };
        vm::check(&config).map_err(|e| ApiError::bad_request(e.to_string()))
    }

    /// The spec's `dirs` as preopens beneath `--dirs-root`, checked: each names an existing
    /// directory inside the root (after resolving symbolic links), and needs the
    /// `filesystem` grant.
    fn preopens(&self, spec: &TenantSpec) -> Result<Vec<Preopen>, ApiError> {
        if spec.dirs.is_empty() {
            return Ok(Vec::new());
        }
        if !spec.grants.contains(&Capability::Filesystem) {
            return Err(ApiError::bad_request("dirs need the filesystem grant (\"grants\": [\"filesystem\"])"));
        }
        let Some(root) = &self.settings.dirs_root else {
            return Err(ApiError::bad_request("this daemon takes no dirs: it was started without --dirs-root"));
        };
        if spec.dirs.len() > MAX_DIRS {
            return Err(ApiError::bad_request(format!("{} dirs: at most {MAX_DIRS}", spec.dirs.len())));
        }
        let mut out = Vec::new();
        for d in &spec.dirs {
            let rel = Path::new(&d.host);
            let plain =
                rel.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
            if d.host.is_empty() || !plain {
                return Err(ApiError::bad_request(format!(
                    "dirs: host {:?} must be a relative path inside the dirs root, without `..`",
                    d.host
                )));
            }
            if d.guest.is_empty() || d.guest.contains('\0') {
                return Err(ApiError::bad_request(format!("dirs: guest name {:?} is empty or contains NUL", d.guest)));
            }
            let host = std::fs::canonicalize(root.join(rel))
                .map_err(|e| ApiError::bad_request(format!("dirs: host {:?}: {e}", d.host)))?;
            if !host.starts_with(root) || !host.is_dir() {
                return Err(ApiError::bad_request(format!(
                    "dirs: host {:?} is not a directory inside the dirs root",
                    d.host
                )));
            }
            out.push(Preopen { host, guest: d.guest.clone(), readonly: d.readonly });
        }
        Ok(out)
    }

    fn prepare_tenant(&self, record: &TenantRecord, uses: BTreeSet<Capability>) -> Result<Arc<Tenant>, ApiError> {
        let spec = wasmvisor_providers::TenantSpec {
            name: record.name.clone(),
            grants: record.spec.grants.clone(),
            config: record.spec.config.clone(),
            data_dir: self.settings.data_dir.clone(),
            echo_log: false,
            http_allow: record.spec.http_outgoing.as_ref().map(|h| h.allow.clone()).unwrap_or_default(),
            kv_quota: Some(record.spec.keyvalue_quota()),
            dirs: self.preopens(&record.spec)?,
        };
        std::fs::create_dir_all(spec.tenant_dir())
            .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", spec.tenant_dir().display())))?;
        let log = TenantLog::open_bounded(spec.log_path(), false, record.spec.log_rotation(self.settings.log_limit))
            .map_err(|e| ApiError::internal(format!("cannot open {}: {e}", spec.log_path().display())))?;
        let log = Arc::new(log);
        let (lines, _) = broadcast::channel(1024);
        let sender = lines.clone();
        log.set_listener(Box::new(move |line| {
            let _ = sender.send(Arc::from(line));
        }));
        let mut broker = Broker::with_log(spec, log.clone()).map_err(|e| ApiError::conflict(e.to_string()))?;
        broker.set_outgoing(self.outgoing.clone());
        let broker = Arc::new(Mutex::new(broker));
        let socket = self.run_dir.join(format!("b{}.sock", self.socket_seq.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| ApiError::internal(format!("cannot listen on {}: {e}", socket.display())))?;
        let accept = {
            let _in_runtime = self.settings.runtime.enter();
            let listener = listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(listener))
                .map_err(|e| ApiError::internal(format!("cannot listen on {}: {e}", socket.display())))?;
            self.settings.runtime.spawn(accept_relays(record.name.clone(), listener, broker.clone())).abort_handle()
        };
        let (changed, _) = watch::channel(0);
        let index = self.tenant_seq.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Tenant {
            name: record.name.clone(),
            run_as: self.settings.jail.as_ref().map(|j| j.run_as(index)),
            log,
            broker,
            socket,
            accept,
            state: Mutex::new(TenantState {
                record: record.clone(),
                status: Status::new(record.generation),
                run: None,
                uses,
                http: None,
            }),
            changed,
            lines,
        }))
    }

    /// Creates or replaces a tenant: checks the spec, commits it, and (re)starts its run.
    pub fn put_tenant(self: &Arc<Self>, name: &str, spec: TenantSpec) -> Result<(Put, TenantView), ApiError> {
        self.refuse_if_stopping()?;
        let name: TenantName =
            name.parse().map_err(|e: wasmvisor_providers::InvalidTenantName| ApiError::bad_request(e.to_string()))?;
        let t = Instant::now();
        self.check_spec(&spec)?;
        let mut tenants = lock(&self.tenants);
        let (artifact, uses, kind) = self.component_for(&name, &spec)?;
        let hosts = match kind {
            ComponentKind::Http => Some(self.hosts_for(&name, &spec)?),
            ComponentKind::Command => None,
        };
        self.metrics.phase("put_validate", t.elapsed());
        let t = Instant::now();
        let existing = tenants.get(&name).cloned();
        if let Some(t) = &existing {
            // Before the commit: a store that cannot open refuses the put and changes nothing.
            lock(&t.broker)
                .update(
                    spec.grants.clone(),
                    spec.config.clone(),
                    spec.http_outgoing.as_ref().map(|h| h.allow.clone()).unwrap_or_default(),
                    Some(spec.keyvalue_quota()),
                    self.preopens(&spec)?,
                )
                .map_err(|e| ApiError::conflict(e.to_string()))?;
            t.log.set_limit(spec.log_rotation(self.settings.log_limit));
        }
        let fresh = match &existing {
            Some(_) => None,
            None => {
                let provisional = TenantRecord { name: name.clone(), generation: 0, spec: spec.clone() };
                Some(self.prepare_tenant(&provisional, uses.clone())?)
            }
        };
        let tenant = existing.clone().or_else(|| fresh.clone()).expect("one of the two exists");
        if let Some(hosts) = hosts {
            let t = Instant::now();
            let committed = self.store.put_tenant(&name, spec);
            self.metrics.phase("put_commit", t.elapsed());
            let (put, record) = match committed {
                Ok(r) => r,
                Err(e) => {
                    if let Some(t) = &fresh {
                        t.close();
                    }
                    return Err(e.into());
                }
            };
            if fresh.is_some() {
                tenants.insert(name.clone(), tenant.clone());
            }
            self.serve_http(&tenant, &record, artifact, hosts);
            drop(tenants);
            return Ok((put, tenant.view()));
        }
        // The run's thread starts its VMM child now: the process start overlaps the commit,
        // and the child boots nothing until the commit went through.
        let control = RunControl::new();
        let runner = match self.take_runner() {
            Ok(r) => r,
            Err(e) => {
                if let Some(t) = &fresh {
                    t.close();
                }
                return Err(e);
            }
        };
        self.metrics.phase("put_prepare", t.elapsed());
        let t = Instant::now();
        let committed = self.store.put_tenant(&name, spec);
        self.metrics.phase("put_commit", t.elapsed());
        let (put, record) = match committed {
            Ok(r) => r,
            Err(e) => {
                self.return_runner(runner);
                if let Some(t) = &fresh {
                    t.close();
                }
                return Err(e.into());
            }
        };
        if fresh.is_some() {
            tenants.insert(name.clone(), tenant.clone());
        }
        let old_pool = {
            let mut st = lock(&tenant.state);
            let counters = (st.status.launches, st.status.failures, st.status.restarts);
            st.record = record;
            st.uses = uses;
            st.status = Status::new(st.record.generation);
            (st.status.launches, st.status.failures, st.status.restarts) = counters;
            if let Some(old) = st.run.take() {
                // In the same critical section as the new status: the old run can no longer
                // touch it. Killed now, reaped by its own thread, which records nothing.
                old.cancel();
            }
            st.http.take()
        };
        if let Some(pool) = old_pool {
            // It was an HTTP tenant: its routes and VMs go.
            self.unroute(&tenant);
            pool.close();
        }
        // Still under the table lock, so that the run started is the last committed spec's.
        self.go(&tenant, &control, runner, artifact);
        drop(tenants);
        Ok((put, tenant.view()))
    }

    /// A tenant by name.
    pub fn tenant(&self, name: &str) -> Result<Arc<Tenant>, ApiError> {
        let parsed: TenantName =
            name.parse().map_err(|e: wasmvisor_providers::InvalidTenantName| ApiError::bad_request(e.to_string()))?;
        lock(&self.tenants).get(&parsed).cloned().ok_or_else(|| ApiError::not_found(format!("no tenant {parsed}")))
    }

    /// Every tenant's view, by name.
    pub fn tenants(&self) -> Vec<TenantView> {
        let tenants: Vec<Arc<Tenant>> = lock(&self.tenants).values().cloned().collect();
        tenants.iter().map(|t| t.view()).collect()
    }

    /// Deletes a tenant: commits the removal, stops its VM and waits for it to be reaped;
    /// `purge` also deletes its data (key-value store, log).
    pub fn delete_tenant(&self, name: &str, purge: bool) -> Result<(), ApiError> {
        let parsed: TenantName =
            name.parse().map_err(|e: wasmvisor_providers::InvalidTenantName| ApiError::bad_request(e.to_string()))?;
        let mut tenants = lock(&self.tenants);
        if !tenants.contains_key(&parsed) {
            return Err(ApiError::not_found(format!("no tenant {parsed}")));
        }
        self.store.delete_tenant(&parsed)?;
        let tenant = tenants.remove(&parsed).expect("checked above");
        drop(tenants);
        let (run, pool) = {
            let mut st = lock(&tenant.state);
            (st.run.take(), st.http.take())
        };
        if let Some(run) = run {
            run.cancel();
            if !run.wait_done(STOP_WAIT) {
                tracing::warn!(tenant = %parsed, "the VMM child was not reaped in time");
            }
        }
        if let Some(pool) = pool {
            self.unroute(&tenant);
            pool.close();
            if !pool.wait_stopped(STOP_WAIT) {
                tracing::warn!(tenant = %parsed, "an HTTP VM was not reaped in time");
            }
        }
        tenant.close();
        if purge {
            let dir = self.settings.data_dir.join("tenants").join(parsed.as_str());
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ApiError::internal(format!("cannot purge {}: {e}", dir.display()))),
            }
        }
        tenant.notify();
        Ok(())
    }

    /// Stops every VM and waits for each child to be reaped; later puts are refused. Runs
    /// stopped so record nothing: a restarted daemon runs them again.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        {
            let _due = lock(&self.refill_due);
            self.refill_cv.notify_all();
        }
        // Idle children first: each runner kills and reaps its own when its inbox closes.
        let idle: Vec<Runner> = lock(&self.pool).drain(..).collect();
        for runner in idle {
            self.metrics.pool_idle.dec();
            drop(runner.jobs);
            let _ = runner.handle.join();
        }
        let tenants: Vec<Arc<Tenant>> = lock(&self.tenants).values().cloned().collect();
        let runs: Vec<Arc<RunControl>> = tenants.iter().filter_map(|t| lock(&t.state).run.clone()).collect();
        let pools: Vec<Arc<HttpPool>> = tenants.iter().filter_map(|t| lock(&t.state).http.clone()).collect();
        for run in &runs {
            run.cancel();
        }
        for pool in &pools {
            pool.close();
        }
        for run in &runs {
            run.wait_done(STOP_WAIT);
        }
        for pool in &pools {
            pool.wait_stopped(STOP_WAIT);
        }
        for t in &tenants {
            t.stop_listener();
        }
    }

    // ---- HTTP tenants ----

    /// Where the front door listens, once it does.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        *lock(&self.http_addr)
    }

    /// Records where the front door listens.
    pub fn set_http_addr(&self, addr: std::net::SocketAddr) {
        *lock(&self.http_addr) = Some(addr);
    }

    /// The runtime the front door and the HTTP VMs' tasks run on.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.settings.runtime
    }

    /// The HTTP tenant serving `host` (the Host header, lowercase): an exact match, else the
    /// name without its port, else the catch-all `*`.
    pub fn route(&self, host: &str) -> Option<Arc<HttpPool>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = routes.get(host) {
            return Some(pool.clone());
        }
        let bare = match host.rsplit_once(':') {
            Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        routes.get(bare).or_else(|| routes.get("*")).cloned()
    }

    /// The hosts an HTTP tenant is reached by: `NAME.localhost` and its spec's; refused if
    /// malformed or held by another tenant.
    fn hosts_for(&self, name: &TenantName, spec: &TenantSpec) -> Result<Vec<String>, ApiError> {
        let own = format!("{}.localhost", name.as_str().to_ascii_lowercase());
        let mut hosts = vec![own.clone()];
        for host in spec.http.iter().flat_map(|h| &h.hosts) {
            let valid = host == "*"
                || (!host.is_empty()
                    && host.len() <= 253
                    && host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:[]".contains(&b)));
            if !valid {
                return Err(ApiError::bad_request(format!(
                    "http.hosts: {host:?} is not a lowercase hostname (letters, digits, '-', '.', an optional :port) \
                     or \"*\""
                )));
            }
            if host.ends_with(".localhost") && *host != own {
                return Err(ApiError::bad_request(format!(
                    "http.hosts: {host:?} is reserved: every tenant is reached at NAME.localhost"
                )));
            }
            if !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        let instances = spec.instances.unwrap_or_default();
        if instances.max == 0 || instances.max > MAX_INSTANCES || instances.min > instances.max {
            return Err(ApiError::bad_request(format!(
                "instances: need 0 <= min <= max and 1 <= max <= {MAX_INSTANCES} (got min {}, max {})",
                instances.min, instances.max
            )));
        }
        if instances.queue > MAX_QUEUE {
            return Err(ApiError::bad_request(format!("instances.queue {} is more than {MAX_QUEUE}", instances.queue)));
        }
        if let Some(idle) = spec.idle_timeout_s
            && (idle == 0 || idle > MAX_TIMEOUT_S)
        {
            return Err(ApiError::bad_request(format!(
                "idle_timeout_s {idle} is out of range: 1 to {MAX_TIMEOUT_S} seconds"
            )));
        }
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for host in &hosts {
            if let Some(other) = routes.get(host)
                && other.tenant().name() != name
            {
                return Err(ApiError::conflict(format!(
                    "host {host} is already routed to tenant {}",
                    other.tenant().name()
                )));
            }
        }
        Ok(hosts)
    }

    /// Makes `record` the HTTP tenant's current spec: a new pool of VMs, routed from `hosts`;
    /// the previous spec's run or pool stops.
    fn serve_http(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        record: &TenantRecord,
        artifact: PathBuf,
        hosts: Vec<String>,
    ) {
        let instances: Instances = record.spec.instances.unwrap_or_default();
        let spec = PoolSpec {
            min: instances.min,
            max: instances.max,
            queue: instances.queue,
            idle_timeout: Duration::from_secs(record.spec.idle_timeout_s.unwrap_or(DEFAULT_IDLE_TIMEOUT_S)),
            request_timeout: Duration::from_secs(record.spec.timeout_s),
        };
        let config = VmConfig {
            memory_mib: record.spec.memory_mib,
            guest: self.settings.guest.clone(),
            args: argv(record.name.as_str(), &record.spec),
            env: env(&record.spec),
            // A VM serves until it is stopped; each request has its own limit.
            timeout: HTTP_VM_LIFETIME,
            component: Some(artifact),
            vsock: Some(VsockConfig {
                capabilities: Capabilities::Relay(tenant.socket.clone()),
                uds_path: None,
                relay_preopens: record.spec.has_dirs(),
            }),
            supported_cpuid: self.supported_cpuid.clone(),
            http: true,
            ..VmConfig::default()
        };
        let pool = HttpPool::start(self, tenant.clone(), record.generation, spec, config, self.run_dir.clone());
        let (old_run, old_pool) = {
            let mut st = lock(&tenant.state);
            let counters = (st.status.launches, st.status.failures, st.status.restarts);
            st.record = record.clone();
            st.status = Status::new(record.generation);
            (st.status.launches, st.status.failures, st.status.restarts) = counters;
            st.status.state = State::Running;
            (st.run.take(), st.http.replace(pool.clone()))
        };
        if let Some(run) = old_run {
            run.cancel();
        }
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            routes.retain(|_, p| p.tenant().name() != tenant.name());
            for host in hosts {
                routes.insert(host, pool.clone());
            }
        }
        if let Some(old) = old_pool {
            old.close();
        }
        tenant.notify();
    }

    /// Removes every route to `tenant`.
    fn unroute(&self, tenant: &Tenant) {
        self.routes.write().unwrap_or_else(|p| p.into_inner()).retain(|_, p| p.tenant().name() != tenant.name());
    }

    /// Starts one HTTP VM on a runner; `ended` is told how it ended.
    pub(crate) fn start_http_vm(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        control: Arc<RunControl>,
        config: VmConfig,
        ended: watch::Sender<Option<String>>,
    ) -> Result<(), ApiError> {
        self.refuse_if_stopping()?;
        let runner = self.take_runner()?;
        let record = lock(&tenant.state).record.clone();
        let job = Job { tenant: tenant.clone(), control, go: Go { record, config }, ended: Some(ended) };
        if let Err(mpsc::SendError(job)) = runner.jobs.send(job) {
            let _ = job.ended.map(|e| e.send(Some("the VM's thread ended before it got its job".to_string())));
            return Err(ApiError::internal("the VM's thread ended before it got its job"));
        }
        Ok(())
    }

    /// An HTTP VM's runner: one run of its child, its output into the tenant's log, and its
    /// end told to its pool.
    fn run_http_vm(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        control: &Arc<RunControl>,
        config: &VmConfig,
        idle: Result<VmmChild, ChildError>,
        ended: &watch::Sender<Option<String>>,
        runner: &RunnerCell,
    ) {
        {
            let mut st = lock(&tenant.state);
            st.status.launches += 1;
            st.status.started_at = Some(rfc3339_utc(SystemTime::now()));
        }
        let (end, child) = self.run_once(tenant, control, config, Some(idle), runner);
        let why = match (&end.failure, end.exit_code) {
            (Some(f), _) => f.clone(),
            (None, Some(code)) => format!("the guest exited with code {code}"),
            (None, None) => "the VM ended".to_string(),
        };
        if end.failure.is_some() && !control.is_cancelled() {
            self.metrics.launch_failures.inc();
        }
        if let Some(child) = child {
            self.finish_child(child, control);
        }
        let _ = ended.send(Some(why));
    }

    // ---- runs ----

    /// The VM a tenant's run boots.
    fn vm_config(
        &self,
        tenant: &Tenant,
        record: &TenantRecord,
        artifact: PathBuf,
        uses: &BTreeSet<Capability>,
    ) -> VmConfig {
        VmConfig {
            memory_mib: record.spec.memory_mib,
            guest: self.settings.guest.clone(),
            args: argv(record.name.as_str(), &record.spec),
            env: env(&record.spec),
            timeout: Duration::from_secs(record.spec.timeout_s),
            component: Some(artifact),
            vsock: (!uses.is_empty() || record.spec.has_dirs()).then(|| VsockConfig {
                capabilities: Capabilities::Relay(tenant.socket.clone()),
                uds_path: None,
                relay_preopens: record.spec.has_dirs(),
            }),
            supported_cpuid: self.supported_cpuid.clone(),
            ..VmConfig::default()
        }
    }

    /// A runner: a thread that has started an idle VMM child (waiting on its socket for a
    /// config) and waits for its job. It spawned the child itself and outlives it, as
    /// `PR_SET_PDEATHSIG` needs; dropped without a job, it kills its child, which ran nothing.
    ///
    /// A pooled runner (`pre_boot`) has its child pre-boot a VM of the pool's template
    /// ([`Supervisor::pool_template`]), so that a launch that fits it finds the VM created and
    /// the guest booted; while it waits for a job it checks on its child, and replaces one that
    /// died (killed from outside) before a launch finds it dead.
    fn new_runner(self: &Arc<Self>, pre_boot: bool) -> Result<Runner, ApiError> {
        let (jobs, inbox) = mpsc::sync_channel::<Job>(1);
        let sup = self.clone();
        let runner = self.runner_cell()?;
        let handle = std::thread::Builder::new()
            .name("vmm-runner".into())
            .spawn(move || {
                let mut idle = sup.idle_child(&runner, pre_boot);
                let job = loop {
                    match inbox.recv_timeout(POOL_WATCH) {
                        Ok(job) => break job,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if idle.as_mut().is_ok_and(|c| !c.is_alive()) {
                                tracing::warn!("a pooled VMM child died; replacing it");
                                sup.metrics.pool_replaced.inc();
                                drop(idle);
                                idle = sup.idle_child(&runner, pre_boot);
                            }
                        }
                    }
                };
                {
                    let Job { tenant, control, go, ended } = job;
                    match ended {
                        None => sup.run_loop(&tenant, &control, &go.record, &go.config, Some(idle), &runner),
                        Some(ended) => sup.run_http_vm(&tenant, &control, &go.config, idle, &ended, &runner),
                    }
                    control.finish();
                }
            })
            .map_err(|e| ApiError::internal(format!("cannot start a thread for the run: {e}")))?;
        Ok(Runner { jobs, handle })
    }

    /// A VMM child's cell and cgroup, when children are jailed.
    fn runner_cell(&self) -> Result<RunnerCell, ApiError> {
        Ok(match &self.settings.jail {
            None => RunnerCell { cell: None, cgroup: None },
            Some(jail) => {
                let id = self.cell_seq.fetch_add(1, Ordering::SeqCst);
                let jail_err =
                    |e: std::io::Error| ApiError::internal(format!("cannot prepare a VMM child's jail: {e}"));
                let cell = Cell::new(&self.settings.data_dir, id).map_err(jail_err)?;
                let cgroup = jail.cgroup(&format!("vmm-c{id}")).map_err(jail_err)?;
                RunnerCell { cell: Some(cell), cgroup: Some(cgroup) }
            }
        })
    }

    /// Starts a runner's idle VMM child, in the runner's cgroup from its start (before it can
    /// read anything); with `pre_boot`, has it pre-boot the pool's VM. A failed pre-boot leaves
    /// a child that boots its launch afresh.
    fn idle_child(&self, runner: &RunnerCell, pre_boot: bool) -> Result<VmmChild, ChildError> {
        let mut child = VmmChild::spawn_idle_in(&self.settings.exe, runner.dirs())?;
        if let Some(cgroup) = &runner.cgroup {
            cgroup.add(child.pid())?;
        }
        if pre_boot {
            match child.pre_boot(&self.pool_template()) {
                Ok(phases) => self.metrics.phase("pre_boot", phases.wall),
                Err(e) => tracing::warn!(error = %e, "a pooled VMM child could not pre-boot its VM"),
            }
        }
        Ok(child)
    }

    /// The VM pooled VMM children pre-boot: a launch fits it when its tenant's spec has the
    /// default memory size (see [`vm::fits_template`]).
    pub fn pool_template(&self) -> VmConfig {
        VmConfig {
            memory_mib: crate::store::DEFAULT_MEMORY_MIB,
            guest: self.settings.guest.clone(),
            timeout: PRE_BOOT_TIMEOUT,
            supported_cpuid: self.supported_cpuid.clone(),
            ..VmConfig::default()
        }
    }

    /// A runner from the pool (its child's process start is behind it), or a new one (whose
    /// child starts while the caller commits); runners top the pool up when their VM ends.
    fn take_runner(self: &Arc<Self>) -> Result<Runner, ApiError> {
        let taken = lock(&self.pool).pop();
        // The keeper tops the pool up a little later, not while this launch boots: on a
        // small host a process start competes with the launch it would serve.
        let mut due = lock(&self.refill_due);
        if due.is_none() {
            *due = Some(Instant::now() + REFILL_DELAY);
            self.refill_cv.notify_one();
        }
        drop(due);
        match taken {
            Some(r) => {
                self.metrics.pool_idle.dec();
                Ok(r)
            }
            None => self.new_runner(false),
        }
    }

    /// The pool keeper's thread: refills the pool when a refill is due, until shutdown.
    fn keep_pool(self: Arc<Self>) {
        loop {
            let mut due = lock(&self.refill_due);
            loop {
                if self.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                match *due {
                    Some(at) if Instant::now() >= at => break,
                    Some(at) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        due = self.refill_cv.wait_timeout(due, wait).unwrap_or_else(|p| p.into_inner()).0;
                    }
                    None => due = self.refill_cv.wait(due).unwrap_or_else(|p| p.into_inner()),
                }
            }
            *due = None;
            drop(due);
            self.refill_pool();
        }
    }

    /// Gives an unused runner back to the pool (or lets it go if the pool is full).
    fn return_runner(&self, runner: Runner) {
        let mut pool = lock(&self.pool);
        if pool.len() < self.settings.pool_size && !self.shutting_down.load(Ordering::SeqCst) {
            pool.push(runner);
            self.metrics.pool_idle.inc();
        }
    }

    /// Tops the pool of idle VMM children up to its size.
    fn refill_pool(self: &Arc<Self>) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        loop {
            if lock(&self.pool).len() >= self.settings.pool_size {
                return;
            }
            match self.new_runner(self.settings.pool_pre_boot) {
                Ok(r) => self.return_runner(r),
                Err(e) => {
                    tracing::warn!(error = %e.message, "cannot refill the pool of VMM children");
                    return;
                }
            }
        }
    }

    /// Makes `control` the tenant's current run and gives `runner` its job.
    fn go(&self, tenant: &Arc<Tenant>, control: &Arc<RunControl>, runner: Runner, artifact: PathBuf) {
        let (record, uses) = {
            let mut st = lock(&tenant.state);
            if let Some(old) = st.run.replace(control.clone()) {
                // Killed now, reaped by its own thread, which records nothing: it is no
                // longer the tenant's run.
                old.cancel();
            }
            st.status.state = State::Starting;
            (st.record.clone(), st.uses.clone())
        };
        tenant.notify();
        let config = self.vm_config(tenant, &record, artifact, &uses);
        let job = Job { tenant: tenant.clone(), control: control.clone(), go: Go { record, config }, ended: None };
        if runner.jobs.send(job).is_err() {
            control.finish();
            self.fail_status(tenant, "the run's thread ended before it got its job");
        }
    }

    /// Starts the tenant's current spec (reconcile).
    fn start_run(self: &Arc<Self>, tenant: &Arc<Tenant>, artifact: PathBuf) {
        let control = RunControl::new();
        match self.take_runner() {
            Ok(runner) => self.go(tenant, &control, runner, artifact),
            Err(e) => self.fail_status(tenant, &e.message),
        }
    }

    /// Updates the status if this run is still the tenant's current one.
    fn set_status(tenant: &Tenant, control: &Arc<RunControl>, f: impl FnOnce(&mut Status)) {
        let mut st = lock(&tenant.state);
        if st.run.as_ref().is_some_and(|r| Arc::ptr_eq(r, control)) {
            f(&mut st.status);
            drop(st);
            tenant.notify();
        }
    }

    fn run_loop(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        control: &Arc<RunControl>,
        record: &TenantRecord,
        config: &VmConfig,
        mut idle: Option<Result<VmmChild, ChildError>>,
        runner: &RunnerCell,
    ) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let began = Instant::now();
            let calls_before = lock(&tenant.broker).calls();
            let (end, child) = self.run_once(tenant, control, config, idle.take(), runner);
            let calls = lock(&tenant.broker).calls().saturating_sub(calls_before);
            self.metrics.capability_calls.inc_by(calls);
            // Reaped after the outcome is recorded and shown (the VM is gone already; the
            // process only exits), by this thread, which spawned it.
            let reap = || {
                if let Some(child) = child {
                    self.finish_child(child, control);
                }
            };
            if control.is_cancelled() {
                reap();
                Self::set_status(tenant, control, |s| {
                    s.state = State::Stopped;
                    s.instances = 0;
                    s.pid = None;
                });
                return;
            }
            self.metrics.phase("total", began.elapsed());
            let outcome = Outcome {
                generation: record.generation,
                exit_code: end.exit_code,
                failure: end.failure.clone(),
                ended_at: rfc3339_utc(SystemTime::now()),
            };
            let restart = match record.spec.restart {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => !outcome.succeeded(),
                RestartPolicy::Always => true,
            } && !self.shutting_down.load(Ordering::SeqCst);
            // Durable before it is shown: a status the API reports survives a crash. Only the
            // tenant's current generation records (the store checks).
            let t = Instant::now();
            let recorded = self.store.put_outcome(&record.name, &outcome);
            self.metrics.phase("outcome_commit", t.elapsed());
            if let Err(e) = recorded {
                tracing::error!(tenant = %record.name, error = %e, "cannot record the run's outcome");
            }
            if end.failure.is_some() {
                self.metrics.launch_failures.inc();
            }
            Self::set_status(tenant, control, |s| {
                s.state = if end.failure.is_some() { State::Failed } else { State::Exited };
                s.exit_code = end.exit_code;
                s.reason = end.failure.clone();
                s.instances = 0;
                s.pid = None;
                s.ended_at = Some(outcome.ended_at.clone());
                if end.failure.is_some() {
                    s.failures += 1;
                }
                s.restart_pending = restart;
            });
            reap();
            if !restart {
                return;
            }
            if began.elapsed() > BACKOFF_RESET {
                backoff = BACKOFF_FIRST;
            }
            if control.sleep(backoff) {
                Self::set_status(tenant, control, |s| s.restart_pending = false);
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            Self::set_status(tenant, control, |s| {
                s.restarts += 1;
                s.restart_pending = false;
                s.state = State::Starting;
            });
        }
    }

    /// One VMM child from spawn (or the idle one given) to its last event; returns how the
    /// run ended and the child, still to be reaped.
    fn run_once(
        self: &Arc<Self>,
        tenant: &Arc<Tenant>,
        control: &Arc<RunControl>,
        config: &VmConfig,
        idle: Option<Result<VmmChild, ChildError>>,
        runner: &RunnerCell,
    ) -> (RunEnd, Option<VmmChild>) {
        let spawned_at = Instant::now();
        self.metrics.launches.inc();
        Self::set_status(tenant, control, |s| {
            s.launches += 1;
            s.started_at = Some(rfc3339_utc(SystemTime::now()));
            s.exit_code = None;
            s.reason = None;
        });
        let oom_before = runner.cgroup.as_ref().map_or(0, VmCgroup::oom_kills);
        // Read before the pid's lock is taken: whoever cancels a run holds the tenant's state
        // while it takes that lock.
        let limits = {
            let spec = &lock(&tenant.state).record.spec;
            Limits { memory_mib: config.memory_mib, cpus: f64::from(spec.cpu_millis()) / 1000.0, pids: spec.pids_max() }
        };
        // The snapshot of the component's ready state: restored from if there is one, made in
        // the background (after this launch has its child) if there is none yet.
        let cpu_features = lock(&self.cpu).report.detected.0;
        let mut maker = None;
        let config = match self.snapshots.plan(config, cpu_features) {
            crate::snapshots::Plan::Restore(plan) => {
                std::borrow::Cow::Owned(VmConfig { snapshot: Some(plan), ..config.clone() })
            }
            crate::snapshots::Plan::Make(make) => {
                maker = Some(make);
                std::borrow::Cow::Borrowed(config)
            }
            crate::snapshots::Plan::None => std::borrow::Cow::Borrowed(config),
        };
        let config = &*config;
        let mut child = {
            let mut pid = lock(&control.pid);
            if control.is_cancelled() {
                return (RunEnd::failed("stopped before it started"), None);
            }
            let child = match idle {
                // An idle child that died meanwhile (killed from outside) is replaced.
                Some(Ok(c)) => self
                    .hand_over(tenant, c, config, limits, runner)
                    .or_else(|_| self.spawn_child(tenant, config, limits, runner)),
                Some(Err(e)) => Err(e),
                None => self.spawn_child(tenant, config, limits, runner),
            };
            match child {
                Ok(c) => {
                    *pid = Some(c.pid());
                    c
                }
                Err(e) => return (RunEnd::failed(&e.to_string()), None),
            }
        };
        self.metrics.live_vms.inc();
        if let Some(maker) = maker {
            self.make_snapshot(tenant, *maker);
        }
        let mut out = OutputLines::new(tenant.log.clone());
        let mut end = None;
        loop {
            match child.next_event() {
                Ok(Some(ChildEvent::Started { pre_booted, restored, .. })) => {
                    self.metrics.phase("spawn", spawned_at.elapsed());
                    if pre_booted {
                        self.metrics.launches_pre_booted.inc();
                    }
                    if restored {
                        self.metrics.launches_restored.inc();
                    }
                    // The pid we spawned, not the one the child claims.
                    let pid = child.pid();
                    Self::set_status(tenant, control, |s| {
                        s.state = State::Running;
                        s.instances = 1;
                        s.pid = Some(pid);
                    });
                }
                Ok(Some(ChildEvent::Output { stream, bytes })) => out.push(stream, &bytes),
                Ok(Some(ChildEvent::SnapshotRefused { message })) => {
                    tracing::warn!(tenant = %tenant.name, %message, "a VMM child refused the snapshot; making it again");
                    self.metrics.snapshots_failed.inc();
                    if let Some(plan) = &config.snapshot {
                        self.snapshots.refused(&plan.path);
                        let unplanned = VmConfig { snapshot: None, ..config.clone() };
                        if let crate::snapshots::Plan::Make(maker) = self.snapshots.plan(&unplanned, cpu_features) {
                            self.make_snapshot(tenant, *maker);
                        }
                    }
                }
                // The answer to a pre-boot, read by the pool when it asked: nothing to do here.
                Ok(Some(ChildEvent::PreBooted { .. } | ChildEvent::PreBootFailed { .. })) => {}
                // The guest is done; the VM's teardown and the report follow (`finish_child`).
                Ok(Some(ChildEvent::GuestExited { code, out_of_memory })) => {
                    // A component that ran out of memory failed, whatever its exit code.
                    let failure = out_of_memory.map(|wanted| {
                        let wanted =
                            if wanted > 0 { format!(" to {} MiB", wanted.div_ceil(1 << 20)) } else { String::new() };
                        format!(
                            "out of memory: the component's linear memory could not grow{wanted} within the guest's {} \
                             MiB (raise memory_mib)",
                            config.memory_mib
                        )
                    });
                    end = Some(RunEnd { exit_code: Some(code), failure });
                    break;
                }
                Ok(Some(ChildEvent::Exited { code, phases, exits })) => {
                    self.record_phases(&phases, &exits);
                    end = Some(RunEnd { exit_code: Some(code), failure: None });
                    break;
                }
                Ok(Some(ChildEvent::Failed { exit_code, message })) => {
                    end = Some(RunEnd { exit_code: Some(exit_code), failure: Some(message) });
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    // A child that sends garbage is killed; its run failed.
                    tracing::warn!(tenant = %tenant.name, error = %e, "VMM child misbehaved");
                    end = Some(RunEnd::failed(&e.to_string()));
                    break;
                }
            }
        }
        out.finish();
        let end = match end {
            Some(end) => end,
            None => {
                // The socket closed without a last word: the process died. Reap it to say how.
                use std::os::unix::process::ExitStatusExt;
                let status = {
                    let mut pid = lock(&control.pid);
                    *pid = None;
                    child.wait()
                };
                let how = match status {
                    Ok(s) if s.signal().is_some() => format!("killed by signal {}", s.signal().unwrap_or(0)),
                    Ok(s) => format!("exited with status {} without a report", s.code().unwrap_or(-1)),
                    Err(e) => format!("could not be reaped: {e}"),
                };
                RunEnd::failed(&format!("the VMM child {how}"))
            }
        };
        // A VM its cgroup's memory limit stopped says so, whatever the child managed to say.
        let oom = runner.cgroup.as_ref().filter(|c| c.oom_kills() > oom_before).map(|c| c.memory_limit().unwrap_or(0));
        let end = match oom {
            Some(limit) => RunEnd::failed(&format!(
                "out of memory: the VM's process reached its memory limit of {} MiB (guest RAM plus overhead) \
                 and the kernel killed it",
                limit >> 20
            )),
            None => end,
        };
        (end, Some(child))
    }

    /// Makes the snapshot `maker` describes (its plan `MakeOnly`), on a thread of its own: a
    /// pre-booted VMM child, jailed as `tenant`'s are, boots the component until it is ready
    /// and stops there; the file is then verified and moved into place. Never on a request's
    /// path: the launch that asked goes on booting as before.
    fn make_snapshot(self: &Arc<Self>, tenant: &Arc<Tenant>, maker: VmConfig) {
        let sup = self.clone();
        let tenant = tenant.clone();
        let spawned = std::thread::Builder::new().name("snapshot".into()).spawn(move || {
            let Some(plan) = maker.snapshot.clone() else { return };
            let t = Instant::now();
            let ok = sup.run_maker(&tenant, &maker);
            match sup.snapshots.made(&plan, ok) {
                Ok(()) => {
                    sup.metrics.snapshots_made.inc();
                    sup.metrics.phase("snapshot", t.elapsed());
                    tracing::info!(tenant = %tenant.name, elapsed = ?t.elapsed(), "snapshot made");
                }
                Err(why) => {
                    sup.metrics.snapshots_failed.inc();
                    tracing::warn!(tenant = %tenant.name, %why, "no snapshot");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the snapshot maker");
        }
    }

    /// Runs a snapshot maker's VM to its end; whether it made the snapshot.
    fn run_maker(self: &Arc<Self>, tenant: &Tenant, maker: &VmConfig) -> bool {
        let runner = match self.runner_cell() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = ?e, "cannot prepare the snapshot maker's jail");
                return false;
            }
        };
        let made = self.idle_child(&runner, self.settings.pool_pre_boot).and_then(|child| {
            let spec = &lock(&tenant.state).record.spec;
            let limits = Limits { memory_mib: maker.memory_mib, cpus: 1.0, pids: spec.pids_max() };
            self.hand_over(tenant, child, maker, limits, &runner)
        });
        let mut child = match made {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the snapshot maker");
                return false;
            }
        };
        let _ = child.set_timeout(Some(maker.timeout + Duration::from_secs(5)));
        let ok = loop {
            match child.next_event() {
                Ok(Some(ChildEvent::Exited { code: 0, .. })) => break true,
                Ok(Some(ChildEvent::Exited { .. } | ChildEvent::Failed { .. })) | Ok(None) | Err(_) => break false,
                Ok(Some(_)) => {}
            }
        };
        child.kill();
        let _ = child.wait();
        ok
    }

    /// Starts a VMM child for `config` in `runner`'s cell (its idle one died or was never made).
    fn spawn_child(
        &self,
        tenant: &Tenant,
        config: &VmConfig,
        limits: Limits,
        runner: &RunnerCell,
    ) -> Result<VmmChild, ChildError> {
        let child = VmmChild::spawn_idle_in(&self.settings.exe, runner.dirs())?;
        if let Some(cgroup) = &runner.cgroup {
            cgroup.add(child.pid())?;
        }
        self.hand_over(tenant, child, config, limits, runner)
    }

    /// Gives an idle child its VM: jailed, first its cell is lent to the tenant and the child
    /// put in a cgroup with the tenant's limits, then the config goes.
    fn hand_over(
        &self,
        tenant: &Tenant,
        mut child: VmmChild,
        config: &VmConfig,
        limits: Limits,
        runner: &RunnerCell,
    ) -> Result<VmmChild, ChildError> {
        let (Some(cell), Some(cgroup), Some(run_as)) = (&runner.cell, &runner.cgroup, tenant.run_as) else {
            child.configure(config)?;
            return Ok(child);
        };
        let t = Instant::now();
        let jailed = cell.lend(config, run_as)?;
        cgroup.set_limits(limits)?;
        self.metrics.phase("jail", t.elapsed());
        child.configure(&jailed)?;
        Ok(child)
    }

    fn record_phases(&self, phases: &wasmvisor::vm::Phases, exits: &wasmvisor::vcpu::ExitCounts) {
        for (name, d) in [
            ("vm_create", phases.vm_create),
            ("memory", phases.memory),
            ("image_load", phases.image_load),
            ("vcpu_setup", phases.vcpu_setup),
            ("guest_run", phases.guest_run),
            ("teardown", phases.teardown),
        ] {
            self.metrics.phase(name, d);
        }
        self.metrics.vm_exits.inc_by(exits.total);
    }

    /// After a run's end is recorded: reads the child's last report (its phases) while it
    /// tears its VM down, then reaps it; a child that does not finish in time is killed.
    fn finish_child(&self, mut child: VmmChild, control: &RunControl) {
        if !control.is_cancelled() && child.set_timeout(Some(STOP_WAIT)).is_ok() {
            while let Ok(Some(event)) = child.next_event() {
                if let ChildEvent::Exited { phases, exits, .. } = event {
                    self.record_phases(&phases, &exits);
                }
            }
        }
        let mut pid = lock(&control.pid);
        *pid = None;
        child.kill();
        drop(pid);
        self.metrics.live_vms.dec();
    }
}

/// What a run's thread waits for before its VM may boot.
struct Go {
    record: TenantRecord,
    config: VmConfig,
}

/// A runner's job: whose run it is, and what to boot.
struct Job {
    /// For an HTTP VM: told how it ended (no outcome is recorded, no restart policy applies).
    ended: Option<watch::Sender<Option<String>>>,
    tenant: Arc<Tenant>,
    control: Arc<RunControl>,
    go: Go,
}

/// A thread with an idle VMM child, waiting for a job (see `Supervisor::new_runner`).
struct Runner {
    jobs: mpsc::SyncSender<Job>,
    handle: std::thread::JoinHandle<()>,
}

/// What a runner's thread holds for its children when they are jailed: its cell (its
/// directories) and its cgroup, made before its thread starts, gone with it.
struct RunnerCell {
    cell: Option<Cell>,
    cgroup: Option<VmCgroup>,
}

impl RunnerCell {
    fn dirs(&self) -> Option<&wasmvisor::jail::JailDirs> {
        self.cell.as_ref().map(|c| &c.dirs)
    }
}

/// How a run ended.
struct RunEnd {
    exit_code: Option<u8>,
    failure: Option<String>,
}

impl RunEnd {
    fn failed(why: &str) -> Self {
        Self { exit_code: None, failure: Some(why.to_owned()) }
    }
}

/// Splits a guest's output into lines for the tenant log, per stream; a line longer than the
/// cap is written in pieces.
struct OutputLines {
    log: Arc<TenantLog>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

const MAX_LINE: usize = 64 * 1024;

impl OutputLines {
    fn new(log: Arc<TenantLog>) -> Self {
        Self { log, stdout: Vec::new(), stderr: Vec::new() }
    }

    fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let (buf, tag) = match stream {
            Stream::Stdout => (&mut self.stdout, "stdout"),
            Stream::Stderr => (&mut self.stderr, "stderr"),
            Stream::Console => return,
        };
        buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
            write_line(&self.log, tag, &buf[start..start + i]);
            start += i + 1;
        }
        buf.drain(..start);
        while buf.len() >= MAX_LINE {
            write_line(&self.log, tag, &buf[..MAX_LINE]);
            buf.drain(..MAX_LINE);
        }
    }

    fn finish(&mut self) {
        for (buf, tag) in [(&mut self.stdout, "stdout"), (&mut self.stderr, "stderr")] {
            if !buf.is_empty() {
                write_line(&self.log, tag, buf);
                buf.clear();
            }
        }
    }
}

fn write_line(log: &TenantLog, tag: &str, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    if let Err(e) = log.output(tag, text, SystemTime::now()) {
        tracing::warn!(path = %log.path().display(), error = %e, "cannot write the tenant log");
    }
}

/// Accepts a tenant's relay connections (one per VM that uses a capability) and serves each
/// on a thread of its own while it lasts: an idle tenant costs a task, not a thread.
async fn accept_relays(tenant: TenantName, listener: tokio::net::UnixListener, broker: Arc<Mutex<Broker>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let served = stream
                    .into_std()
                    .and_then(|s| s.set_nonblocking(false).map(|()| s))
                    .and_then(|s| wasmvisor_providers::spawn_server(broker.clone(), s));
                if let Err(e) = served {
                    tracing::warn!(%tenant, error = %e, "cannot serve a capability relay");
                }
            }
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!(%tenant, error = %e, "accepting a capability relay failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn kind_of(exports: &[String]) -> Option<ComponentKind> {
    let has = |iface: &str| {
        exports
            .iter()
            .any(|e| e.split_once('@').is_some_and(|(i, v)| i == iface && (v == "0.2" || v.starts_with("0.2."))))
    };
    if has(inspect::RUN_EXPORT) {
        Some(ComponentKind::Command)
    } else if has("wasi:http/incoming-handler") {
        Some(ComponentKind::Http)
    } else {
        None
    }
}

fn argv(name: &str, spec: &TenantSpec) -> Vec<String> {
    std::iter::once(name.to_owned()).chain(spec.args.iter().cloned()).collect()
}

fn env(spec: &TenantSpec) -> Vec<String> {
    spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The host's RAM in MiB (`MemTotal`), or unlimited if it cannot be read.
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_exports() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(kind_of(&e(&["wasi:cli/run@0.2.3"])), Some(ComponentKind::Command));
        assert_eq!(kind_of(&e(&["wasi:http/incoming-handler@0.2.0"])), Some(ComponentKind::Http));
        assert_eq!(kind_of(&e(&["wasi:http/incoming-handler@0.3.0"])), None);
        assert_eq!(kind_of(&e(&["my:thing/run@0.2.0"])), None);
        assert_eq!(kind_of(&[]), None);
    }

    #[test]
    fn output_is_split_into_tagged_lines() {
        let dir = std::env::temp_dir().join(format!("wasmvisor-outlines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = Arc::new(TenantLog::open(dir.join("tenant.log"), false).unwrap());
        let mut out = OutputLines::new(log.clone());
        out.push(Stream::Stdout, b"hel");
        out.push(Stream::Stderr, b"oops\r\n");
        out.push(Stream::Stdout, b"lo\nwor");
        out.push(Stream::Console, b"kernel\n");
        out.push(Stream::Stdout, b"ld");
        out.finish();
        let text = log.read(|| ()).unwrap().0;
        let tags: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(tags, ["stderr oops", "stdout hello", "stdout world"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_memory_is_read() {
        assert!(host_memory_mib() > 0);
    }
}
