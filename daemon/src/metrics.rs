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
    /// `outcome_commit` (recording how it ended).
    pub phase: &'static str,
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
    /// Capability requests the tenants' brokers answered.
    pub capability_calls: Counter,
    /// VM exits the VMM children served.
    pub vm_exits: Counter,
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
        let capability_calls = Counter::default();
        let vm_exits = Counter::default();
        registry.register("tenants", "Tenants by state", tenants.clone());
        registry.register("launches", "VMs launched", launches.clone());
        registry.register("launch_failures", "Launches that failed (setup, crash, timeout)", launch_failures.clone());
        registry.register("launch_seconds", "Launch latency by phase", launch_seconds.clone());
        registry.register("live_vms", "VMM child processes running a VM", live_vms.clone());
        registry.register("pool_idle", "Idle VMM child processes ready for a launch", pool_idle.clone());
        registry.register("capability_calls", "Capability requests answered", capability_calls.clone());
        registry.register("vm_exits", "VM exits served by the VMM children", vm_exits.clone());
        Self {
            registry,
            tenants,
            launches,
            launch_failures,
            launch_seconds,
            live_vms,
            pool_idle,
            capability_calls,
            vm_exits,
            encode_lock: Mutex::new(()),
        }
    }

    /// Records one phase of a launch.
    pub fn phase(&self, phase: &'static str, d: Duration) {
        self.launch_seconds.get_or_create(&PhaseLabels { phase }).observe(d.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let _guard = self.encode_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
