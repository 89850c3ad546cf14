//! Front-door benchmark: wasmvisor's front door against `wasmtime serve` on the same HTTP
//! component (`http_hello.wasm`), with the same load generator, in the same run.
//!
//! `cargo bench --bench http` starts a daemon (release build) with two tenants of the hello
//! component, `one` (instances max 1) and `two` (max 2), and `wasmtime serve` (the CLI
//! `scripts/install-wasmtime-cli.sh` installs; skipped with a note if it is absent) on the same
//! component, precompiled. The load generator is in this file: keep-alive HTTP/1.1 connections
//! (hyper's client on one tokio thread), each sending its next request when the last answer
//! is read, for a fixed time, recording every latency. It runs concurrency 1 and 16 for
//! `WASMVISOR_BENCH_SECS` seconds each (default 10) against each server, and prints
//! requests/s, p50 and p99, the ratios to `wasmtime serve`, and the daemon's own per-request
//! phases from `/metrics` (`front_door`: arrival to a VM; `guest_head`: request sent to the
//! response head, i.e. vsock both ways, a fresh instance and the handler; `exchange`: to the
//! response's end). Server and client share the host's cores, as they do for `wrk`.
//!
//! Last, `noisy`: tenant `one` at c=1 again, while a command tenant spins in a VM of its own
//! (its cgroup's default CPU quota, one core), against unloaded c=1 runs interleaved with the
//! loaded ones (see [`noisy`]): the jail's CPU limit keeps a noisy neighbour from taking the host.
//!
//! Under `cargo test` it runs a smoke pass of half a second per case. `WASMVISOR_BENCH_CASES`
//! (a comma list of `c1`, `w1`, `c16x2`, `c16x1`, `w16`, `noisy`) runs only those cases.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use wasmvisor::images;

mod common;

use common::{ServeDaemon, api};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one load run measured.
struct Load {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies_us: Vec<f64>,
}

/// `connections` keep-alive clients sending GET / with `host` to `addr` for `secs`.
fn load(addr: SocketAddr, host: &str, connections: usize, secs: f64) -> Load {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    runtime.block_on(async {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let host = host.to_string();
            tasks.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                stream.set_nodelay(true).unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
                tokio::spawn(conn);
                let mut lat = Vec::new();
                let mut errors = 0;
                while Instant::now() < until {
                    let req = hyper::Request::get("/")
                        .header(hyper::header::HOST, host.as_str())
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let t = Instant::now();
                    match sender.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                            match body {
                                Ok(b) if status == 200 && b.as_ref() == b"Hello, world!\n" => {
                                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                                }
                                other => {
                                    errors += 1;
                                    eprintln!("load: {status}: {other:?}");
                                }
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            eprintln!("load: request failed: {e}");
                            break;
                        }
                    }
                }
                (lat, errors)
            }));
        }
        let started = Instant::now();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (lat, e) = t.await.unwrap();
            all.extend(lat);
            errors += e;
        }
        Load { requests: all.len(), errors, elapsed: started.elapsed(), latencies_us: all }
    })
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {addr}");
}

fn report(name: &str, l: &Load) -> (f64, f64, f64) {
    let mut us = l.latencies_us.clone();
    us.sort_by(|a, b| a.total_cmp(b));
    let rps = l.requests as f64 / l.elapsed.as_secs_f64();
    let (p50, p99) =
        if us.is_empty() { (0.0, 0.0) } else { (common::percentile(&us, 0.5), common::percentile(&us, 0.99)) };
    println!("{name:<44} {rps:>10.0} {p50:>10.0} {p99:>10.0} {:>8}", l.errors);
    // A failed request is a bug here (the queues hold every client): a VM that stops
    // answering shows up as 503s once the request time limit passes.
    assert_eq!(l.errors, 0, "{name}: requests failed");
    (rps, p50, p99)
}

/// The `noisy` case: tenant `one` at c=1 with and without a spinning neighbour, in
/// `WASMVISOR_BENCH_NOISY_ROUNDS` rounds (default 5; 1 in the smoke pass) of `secs / rounds`
/// each way, the order alternating per round, so that the host's own noise (these machines are
/// shared) falls on both sides alike. The spinner is a tenant of its own, put before and
/// deleted (its VM reaped) after each loaded half. Prints each round and the pooled figures.
fn noisy(socket: &Path, addr: SocketAddr, secs: f64) {
    let spin = std::fs::read(images::component("spin")).unwrap();
    let (status, body) = api(socket, "POST", "/v1/components", &spin, "application/wasm");
    assert_eq!(status, 201, "{body}");
    let spin = body.split("\"digest\":\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    // WASMVISOR_BENCH_NOISY_MILLIS: the spinner's CPU quota (default: the daemon's, one core).
    let limits = std::env::var("WASMVISOR_BENCH_NOISY_MILLIS")
        .map(|m| format!(r#","limits":{{"cpu_millis":{}}}"#, m.parse::<u32>().expect("a count")))
        .unwrap_or_default();
    let spec = format!(r#"{{"component":"{spin}","timeout_s":600{limits}}}"#);
    let rounds: usize = match std::env::var("WASMVISOR_BENCH_NOISY_ROUNDS") {
        Ok(v) => v.parse().expect("WASMVISOR_BENCH_NOISY_ROUNDS is a count"),
        Err(_) if secs >= 2.0 => 5,
        Err(_) => 1,
    };
    let each = secs / rounds as f64;
    let (mut quiet, mut loud) = (Vec::new(), Vec::new());
    let mut errors = 0;
    for round in 0..rounds {
        let mut p99 = [0.0; 2];
        for half in 0..2 {
            let spinning = (round + half) % 2 == 1;
            if spinning {
                let (status, body) = api(socket, "PUT", "/v1/tenants/noisy", spec.as_bytes(), "application/json");
                assert_eq!(status, 201, "{body}");
                std::thread::sleep(Duration::from_millis(300));
            }
            let mut l = load(addr, "one.localhost", 1, each);
            errors += l.errors;
            l.latencies_us.sort_by(|a, b| a.total_cmp(b));
            p99[usize::from(spinning)] = common::percentile(&l.latencies_us, 0.99);
            if spinning {
                loud.extend(l.latencies_us);
                let (status, body) = api(socket, "DELETE", "/v1/tenants/noisy", b"", "application/json");
                assert_eq!(status, 204, "{body}");
            } else {
                quiet.extend(l.latencies_us);
            }
        }
        println!("  round {}: p99 {:.0} us unloaded, {:.0} us beside the spinner", round + 1, p99[0], p99[1]);
    }
    let pooled = |name: &str, mut us: Vec<f64>| {
        us.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (common::percentile(&us, 0.5), common::percentile(&us, 0.99));
        println!("{name:<44} {:>10.0} {p50:>10.0} {p99:>10.0}", us.len() as f64 / (each * rounds as f64));
        (p50, p99)
    };
    let q = pooled("wasmvisor c=1, unloaded halves", quiet);
    let n = pooled("wasmvisor c=1 beside a spinning tenant", loud);
    println!(
        "  beside a spinning tenant: p50 {:.2}x, p99 {:.2}x its unloaded figures, {rounds} rounds \
         interleaved, {errors} errors (goal p99 <= 2x)",
        n.0 / q.0,
        n.1 / q.1
    );
    assert_eq!(errors, 0, "requests failed while a neighbour spun");
}

fn main() {
    if !common::kvm_present("http") {
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let secs: f64 = match std::env::var("WASMVISOR_BENCH_SECS") {
        Ok(v) => v.parse().expect("WASMVISOR_BENCH_SECS is a number"),
        Err(_) if bench => 10.0,
        Err(_) => 0.5,
    };
    let exe = Path::new(env!("CARGO_BIN_EXE_wasmvisor"));
    let component = images::component("http_hello");
    let dir = common::fresh_dir("http-bench");
    let daemon = ServeDaemon::start(exe, &dir, &[]);
    let (socket, addr) = (daemon.socket.clone(), daemon.addr);
    let digest = daemon.upload(&component);
    for (name, max) in [("one", 1), ("two", 2)] {
        let spec = format!(r#"{{"component":"{digest}","instances":{{"min":{max},"max":{max},"queue":4096}}}}"#);
        let (status, body) = api(&socket, "PUT", &format!("/v1/tenants/{name}"), spec.as_bytes(), "application/json");
        assert_eq!(status, 201, "{body}");
    }
    // Warm: both tenants' VMs up.
    let _ = load(addr, "one.localhost", 1, 0.3);
    let _ = load(addr, "two.localhost", 2, 0.3);

    let wasmtime = common::wasmtime_cli();
    let peer = if wasmtime.is_file() {
        let cwasm = dir.join("http_hello.cwasm");
        assert!(common::wasmtime_compile(&wasmtime, &component, &cwasm), "wasmtime compile failed");
        let wport = free_port();
        let waddr: SocketAddr = format!("127.0.0.1:{wport}").parse().unwrap();
        let child = Command::new(&wasmtime)
            .args(["serve", "--addr", &waddr.to_string(), "-S", "cli=y", "--allow-precompiled"])
            .arg(&cwasm)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = Killed(child);
        let mut err = BufReader::new(child.0.stderr.take().unwrap());
        let mut line = String::new();
        let _ = err.read_line(&mut line);
        wait_listening(waddr, Duration::from_secs(30));
        let _ = load(waddr, "localhost", 1, 0.3);
        Some((child, waddr))
    } else {
        println!("(no wasmtime CLI at {}: run scripts/install-wasmtime-cli.sh for the comparison)", wasmtime.display());
        None
    };

    println!("\nhttp_hello.wasm, GET /, keep-alive, {secs} s per case");
    println!("{:<44} {:>10} {:>10} {:>10} {:>8}", "", "req/s", "p50 us", "p99 us", "errors");
    // WASMVISOR_BENCH_CASES=c1,c16x2,... runs only those cases (to profile one of them).
    let only = std::env::var("WASMVISOR_BENCH_CASES").ok();
    let run = |case: &str| only.as_deref().is_none_or(|o| o.split(',').any(|c| c == case));
    let before = common::phases(&socket, "wasmvisor_http_request_seconds");
    let v1 = run("c1").then(|| report("wasmvisor c=1 (max 1 VM)", &load(addr, "one.localhost", 1, secs)));
    let after = common::phases(&socket, "wasmvisor_http_request_seconds");
    let w1 =
        peer.as_ref().filter(|_| run("w1")).map(|(_, a)| report("wasmtime serve c=1", &load(*a, "localhost", 1, secs)));
    let v16 = run("c16x2").then(|| report("wasmvisor c=16 (max 2 VMs)", &load(addr, "two.localhost", 16, secs)));
    let v16_one = run("c16x1").then(|| report("wasmvisor c=16 (max 1 VM)", &load(addr, "one.localhost", 16, secs)));
    let w16 = peer
        .as_ref()
        .filter(|_| run("w16"))
        .map(|(_, a)| report("wasmtime serve c=16", &load(*a, "localhost", 16, secs)));
    if let (Some(v1), Some(w1), Some(v16), Some(v16_one), Some(w16)) = (v1, w1, v16, v16_one, w16) {
        println!("\nratios to wasmtime serve (same run):");
        println!("  c=1  p50: {:.2}x (goal <= 1.5x), req/s {:.2}x", v1.1 / w1.1, v1.0 / w1.0);
        println!(
            "  c=16 req/s: {:.2}x with max 2 VMs (goal >= 1.0x, bar 0.5x), {:.2}x with max 1",
            v16.0 / w16.0,
            v16_one.0 / w16.0
        );
        println!("  c=16 p50: {:.2}x, p99: {:.2}x", v16.1 / w16.1, v16.2 / w16.2);
    }
    if run("noisy") {
        noisy(&socket, addr, secs);
    }
    println!("\nfront-door phases at c=1 (daemon's histograms, mean per request):");
    for (phase, sum, count) in &after {
        let (s0, c0) = before.iter().find(|(p, _, _)| p == phase).map(|(_, s, c)| (*s, *c)).unwrap_or((0.0, 0.0));
        let n = count - c0;
        if n > 0.0 {
            println!("  {phase:<12} {:>8.1} us over {n:.0} requests", (sum - s0) / n * 1e6);
        }
    }
    drop(peer);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
