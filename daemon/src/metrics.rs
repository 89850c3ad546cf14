//! The daemon's Prometheus metrics (`GET /metrics`): tenants by state, launches and failures,
//! launch latency by phase, live VMs, capability calls and VM exits.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A tenant state label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `starting`, `running`, `exited`, `failed` or `stopped`.
    pub state: &'static str,
}

/// A launch phase label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase: a put's `put_validate` (spec and grants), `put_prepare` (the tenant's
    /// providers, the run's thread) and `put_commit` (the durable commit); `spawn` (config sent
    /// to the child's first event), the VMM's own phases (`vm_create`, `memory`, `image_load`,
    /// `vcpu_setup`, `guest_run`, `teardown`), `total` (the go to the end of the VM) and
    /// `outcome_commit` (recording how it ended); `http_vm_ready` (an HTTP VM's start to its
    /// guest's connection).
    pub phase: &'static str,
}

/// A response status class label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// `2xx`, `4xx`, `5xx`, ...
    pub class: &'static str,
}

type HistogramFamily = Family<PhaseLabels, Histogram, fn() -> Histogram>;

fn launch_histogram() -> Histogram {
    // 50 µs .. ~6.5 s.
    Histogram::new(exponential_buckets(50e-6, 2.0, 18))
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Tenants by state (set from the supervisor when scraped).
    pub tenants: Family<StateLabels, Gauge>,
    /// VMs launched.
    pub launches: Counter,
    /// Launches that failed (setup, crash, timeout), not counting non-zero exits.
    pub launch_failures: Counter,
    /// Launch latency by phase.
    pub launch_seconds: HistogramFamily,
    /// VMM children alive now (running a VM).
    pub live_vms: Gauge,
    /// Idle VMM children in the pool.
    pub pool_idle: Gauge,
    /// Launches that took over a pooled child's pre-booted VM.
    pub launches_pre_booted: Counter,
    /// Pooled children that died idle and were replaced.
    pub pool_replaced: Counter,
    /// Launches that started from a snapshot of their component's ready state.
    pub launches_restored: Counter,
    /// Snapshots made (in the background), by outcome.
    pub snapshots_made: Counter,
    /// Snapshots whose making failed, or that a VMM child refused.
    pub snapshots_failed: Counter,
    /// Capability requests the tenants' brokers answered.
    pub capability_calls: Counter,
    /// VM exits the VMM children served.
    pub vm_exits: Counter,
    /// Front-door request latency by phase (`front_door`: arrival to a VM; `guest_head`: the
    /// request sent to the response head; `exchange`: the request sent to the response's end).
    pub http_request_seconds: HistogramFamily,
    /// Front-door responses by status class.
    pub http_responses: Family<StatusLabels, Counter>,
    encode_lock: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wasmvisor");
        let tenants = Family::<StateLabels, Gauge>::default();
        let launches = Counter::default();
        let launch_failures = Counter::default();
        let launch_seconds = HistogramFamily::new_with_constructor(launch_histogram);
        let live_vms = Gauge::default();
        let pool_idle = Gauge::default();
        let launches_pre_booted = Counter::default();
        let pool_replaced = Counter::default();
        let launches_restored = Counter::default();
        let snapshots_made = Counter::default();
        let snapshots_failed = Counter::default();
        let capability_calls = Counter::default();
        let vm_exits = Counter::default();
        let http_request_seconds = HistogramFamily::new_with_constructor(launch_histogram);
        let http_responses = Family::<StatusLabels, Counter>::default();
        registry.register("tenants", "Tenants by state", tenants.clone());
        registry.register("launches", "VMs launched", launches.clone());
        registry.register("launch_failures", "Launches that failed (setup, crash, timeout)", launch_failures.clone());
        registry.register("launch_seconds", "Launch latency by phase", launch_seconds.clone());
        registry.register("live_vms", "VMM child processes running a VM", live_vms.clone());
        registry.register("pool_idle", "Idle VMM child processes ready for a launch", pool_idle.clone());
        registry.register(
            "launches_pre_booted",
            "Launches that took over a pooled child's pre-booted VM",
            launches_pre_booted.clone(),
        );
        registry.register(
            "pool_replaced",
            "Pooled VMM children that died idle and were replaced",
            pool_replaced.clone(),
        );
        registry.register(
            "launches_restored",
            "Launches that started from a snapshot of their component's ready state",
            launches_restored.clone(),
        );
        registry.register("snapshots_made", "Snapshots of components' ready states made", snapshots_made.clone());
        registry.register(
            "snapshots_failed",
            "Snapshots whose making failed or that a VMM child refused",
            snapshots_failed.clone(),
        );
        registry.register("capability_calls", "Capability requests answered", capability_calls.clone());
        registry.register("vm_exits", "VM exits served by the VMM children", vm_exits.clone());
        registry.register("http_request_seconds", "Front-door request latency by phase", http_request_seconds.clone());
        registry.register("http_responses", "Front-door responses by status class", http_responses.clone());
        Self {
            registry,
            tenants,
            launches,
            launch_failures,
            launch_seconds,
            live_vms,
            pool_idle,
            launches_pre_booted,
            pool_replaced,
            launches_restored,
            snapshots_made,
            snapshots_failed,
            capability_calls,
            vm_exits,
            http_request_seconds,
            http_responses,
            encode_lock: Mutex::new(()),
        }
    }

    /// Records one phase of a launch.
    pub fn phase(&self, phase: &'static str, d: Duration) {
        self.launch_seconds.get_or_create(&PhaseLabels { phase }).observe(d.as_secs_f64());
    }

    /// Records one phase of a front-door request.
    pub fn http_phase(&self, phase: &'static str, d: Duration) {
        self.http_request_seconds.get_or_create(&PhaseLabels { phase }).observe(d.as_secs_f64());
    }

    /// Counts a front-door response.
    pub fn http_response(&self, status: u16) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_responses.get_or_create(&StatusLabels { class }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let _guard = self.encode_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
