//! Capability round-trip benchmark: guest call -> vsock -> broker -> provider -> reply.
//!
//! `cargo bench --bench vsock` boots the test guest in-process several times (rounds); in each,
//! the guest times with its TSC, back to back: N bare exits (the `Nop` hypercall: the yardstick),
//! N no-op capability round trips, N key-value gets and N key-value increments (each increment
//! is a durable redb commit). It prints every round's p50/p99 and the median over rounds, and
//! the ratio of a no-op round trip to a bare exit measured in the same VM. Then it runs the
//! `kv-bench` component (the same calls through wasmtime's canonical ABI and WIT bindings).
//! Where debugfs is mounted (`/sys/kernel/debug/kvm`) it also counts KVM exits per no-op round
//! trip, including the QueueNotify exits that ioeventfds complete inside the kernel.
//!
//! Set WASMVISOR_BENCH_N (calls per round, default 2000) and WASMVISOR_BENCH_ROUNDS (default
//! 5). Under `cargo test` it runs a smoke pass of one small round.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmvisor::console::SharedBuffer;
use wasmvisor::hypercall::GuestIo;
use wasmvisor::images::{self, TEST_GUEST};
use wasmvisor::vm::{self, Capabilities, VmConfig, VsockConfig};
use wasmvisor::wasm::aot;
use wasmvisor_providers::{Broker, Capability, TenantSpec};

fn env_count(name: &str, bench: usize, smoke: usize, bench_mode: bool) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name} is a count")),
        Err(_) if bench_mode => bench,
        Err(_) => smoke,
    }
}

fn tenant(data: &Path) -> VsockConfig {
    let grants: BTreeSet<Capability> = [Capability::KeyValue].into_iter().collect();
    let name = "bench".parse().expect("valid tenant name");
    let tenant = TenantSpec {
        name,
        grants,
        config: BTreeMap::new(),
        data_dir: data.to_path_buf(),
        echo_log: false,
        http_allow: Vec::new(),
        kv_quota: None,
        dirs: Vec::new(),
    };
    VsockConfig { capabilities: Capabilities::InProcess(tenant), uds_path: None, relay_preopens: false }
}

/// Boots `config`, returns what the guest wrote (console for the test guest, stdout for a
/// component).
fn boot(config: &VmConfig) -> String {
    boot_report(config).0
}

fn boot_report(config: &VmConfig) -> (String, wasmvisor::vm::RunReport) {
    let console = SharedBuffer::default();
    let stdout = SharedBuffer::default();
    let io = GuestIo::captured(Box::new(console.clone()), Box::new(stdout.clone()), Box::new(std::io::sink()));
    let report = vm::boot(config, io).unwrap_or_else(|e| panic!("boot failed: {e}"));
    assert_eq!(report.exit_code, 0, "guest failed:\n{}{}", console.text(), stdout.text());
    (console.text() + &stdout.text(), report)
}

/// `name p50_ns=A p99_ns=B ...` lines -> name -> (p50, p99).
fn parse(out: &str) -> BTreeMap<String, (u64, u64)> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        let fields: BTreeMap<&str, u64> =
            words.filter_map(|w| w.split_once('=')).filter_map(|(k, v)| Some((k, v.parse().ok()?))).collect();
        match (fields.get("p50_ns"), fields.get("p99_ns"), fields.get("per_sec")) {
            (Some(&a), Some(&b), _) => {
                m.insert(name.to_string(), (a, b));
            }
            (_, _, Some(&r)) => {
                m.insert(format!("{name} per_sec"), (r, r));
            }
            _ => {}
        }
    }
    m
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !Path::new("/dev/kvm").exists() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true but /dev/kvm is missing");
        eprintln!("SKIPPED vsock benchmark: /dev/kvm is missing");
        return;
    }
    let n = env_count("WASMVISOR_BENCH_N", 2000, 20, bench);
    let rounds = env_count("WASMVISOR_BENCH_ROUNDS", 5, 1, bench);
    let data = std::env::temp_dir().join(format!("wasmvisor-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let guest = images::guest_image(TEST_GUEST);
    assert!(guest.is_file(), "build the guest first: scripts/build-guest.sh");
    let config = |args: Vec<String>| VmConfig {
        guest: guest.clone(),
        args,
        timeout: Duration::from_secs(600),
        vsock: Some(tenant(&data)),
        ..VmConfig::default()
    };

    // The same tenant's broker in this process behind a Unix socket, as a supervisor serves
    // its VMM children: the device relays each request to it.
    let relay_sock = data.join("broker.sock");
    std::fs::create_dir_all(&data).expect("bench data dir");
    let relay_broker = {
        // Another tenant: one redb file cannot be open twice, and the in-process runs use theirs.
        let VsockConfig { capabilities: Capabilities::InProcess(mut spec), .. } = tenant(&data) else {
            unreachable!("tenant() is in-process")
        };
        spec.name = "bench-relay".parse().expect("valid tenant name");
        Arc::new(Mutex::new(Broker::open(spec).expect("open the relay bench tenant")))
    };
    let listener = std::os::unix::net::UnixListener::bind(&relay_sock).expect("bind the relay socket");
    std::thread::spawn(move || wasmvisor_providers::serve_listener(relay_broker, listener));
    let relayed = |args: Vec<String>| VmConfig {
        vsock: Some(VsockConfig {
            capabilities: Capabilities::Relay(relay_sock.clone()),
            uds_path: None,
            relay_preopens: false,
        }),
        ..config(args)
    };

    println!("capability round trips, {rounds} rounds of {n} calls each (guest TSC, ns)");
    println!("{:<26} {:>10} {:>10}   per round p50", "", "p50", "p99");
    let mut per_op: BTreeMap<String, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
    let mut ratios = Vec::new();
    let mut relay_ratios = Vec::new();
    for _ in 0..rounds {
        // Interleaved: in-process broker, then the relay, in each round.
        for (prefix, cfg) in [
            ("", config(vec!["vsock-bench".into(), n.to_string()])),
            ("relay/", relayed(vec!["vsock-bench".into(), n.to_string()])),
        ] {
            let m = parse(&boot(&cfg));
            for (k, (a, b)) in &m {
                let e = per_op.entry(format!("{prefix}{k}")).or_default();
                e.0.push(*a);
                e.1.push(*b);
            }
            let (exit, noop) = (m["exit"].0.max(1), m["noop"].0);
            if prefix.is_empty() { ratios.push(noop * 1000 / exit) } else { relay_ratios.push(noop * 1000 / exit) }
        }
    }
    for name in [
        "device-init",
        "connect",
        "exit",
        "noop",
        "kv-get",
        "kv-increment",
        "relay/exit",
        "relay/noop",
        "relay/kv-get",
        "relay/kv-increment",
    ] {
        let (p50s, p99s) = &per_op[name];
        println!("{name:<26} {:>10} {:>10}   {p50s:?}", median(p50s.clone()), median(p99s.clone()));
    }
    let rates = &per_op["kv-increment per_sec"].0;
    println!("{:<26} {:>10}   {rates:?}", "kv increments/s", median(rates.clone()));
    println!(
        "no-op round trip / bare exit (p50, same VM): {:.2}x (median of {rounds} rounds; goal <= 1.5x)",
        median(ratios) as f64 / 1000.0
    );
    println!(
        "relayed no-op round trip / bare exit (p50, same VM): {:.2}x (median of {rounds} rounds; goal < 2x)",
        median(relay_ratios) as f64 / 1000.0
    );

    // Exits per round trip, counted by KVM itself (the vCPU's binary stats).
    let count = |calls: usize| {
        let mut cfg = config(vec!["vsock-noop".into(), calls.to_string()]);
        cfg.kvm_exit_stats = true;
        let (_, report) = boot_report(&cfg);
        (report.kvm_exits, report.exits, report.vsock.map(|v| v.stats))
    };
    match (count(0), count(n)) {
        ((Some(base), base_vmm, _), (Some(many), many_vmm, Some(worker))) => {
            let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
            println!(
                "KVM exits per no-op round trip: {:.2} (MMIO {:.2}, port I/O {:.2}; reaching the VMM: {:.2}); \
                 a whole VM that boots, sets the device up and connects: {} exits, of which {} are \
                 virtio-mmio register writes the VMM served (device initialisation)",
                per(many.exits, base.exits),
                per(many.mmio_exits, base.mmio_exits),
                per(many.io_exits, base.io_exits),
                per(many_vmm.total, base_vmm.total),
                base.exits,
                base_vmm.mmio,
            );
            println!(
                "worker: {} wake-ups for {n} round trips, {:.1} us of device work per wake-up \
                 (TX parse, broker, RX fill; the rest of a round trip is the notify exit and the wake-up)",
                worker.wakeups,
                worker.busy_ns as f64 / worker.wakeups.max(1) as f64 / 1e3,
            );
        }
        _ => println!("KVM exits per round trip: not counted (no KVM_GET_STATS_FD on this kernel)"),
    }

    // The same calls from a component, through wasmtime's WIT bindings.
    let component = images::component("kv-bench");
    if component.is_file() {
        let bytes = std::fs::read(&component).expect("read kv-bench");
        let cache = std::env::temp_dir().join(format!("wasmvisor-bench-cache-{}", std::process::id()));
        let flags =
            wasmvisor::guest_cpu::GuestCpu::for_vm(&cache, &VmConfig::default()).expect("guest CPU").isa_flags();
        let artifact = aot::compile_cached(&component, &bytes, &cache, &flags).expect("compile kv-bench");
        let cfg = VmConfig {
            component: Some(artifact.path.clone()),
            args: vec!["kv-bench".into(), n.to_string()],
            timeout: Duration::from_secs(600),
            memory_mib: 128,
            vsock: Some(tenant(&data)),
            ..VmConfig::default()
        };
        println!("component kv-bench ({n} calls, through wasi:keyvalue bindings):");
        for line in boot(&cfg).lines() {
            println!("  {line}");
        }
        let _ = std::fs::remove_dir_all(&cache);
    }
    let _ = std::fs::remove_dir_all(&data);
}
