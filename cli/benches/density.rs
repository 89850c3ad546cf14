//! Density: how many idle HTTP tenants one host holds, and what each costs.
//!
//! `cargo bench --bench density` starts a daemon (release build, jailed as in production) and
//! launches idle HTTP tenants of `http_hello.wasm`, each with one VM kept up
//! (`instances.min = 1`), in steps (`$WASMVISOR_BENCH_DENSITY`, a comma list, default
//! `100,500,1000`; `cargo test` runs a smoke pass of 3). Every tenant answers one request
//! before a step is measured. At each step it reports:
//!
//! - the private memory of the VMM children (`smaps_rollup`: Private_Clean + Private_Dirty),
//!   per VM (p50, max) and in all, divided by the tenants;
//! - the host's used memory (MemTotal - MemAvailable) above what it was before the daemon
//!   started, per tenant;
//! - the daemon's RSS;
//! - the whole host's CPU use while everything idles (`$WASMVISOR_BENCH_IDLE_SECS`, 10), and
//!   the part of it the daemon and its children used (the host's own services, e.g. a kernel
//!   memory monitor scanning the VMs' pages, make the rest);
//! - the latency of requests to tenants picked at random (200 per step, one at a time).
//!
//! A launch that fails ends the run, and its answer is printed as what bounds N. Last, where
//! one VMM child's private memory lies, by mapping.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use wasmvisor::images;

mod common;

use common::{ServeDaemon, api, percentile};

/// A `/proc/meminfo` field in KiB.
fn meminfo_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/meminfo"))
}

fn host_used_kib() -> u64 {
    meminfo_kib("MemTotal") - meminfo_kib("MemAvailable")
}

/// Private_Clean + Private_Dirty of a process, in KiB (0 if it is gone).
fn private_kib(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else { return 0 };
    text.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The daemon's children (its VMM children: tenants' VMs and the idle pool).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(text.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    out
}

/// CPU ticks (user + system) the daemon and its children have used.
fn own_ticks(daemon: u32) -> u64 {
    std::iter::once(daemon)
        .chain(children(daemon))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let f: Vec<u64> =
                stat.rsplit_once(')')?.1.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
            Some(f.iter().sum::<u64>())
        })
        .sum()
}

/// Busy and total jiffies of the whole host (`/proc/stat`'s `cpu` line).
fn host_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap();
    let v: Vec<u64> = text.lines().next().unwrap().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let idle = v[3] + v[4];
    let total: u64 = v.iter().take(8).sum();
    (total - idle, total)
}

/// GET / to each host in turn on one keep-alive connection; the latency of each (µs), or the
/// first failure.
fn requests(addr: SocketAddr, hosts: &[String]) -> Result<Vec<f64>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut latencies = Vec::with_capacity(hosts.len());
        for host in hosts {
            let req = hyper::Request::get("/")
                .header(hyper::header::HOST, host.as_str())
                .body(Empty::<Bytes>::new())
                .unwrap();
            let t = Instant::now();
            let resp = sender.send_request(req).await.map_err(|e| format!("{host}: {e}"))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| format!("{host}: {e}"))?.to_bytes();
            if status != 200 || body.as_ref() != b"Hello, world!\n" {
                return Err(format!("{host}: {status} {}", String::from_utf8_lossy(&body)));
            }
            latencies.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(latencies)
    })
}

/// A small deterministic generator for picking tenants (xorshift64*).
struct Pick(u64);

impl Pick {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// Where a VMM child's private memory lies: guest RAM (its largest mapping), the binary, the
/// heap, and the rest (thread stacks, the artifact's private pages, small maps), in KiB.
fn breakdown(pid: u32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String, u64)> = Vec::new(); // (size KiB, name, private KiB)
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let (a, b) = first.split_once('-').unwrap();
            let size = (u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap()) >> 10;
            let name = words.nth(4).unwrap_or("").to_string();
            maps.push((size, name, 0));
        } else if (first == "Private_Clean:" || first == "Private_Dirty:")
            && let Some(m) = maps.last_mut()
        {
            m.2 += words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    let ram = maps.iter().filter(|m| m.1.is_empty()).map(|m| m.0).max().unwrap_or(0);
    let mut parts: Vec<(String, u64)> = Vec::new();
    for (size, name, private) in maps {
        let part = if name.is_empty() && size == ram {
            "guest RAM".to_string()
        } else if name.ends_with("/wasmvisor") {
            "the wasmvisor binary (relocated data, bss)".to_string()
        } else if name == "[heap]" {
            "VMM heap".to_string()
        } else if name.is_empty() {
            "other anonymous (thread stacks, malloc arenas, device buffers)".to_string()
        } else {
            name
        };
        match parts.iter_mut().find(|p| p.0 == part) {
            Some(p) => p.1 += private,
            None => parts.push((part, private)),
        }
    }
    parts.retain(|p| p.1 > 0);
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    parts
}

fn main() {
    if !common::kvm_present("density") {
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let steps: Vec<usize> = match std::env::var("WASMVISOR_BENCH_DENSITY") {
        Ok(v) => v.split(',').map(|n| n.trim().parse().expect("WASMVISOR_BENCH_DENSITY: counts")).collect(),
        Err(_) if bench => vec![100, 500, 1000],
        Err(_) => vec![3],
    };
    let idle_secs: f64 = match std::env::var("WASMVISOR_BENCH_IDLE_SECS") {
        Ok(v) => v.parse().expect("WASMVISOR_BENCH_IDLE_SECS is a number"),
        Err(_) if bench => 10.0,
        Err(_) => 0.5,
    };
    let samples = if bench { 200 } else { 10 };

    let exe = Path::new(env!("CARGO_BIN_EXE_wasmvisor"));
    let dir = common::fresh_dir("density-bench");
    let baseline = host_used_kib();
    let daemon = ServeDaemon::start(exe, &dir, &[]);
    let (socket, addr, daemon_pid) = (daemon.socket.clone(), daemon.addr, daemon.child.id());
    let digest = daemon.upload(&images::component("http_hello"));
    let spec = format!(r#"{{"component":"{digest}","instances":{{"min":1,"max":1}}}}"#);

    println!(
        "idle HTTP tenants of http_hello.wasm, one VM each; idle CPU over {idle_secs} s, {samples} requests per step"
    );
    println!(
        "{:>6} {:>8} {:>12} {:>12} {:>14} {:>14} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "N",
        "launch/s",
        "VM priv p50",
        "VM priv max",
        "children/N",
        "host used/N",
        "daemon RSS",
        "idle CPU",
        "of it ours",
        "req p50",
        "req p99"
    );
    let mut launched = 0;
    let mut bound = None;
    let mut pick = Pick(0x9e37_79b9_7f4a_7c15);
    'steps: for target in steps {
        let t = Instant::now();
        let first = launched;
        while launched < target {
            let (status, body) =
                api(&socket, "PUT", &format!("/v1/tenants/t{launched}"), spec.as_bytes(), "application/json");
            if status != 201 {
                bound = Some(format!("launch {} failed: {status} {body}", launched + 1));
                break 'steps;
            }
            launched += 1;
        }
        // Each new tenant answers once: its VM is up and serving.
        let hosts: Vec<String> = (first..launched).map(|i| format!("t{i}.localhost")).collect();
        if let Err(e) = requests(addr, &hosts) {
            bound = Some(format!("a request to a new tenant failed at N = {launched}: {e}"));
            break;
        }
        let rate = (launched - first) as f64 / t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(500));
        let kids = children(daemon_pid);
        let mut private: Vec<f64> = kids.iter().map(|&k| private_kib(k) as f64).collect();
        private.sort_by(|a, b| a.total_cmp(b));
        let all_private: f64 = private.iter().sum();
        let used = host_used_kib().saturating_sub(baseline);
        let ((busy0, total0), own0) = (host_jiffies(), own_ticks(daemon_pid));
        std::thread::sleep(Duration::from_secs_f64(idle_secs));
        let ((busy1, total1), own1) = (host_jiffies(), own_ticks(daemon_pid));
        let idle_cpu = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * 100.0;
        let own_cpu = own1.saturating_sub(own0) as f64 / (total1 - total0).max(1) as f64 * 100.0;
        let hosts: Vec<String> = (0..samples).map(|_| format!("t{}.localhost", pick.below(launched))).collect();
        let mut lat = match requests(addr, &hosts) {
            Ok(l) => l,
            Err(e) => {
                bound = Some(format!("a request to an idle tenant failed at N = {launched}: {e}"));
                break;
            }
        };
        lat.sort_by(|a, b| a.total_cmp(b));
        let n = launched as f64;
        println!(
            "{launched:>6} {rate:>8.1} {:>9.0} KiB {:>8.0} KiB {:>10.0} KiB {:>10.0} KiB {:>6} KiB {:>8.1}% {:>8.2}% {:>6.0} us {:>6.0} us",
            percentile(&private, 0.5),
            private.last().copied().unwrap_or(0.0),
            all_private / n,
            used as f64 / n,
            rss_kib(daemon_pid),
            idle_cpu,
            own_cpu,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        );
    }
    match &bound {
        Some(why) => println!("N is bounded here by: {why}"),
        None => println!("no launch failed up to N = {launched}"),
    }
    // Where one VM's private memory is.
    if let Some(&child) = children(daemon_pid).iter().max_by_key(|&&k| private_kib(k)) {
        println!("\none VMM child's private memory ({} KiB), by mapping:", private_kib(child));
        for (part, kib) in breakdown(child) {
            println!("  {kib:>8} KiB  {part}");
        }
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
