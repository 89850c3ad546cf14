//! The VMs of one HTTP tenant: started on demand up to `instances.max`, handed to requests one
//! at a time, queued for when all are busy, stopped when idle above `instances.min`.
//!
//! A VM here is a VMM child booted in HTTP mode. Its guest connects to the vsock port
//! `HTTP_PORT` once its component is ready; the VMM forwards that connection to the Unix
//! socket `DATA/run/v<N>.sock_1080`, on which the pool listens for exactly that one
//! connection. The connection is the VM's readiness signal and carries its requests, one
//! exchange after another (`frontdoor`). Each VM has one task on the runtime that starts it,
//! waits until it is ready (or ends), hands it out, and accounts for its end; its VMM child
//! is watched by a runner thread of the supervisor, as every child is (the tenant's log gets
//! its output). A VM whose exchange went wrong (timeout, garbage, a client that left in the
//! middle) is never reused: it is killed and another starts when one is needed.
//!
//! Pipelining: when every VM is busy and no more may start, a request without a body may be
//! sent to a VM whose current request (also bodiless) is fully sent and younger than
//! [`PIPELINE_MAX_AGE`], one deep: the guest finds it waiting when it finishes the current one,
//! instead of idling while the front door hands the VM on. Its response is read once the
//! current one has ended (the read side passes from one exchange to the next). A request with
//! a body never waits behind another, and a slow request is never joined; if the VM fails,
//! the request queued behind it fails too (502), as any request on a failed VM does.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{oneshot, watch};
use wasmvisor::vm::VmConfig;

use crate::supervisor::{RunControl, Supervisor, Tenant};

/// How long a VM may take from its start to its readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time between two looks at a pool's VMs (to top them up to `instances.min`, or stop
/// those idle too long): a tenant whose VMs fail at once is restarted at most this often. A pool
/// with nothing to do is not looked at until something changes (a VM ends or comes back idle),
/// so idle tenants cost the daemon no wake-ups: 1,000 of them ticking twice a second kept its
/// runtime waking 1,700 times a second.
const REAP_EVERY: Duration = Duration::from_millis(500);
/// A request older than this is not joined by a pipelined one (it may be a slow one).
pub const PIPELINE_MAX_AGE: Duration = Duration::from_millis(2);

/// How a tenant's VMs are scaled.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    /// VMs kept even when idle.
    pub min: u32,
    /// Most VMs at once.
    pub max: u32,
    /// Most requests waiting for a VM.
    pub queue: u32,
    /// Idle time after which a VM above `min` stops.
    pub idle_timeout: Duration,
    /// Limit of one request, from its arrival to the end of its response.
    pub request_timeout: Duration,
}

/// The read half of a VM's request connection and what was read past the last frame.
pub struct ReadSide {
    /// The read half.
    pub rd: OwnedReadHalf,
    /// Bytes read past the last frame taken (the start of the next response, pipelined).
    pub buf: Vec<u8>,
}

/// Where an exchange gets the VM's read side: at once, or when the response ahead of it (a
/// pipelined request) has ended.
pub enum Incoming {
    /// The VM's read side, now.
    Ready(ReadSide),
    /// Sent when the response ahead has ended (dropped if it failed).
    After(oneshot::Receiver<ReadSide>),
}

/// A ready VM, lent to one request at a time (two, when pipelined).
pub struct Vm {
    id: u64,
    /// The request connection's halves (lent out during an exchange).
    pub wr: Option<OwnedWriteHalf>,
    /// Where the read half comes from.
    pub rd: Option<Incoming>,
    control: Arc<RunControl>,
    idle_since: Instant,
}

impl Vm {
    /// The same VM with these halves: for the open set (`rd` none), or for a request pipelined
    /// behind the current one.
    fn with(&self, wr: OwnedWriteHalf, rd: Option<Incoming>) -> Self {
        Self { id: self.id, wr: Some(wr), rd, control: self.control.clone(), idle_since: self.idle_since }
    }
}

/// A busy VM whose bodiless request is fully sent: a pipelined request may join it.
struct Open {
    vm: Vm,
    since: Instant,
}

/// A request waiting for a VM; `bodiless` ones may be pipelined.
struct Waiter {
    tx: oneshot::Sender<Result<Vm, String>>,
    bodiless: bool,
}

/// Why no VM was had for a request.
#[derive(Debug)]
pub enum AcquireError {
    /// The queue is full.
    QueueFull,
    /// No VM became free before the request's deadline.
    Timeout,
    /// The tenant's VMs cannot start (the reason).
    Failed(String),
    /// The tenant is being removed or replaced.
    Closed,
}

struct PoolState {
    idle: Vec<Vm>,
    /// VMs started and not yet ended (starting, idle or busy).
    live: u32,
    waiters: VecDeque<Waiter>,
    /// Busy VMs open to a pipelined request.
    open: Vec<Open>,
    /// Read sides owed to pipelined requests, by VM: sent when the current response ends.
    owed: HashMap<u64, oneshot::Sender<ReadSide>>,
    /// Every live VM's run control, to stop them all on close.
    controls: HashMap<u64, Arc<RunControl>>,
}

/// One HTTP tenant's VMs.
pub struct HttpPool {
    tenant: Arc<Tenant>,
    sup: Weak<Supervisor>,
    spec: PoolSpec,
    /// The VM every instance boots (its vsock socket path is set per VM).
    config: VmConfig,
    run_dir: PathBuf,
    state: Mutex<PoolState>,
    closed: AtomicBool,
    /// The tenant's generation this pool serves.
    generation: u64,
    /// Wakes the reaper: a VM ended or came back idle, or the pool closed.
    changed: Arc<tokio::sync::Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Unique socket names for VMs across pools.
static VM_SEQ: AtomicU64 = AtomicU64::new(0);

impl HttpPool {
    /// A pool with no VM yet; starts `min` of them and the idle reaper.
    pub(crate) fn start(
        sup: &Arc<Supervisor>,
        tenant: Arc<Tenant>,
        generation: u64,
        spec: PoolSpec,
        config: VmConfig,
        run_dir: PathBuf,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            tenant,
            sup: Arc::downgrade(sup),
            spec,
            config,
            run_dir,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                live: 0,
                waiters: VecDeque::new(),
                open: Vec::new(),
                owed: HashMap::new(),
                controls: HashMap::new(),
            }),
            closed: AtomicBool::new(false),
            generation,
            changed: Arc::new(tokio::sync::Notify::new()),
        });
        let weak = Arc::downgrade(&pool);
        let changed = Arc::clone(&pool.changed);
        let mut next = pool.reap();
        sup.runtime().spawn(async move {
            loop {
                match next {
                    Some(after) => {
                        tokio::select! {
                            () = tokio::time::sleep(after) => {}
                            () = changed.notified() => tokio::time::sleep(REAP_EVERY).await,
                        }
                    }
                    None => {
                        changed.notified().await;
                        tokio::time::sleep(REAP_EVERY).await;
                    }
                }
                let Some(pool) = weak.upgrade() else { return };
                if pool.closed.load(Ordering::SeqCst) {
                    return;
                }
                next = pool.reap();
            }
        });
        pool
    }

    /// The tenant's generation this pool serves.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The tenant.
    pub fn tenant(&self) -> &Arc<Tenant> {
        &self.tenant
    }

    /// How requests are limited.
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// VMs started and not ended.
    pub fn live(&self) -> u32 {
        lock(&self.state).live
    }

    /// Stops idle VMs above `min` that have idled too long; tops up to `min`. Returns when to
    /// look again unless something changes first (`None`: only then).
    fn reap(self: &Arc<Self>) -> Option<Duration> {
        let mut st = lock(&self.state);
        let now = Instant::now();
        // One at a time, the oldest idle VM first (idle is a stack: the newest is at the end);
        // `live` drops when its task sees the end.
        if st.live > self.spec.min
            && let Some(pos) = st.idle.iter().position(|vm| now.duration_since(vm.idle_since) >= self.spec.idle_timeout)
        {
            st.idle.remove(pos).control.cancel();
        }
        let mut to_start = self.spec.min.saturating_sub(st.live);
        while to_start > 0 && !self.closed.load(Ordering::SeqCst) {
            st.live += 1;
            to_start -= 1;
            self.spawn_vm(&mut st);
        }
        if st.live <= self.spec.min {
            // A VM that ends will say so.
            return None;
        }
        // Above `min`: when the longest-idle VM reaches its timeout (a busy VM that comes back
        // idle will say so).
        let due = st.idle.iter().map(|vm| vm.idle_since + self.spec.idle_timeout).min()?;
        Some(due.saturating_duration_since(now).max(REAP_EVERY))
    }

    /// A VM for one request: an idle one, a new one (up to `max`), for a `bodiless` request a
    /// place behind a young request on a busy VM (pipelined), or the next one freed.
    pub async fn acquire(self: &Arc<Self>, deadline: tokio::time::Instant, bodiless: bool) -> Result<Vm, AcquireError> {
        let rx = {
            let mut st = lock(&self.state);
            if self.closed.load(Ordering::SeqCst) {
                return Err(AcquireError::Closed);
            }
            if let Some(vm) = st.idle.pop() {
                return Ok(vm);
            }
            st.waiters.retain(|w| !w.tx.is_closed());
            let starting = st.live < self.spec.max;
            // Only when nobody queues ahead: a request never jumps the queue by pipelining.
            if !starting
                && bodiless
                && st.waiters.is_empty()
                && let Some(vm) = Self::join(&mut st)
            {
                return Ok(vm);
            }
            if !starting && st.waiters.len() >= self.spec.queue as usize {
                return Err(AcquireError::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter { tx, bodiless });
            if starting {
                st.live += 1;
                self.spawn_vm(&mut st);
            }
            rx
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(vm))) => Ok(vm),
            Ok(Ok(Err(why))) => Err(AcquireError::Failed(why)),
            Ok(Err(_)) => Err(AcquireError::Closed),
            Err(_) => Err(AcquireError::Timeout),
        }
    }

    /// A place behind a young open request, if there is one (older ones stay in the open set,
    /// holding their write half until their response ends, but nothing joins them).
    fn join(st: &mut PoolState) -> Option<Vm> {
        let pos = st.open.iter().rposition(|o| o.since.elapsed() < PIPELINE_MAX_AGE)?;
        let mut carrier = st.open.swap_remove(pos).vm;
        let wr = carrier.wr.take().expect("an open VM keeps its write half");
        let (tx, rx) = oneshot::channel();
        st.owed.insert(carrier.id, tx);
        Some(carrier.with(wr, Some(Incoming::After(rx))))
    }

    /// The exchange on `vm` has sent every frame of its bodiless request and gives the write
    /// half `wr` up: a bodiless waiter gets it at once, pipelined; else the VM stays open to
    /// one for [`PIPELINE_MAX_AGE`] from `since` (the request's start).
    pub fn open(&self, vm: &Vm, wr: OwnedWriteHalf, since: Instant) {
        let mut st = lock(&self.state);
        st.open.push(Open { vm: vm.with(wr, None), since });
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        if since.elapsed() >= PIPELINE_MAX_AGE {
            return;
        }
        // The queue's head only, and only a bodiless one: a request with a body at the head
        // stops pipelining until a VM is free for it, so it is never starved.
        while let Some(front) = st.waiters.front() {
            if front.tx.is_closed() {
                st.waiters.pop_front();
                continue;
            }
            if !front.bodiless {
                return;
            }
            let Some(vm) = Self::join(&mut st) else { return };
            let waiter = st.waiters.pop_front().expect("looked at above");
            let id = vm.id;
            if let Err(Ok(mut back)) = waiter.tx.send(Ok(vm)) {
                // That request is gone: the VM is open again.
                st.owed.remove(&id);
                back.rd = None;
                st.open.push(Open { vm: back, since });
                continue;
            }
            return;
        }
    }

    /// The response on `vm` ended cleanly; `side` is the connection's read half with what was
    /// read past it. The request pipelined behind it gets the read side; else the VM (with its
    /// write half, from the exchange's `vm.wr` or the open set) goes to the first waiter or
    /// the idle set. Bytes past the end with no request behind are a fault: the VM stops.
    pub fn release(&self, mut vm: Vm, side: ReadSide) {
        let mut st = lock(&self.state);
        if let Some(tx) = st.owed.remove(&vm.id) {
            if tx.send(side).is_err() {
                drop(st);
                self.discard(vm, "the request pipelined behind a response went away");
            }
            return;
        }
        if let Some(pos) = st.open.iter().position(|o| o.vm.id == vm.id) {
            vm.wr = st.open.swap_remove(pos).vm.wr;
        }
        if vm.wr.is_none() || !side.buf.is_empty() {
            drop(st);
            self.discard(vm, "bytes after the end of the response");
            return;
        }
        vm.rd = Some(Incoming::Ready(side));
        self.hand(&mut st, vm);
    }

    fn hand(&self, st: &mut PoolState, mut vm: Vm) {
        if self.closed.load(Ordering::SeqCst) {
            vm.control.cancel();
            return;
        }
        while let Some(w) = st.waiters.pop_front() {
            match w.tx.send(Ok(vm)) {
                Ok(()) => return,
                Err(Ok(back)) => vm = back,
                Err(Err(_)) => unreachable!("only VMs are sent here"),
            }
        }
        vm.idle_since = Instant::now();
        st.idle.push(vm);
        if st.live > self.spec.min {
            // It may have to stop once it has idled too long.
            self.changed.notify_one();
        }
    }

    /// Stops a VM whose exchange failed; it is not reused (nor is a request pipelined on it
    /// answered: its read side never comes).
    pub fn discard(&self, vm: Vm, why: &str) {
        tracing::warn!(tenant = %self.tenant.name(), vm = vm.id, %why, "stopping an HTTP VM");
        self.tenant.log_line("wasmvisor", &format!("VM {} stopped: {why}", vm.id));
        vm.control.cancel();
        let mut st = lock(&self.state);
        st.open.retain(|o| o.vm.id != vm.id);
        st.owed.remove(&vm.id);
    }

    /// Stops every VM and refuses later requests (the tenant is removed or replaced).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // The reaper ends.
        self.changed.notify_one();
        let mut st = lock(&self.state);
        st.idle.clear();
        st.open.clear();
        st.owed.clear();
        for control in st.controls.values() {
            control.cancel();
        }
        for w in st.waiters.drain(..) {
            let _ = w.tx.send(Err("the tenant was removed or replaced".to_string()));
        }
    }

    /// Waits until every VM of a closed pool has ended (at most `timeout`).
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let controls: Vec<Arc<RunControl>> = lock(&self.state).controls.values().cloned().collect();
        let until = Instant::now() + timeout;
        controls.iter().all(|c| c.wait_done(until.saturating_duration_since(Instant::now())))
    }

    /// Starts one VM (its `live` already counted) with a task that sees it through.
    fn spawn_vm(self: &Arc<Self>, st: &mut PoolState) {
        let Some(sup) = self.sup.upgrade() else { return };
        let id = VM_SEQ.fetch_add(1, Ordering::SeqCst);
        let control = RunControl::new();
        st.controls.insert(id, control.clone());
        let pool = self.clone();
        let runtime = sup.runtime().clone();
        runtime.spawn(async move { pool.see_through(sup, id, control).await });
    }

    /// One VM's life: start, readiness, hand-out, end.
    async fn see_through(self: Arc<Self>, sup: Arc<Supervisor>, id: u64, control: Arc<RunControl>) {
        let base = self.run_dir.join(format!("v{id}.sock"));
        let path = PathBuf::from(format!("{}_{}", base.display(), wasmvisor_abi::vsock::HTTP_PORT));
        let _ = std::fs::remove_file(&path);
        let (ended_tx, mut ended) = watch::channel(None::<String>);
        let started = Instant::now();
        let ready: Result<UnixStream, String> = async {
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            let mut config = self.config.clone();
            if let Some(v) = config.vsock.as_mut() {
                v.uds_path = Some(base.clone());
            }
            let tenant = self.tenant.clone();
            let run = control.clone();
            let sup2 = sup.clone();
            tokio::task::spawn_blocking(move || sup2.start_http_vm(&tenant, run, config, ended_tx))
                .await
                .map_err(|e| format!("cannot start the VM: {e}"))?
                .map_err(|e| e.message)?;
            tokio::select! {
                accepted = listener.accept() => accepted.map(|(s, _)| s).map_err(|e| format!("the VM's connection failed: {e}")),
                why = ended.wait_for(Option::is_some) => {
                    Err(why.ok().and_then(|w| w.clone()).unwrap_or_else(|| "the VM ended before it was ready".to_string()))
                }
                _ = tokio::time::sleep(READY_TIMEOUT) => Err(format!("the VM was not ready within {} s", READY_TIMEOUT.as_secs())),
            }
        }
        .await;
        let _ = std::fs::remove_file(&path);
        let failed_start = match ready {
            Ok(stream) => {
                sup.metrics().phase("http_vm_ready", started.elapsed());
                let (rd, wr) = stream.into_split();
                let side = ReadSide { rd, buf: Vec::new() };
                let vm = Vm {
                    id,
                    wr: Some(wr),
                    rd: Some(Incoming::Ready(side)),
                    control: control.clone(),
                    idle_since: Instant::now(),
                };
                let mut st = lock(&self.state);
                self.hand(&mut st, vm);
                let live = st.live;
                drop(st);
                self.tenant.set_instances(self.generation, live);
                self.tenant.set_http_failure(None);
                None
            }
            Err(why) => {
                control.cancel();
                Some(why)
            }
        };
        // The end: the runner thread reports it once the child is reaped.
        let _ = ended.wait_for(Option::is_some).await;
        let reason = ended.borrow().clone().unwrap_or_default();
        let mut st = lock(&self.state);
        st.live = st.live.saturating_sub(1);
        st.controls.remove(&id);
        st.idle.retain(|vm| vm.id != id);
        st.open.retain(|o| o.vm.id != id);
        st.owed.remove(&id);
        if let Some(why) = failed_start {
            self.tenant.log_line("wasmvisor", &format!("VM {id} failed to start: {why}"));
            // Its waiters would wait for a VM that cannot come: tell them why, unless another
            // VM still may serve them.
            if st.live == 0 {
                for w in st.waiters.drain(..) {
                    let _ = w.tx.send(Err(why.clone()));
                }
            }
            self.tenant.set_http_failure(Some(why));
        } else {
            tracing::debug!(tenant = %self.tenant.name(), vm = id, %reason, "HTTP VM ended");
            st.waiters.retain(|w| !w.tx.is_closed());
            if !st.waiters.is_empty() && st.live < self.spec.max && !self.closed.load(Ordering::SeqCst) {
                st.live += 1;
                self.spawn_vm(&mut st);
            }
        }
        let live = st.live;
        drop(st);
        // The reaper tops the VMs up to `min` again.
        self.changed.notify_one();
        self.tenant.set_instances(self.generation, live);
    }
}
