//! Cold starts of HTTP tenants, against `wasmtime serve`'s, in the same run.
//!
//! `cargo bench --bench coldstart` starts three daemons (release build, jailed), one per path:
//!
//! - **snapshot**: `--snapshots true`. A launch restores its component's ready state (engine built,
//!   component loaded and linked) from the snapshot the daemon made after the component's
//!   first launch, into a pooled child's pre-booted VM.
//! - **pool**: the defaults. A launch takes a pooled child's pre-booted VM, whose guest
//!   loads and links the component.
//! - **full boot**: `--pool-pre-boot false`. A pooled child (a started,
//!   jailed process) boots the VM at the launch.
//!
//! Snapshots an earlier run left in the artifact cache are removed first (a daemon restores
//! from a verified one rather than making it). Each daemon then launches each component once,
//! untimed, and the bench waits until the snapshot daemon has made its snapshots. Then, interleaved, `$WASMVISOR_BENCH_N` times
//! (200; `cargo test`: a smoke pass of 3), with a pause after each round for the pools to
//! refill:
//!
//! - **launch → first byte**, for each daemon: `PUT /v1/tenants/cN` (an HTTP tenant of
//!   `http_hello.wasm`, no VM until a request: `instances.min = 0`), then `GET /` for it on a
//!   fresh connection, timed from the PUT to the response head, with the two parts named
//!   (`put`: the API's commit; `first request`: the front door, a pooled jailed child's VM,
//!   the guest's engine, component and instance, the exchange). No VM exists when that request
//!   arrives, so the second part is also what scaling from zero adds to a request. The tenant
//!   is removed afterwards, untimed.
//! - **launch → exit**, for each daemon: `PUT` of a command tenant of `hello.wasm`, and of
//!   `python_hello.wasm` (18 MB, CPython by componentize-py), then
//!   `GET /v1/tenants/{name}?wait=true` (answered once the run's outcome is recorded), timed
//!   from the PUT to that answer; removed afterwards, untimed. Beside them the same Python
//!   component as a whole process: `wasmvisor run` (booting it, and from its snapshot with
//!   `--snapshot`), and `wasmtime run` of it precompiled.
//! - **the floor**: a VM with 16 MiB and a vCPU at CPL 3 to its first exit, in this process
//!   (`wasmvisor::floor`).
//! - **`wasmtime serve`**: process start → its first response (the component precompiled, as
//!   `wasmtime serve --allow-precompiled` runs it), on a fresh port each time.
//!
//! Then **launches/s**: for each daemon, 8 concurrent clients (`$WASMVISOR_BENCH_CLIENTS`; 0
//! skips this) each launch tenants in a loop (PUT, first `GET /`, DELETE),
//! `$WASMVISOR_BENCH_N` launches in all (at least one per client), timed as a whole.
//!
//! It prints p50/p99/mean of each, the ratios, and the daemon's own phase means (`/metrics`:
//! `http_vm_ready` is a VM's spawn to its guest's readiness, `front_door` a request's wait for
//! a VM, `pre_boot` a pooled child's VM booted ahead, `snapshot` a snapshot made in the
//! background).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use wasmvisor::images;

mod common;

use common::{ServeDaemon, api, header, row};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `GET /` with `host` on a fresh connection to `addr`, retried while nothing listens
/// there yet (until `within`): the time to the response head, and the body.
fn first_response(rt: &tokio::runtime::Runtime, addr: SocketAddr, host: &str, within: Duration) -> (Duration, Vec<u8>) {
    rt.block_on(async {
        let start = Instant::now();
        let stream = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(_) if start.elapsed() < within => tokio::time::sleep(Duration::from_micros(200)).await,
                Err(e) => panic!("nothing answers on {addr}: {e}"),
            }
        };
        stream.set_nodelay(true).unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::get("/").header(hyper::header::HOST, host).body(Empty::<Bytes>::new()).unwrap();
        let resp = sender.send_request(req).await.expect("a response");
        let head = start.elapsed();
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("a body").to_bytes().to_vec();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        (head, body)
    })
}

/// `GET /` with `host` on a fresh blocking connection, `Connection: close`: the whole response,
/// which must be a 200.
fn blocking_get(addr: SocketAddr, host: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the front door");
    write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw
}

fn main() {
    if !common::kvm_present("coldstart") {
        return;
    }
    let (_, n) = common::iterations(200, 3);
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_wasmvisor"));
    let component = images::component("http_hello");
    let dir = common::fresh_dir("coldstart-bench");
    for sub in ["snap", "pre", "boot"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    // The daemons share the default artifact cache; its snapshots (and their records of
    // verification) are made afresh by each run.
    for entry in std::fs::read_dir(wasmvisor::wasm::aot::default_cache_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".snap") || name.ends_with(".snap.verified") {
            wasmvisor::launch::remove_snapshot(&entry.path());
        }
    }
    // Path, its daemon, and its samples (total, put, first request, command launch -> exit,
    // the Python command's launch -> exit).
    let mut paths: Vec<(&str, ServeDaemon, [Vec<f64>; 5])> = [
        (
            "snapshot, restored into a pre-booted VM",
            ServeDaemon::start(exe, &dir.join("snap"), &["--snapshots", "true"]),
        ),
        ("pool, pre-booted VM", ServeDaemon::start(exe, &dir.join("pre"), &[])),
        ("full boot at launch", ServeDaemon::start(exe, &dir.join("boot"), &["--pool-pre-boot", "false"])),
    ]
    .into_iter()
    .map(|(name, daemon)| (name, daemon, Default::default()))
    .collect();
    let python = images::component("python_hello");
    let (mut spec, mut command_spec, mut python_spec) = (String::new(), String::new(), String::new());
    for (_, daemon, _) in &paths {
        let digest = daemon.upload(&component);
        spec = format!(r#"{{"component":"{digest}","instances":{{"min":0,"max":1}}}}"#);
        let digest = daemon.upload(&images::component("hello"));
        command_spec = format!(r#"{{"component":"{digest}"}}"#);
        let digest = daemon.upload(&python);
        python_spec = format!(r#"{{"component":"{digest}","args":["hi"]}}"#);
    }

    let wasmtime = common::wasmtime_cli();
    let cwasm = dir.join("http_hello.cwasm");
    let peer = wasmtime.is_file() && common::wasmtime_compile(&wasmtime, &component, &cwasm);
    if !peer {
        println!("(no wasmtime CLI at {}: run scripts/install-wasmtime-cli.sh for the comparison)", wasmtime.display());
    }

    let (mut peer_us, mut run_py, mut run_py_boot, mut peer_py) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut floor = Vec::new();
    let py_cwasm = dir.join("python_hello.cwasm");
    let peer = peer && common::wasmtime_compile(&wasmtime, &python, &py_cwasm);
    // Each component launched once (the snapshot daemon then makes its snapshots), and
    // `wasmvisor run`'s snapshot of the Python component made.
    for (_, daemon, _) in &paths {
        for (name, spec) in [("w1", &spec), ("w2", &command_spec), ("w3", &python_spec)] {
            let path = format!("/v1/tenants/{name}");
            let (status, body) = api(&daemon.socket, "PUT", &path, spec.as_bytes(), "application/json");
            assert_eq!(status, 201, "{body}");
            if name == "w1" {
                first_response(&rt, daemon.addr, "w1.localhost", Duration::ZERO);
            } else {
                api(&daemon.socket, "GET", &format!("{path}?wait=true&timeout_s=60"), b"", "text/plain");
            }
            let (status, body) = api(&daemon.socket, "DELETE", &path, b"", "application/json");
            assert_eq!(status, 204, "{body}");
        }
    }
    let waited = Instant::now();
    while common::metric(&paths[0].1.socket, "wasmvisor_snapshots_made_total") < 3.0 {
        assert!(waited.elapsed() < Duration::from_secs(60), "the snapshot daemon made no snapshots");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Command::new(exe).args(["run", "--snapshot"]).arg(&python).arg("hi").output().unwrap().status.success());
    for i in 0..n {
        // Both pools refilled (100 ms after a launch took a child, then its pre-boot).
        std::thread::sleep(Duration::from_millis(250));
        let name = format!("c{i}");
        // Each round starts with another daemon: the first after the pause finds colder caches.
        let count = paths.len();
        paths.rotate_left(i % count);
        for (_, daemon, [total, put, first, command, py]) in &mut paths {
            let t = Instant::now();
            let path = format!("/v1/tenants/{name}");
            let (status, body) = api(&daemon.socket, "PUT", &path, spec.as_bytes(), "application/json");
            let put_done = t.elapsed();
            assert_eq!(status, 201, "{body}");
            let (head, body) = first_response(&rt, daemon.addr, &format!("{name}.localhost"), Duration::ZERO);
            assert_eq!(body, b"Hello, world!\n");
            total.push((put_done + head).as_secs_f64() * 1e6);
            put.push(put_done.as_secs_f64() * 1e6);
            first.push(head.as_secs_f64() * 1e6);
            let (status, body) = api(&daemon.socket, "DELETE", &path, b"", "application/json");
            assert_eq!(status, 204, "{body}");

            for (prefix, spec, samples) in [("x", &command_spec, &mut *command), ("py", &python_spec, &mut *py)] {
                let path = format!("/v1/tenants/{prefix}{name}");
                let t = Instant::now();
                let (status, body) = api(&daemon.socket, "PUT", &path, spec.as_bytes(), "application/json");
                assert_eq!(status, 201, "{body}");
                let waited = format!("{path}?wait=true&timeout_s=30");
                let (status, body) = api(&daemon.socket, "GET", &waited, b"", "text/plain");
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                assert!(status == 200 && body.contains(r#""exit_code":0"#), "{status} {body}");
                let (status, body) = api(&daemon.socket, "DELETE", &path, b"", "application/json");
                assert_eq!(status, 204, "{body}");
            }
        }
        paths.rotate_right(i % count);
        for (flags, samples) in [(&["--snapshot"][..], &mut run_py), (&[][..], &mut run_py_boot)] {
            let t = Instant::now();
            let out = Command::new(exe).arg("run").args(flags).arg(&python).arg("hi").output().unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(out.status.success() && out.stdout.starts_with(b"hello from python"), "{out:?}");
        }
        let kvm = wasmvisor::VmConfig::default().kvm_device;
        floor.push(wasmvisor::floor::floor_boot(&kvm, false).expect("the floor").as_secs_f64() * 1e6);
        if peer {
            let t = Instant::now();
            let out =
                Command::new(&wasmtime).args(["run", "--allow-precompiled"]).arg(&py_cwasm).arg("hi").output().unwrap();
            peer_py.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(out.status.success() && out.stdout.starts_with(b"hello from python"), "{out:?}");
        }

        if peer {
            let port = free_port();
            let waddr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let t = Instant::now();
            let mut child = Some(
                Command::new(&wasmtime)
                    .args(["serve", "--addr", &waddr.to_string(), "-S", "cli=y", "--allow-precompiled"])
                    .arg(&cwasm)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let (_, body) = first_response(&rt, waddr, "localhost", Duration::from_secs(30));
            peer_us.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(body, b"Hello, world!\n");
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    println!("\nHTTP cold starts of http_hello.wasm, {n} each, interleaved");
    header(52);
    let mut p50s = Vec::new();
    let mut py_p50s = Vec::new();
    for (name, _, [total, put, first, command, py]) in &paths {
        println!("wasmvisor, {name}:");
        let p_total = row(52, "  API launch -> first response head", total.clone());
        row(52, "    put (API commit)", put.clone());
        let p_first = row(52, "    first request (scale from zero)", first.clone());
        row(52, "  hello command: API launch -> exit recorded", command.clone());
        py_p50s.push((name, row(52, "  python_hello: API launch -> exit recorded", py.clone())));
        p50s.push((name, p_total, p_first));
    }
    let p_run_py = row(52, "wasmvisor run --snapshot python_hello.wasm", run_py);
    let p_run_py_boot = row(52, "wasmvisor run python_hello.wasm (whole process)", run_py_boot);
    let p_floor = row(52, "the floor: VM + vCPU, CPL 3 to its first exit", floor);
    println!("\nratios (p50) to the floor:");
    for (name, p_total, p_first) in &p50s {
        println!(
            "  {name}: launch -> first response {:.2}x; first request {:.2}x",
            p_total / p_floor,
            p_first / p_floor
        );
    }
    if peer {
        let p_peer = row(52, "wasmtime serve: process start -> first response", peer_us);
        let p_peer_py = row(52, "wasmtime run python_hello.cwasm (whole process)", peer_py);
        println!("\nratios (p50) to wasmtime serve's start:");
        for (name, p_total, p_first) in &p50s {
            println!(
                "  {name}: launch -> first response {:.2}x; scale from zero {:.2}x",
                p_total / p_peer,
                p_first / p_peer
            );
        }
        println!("ratios (p50) to wasmtime run of python_hello:");
        for (name, p) in &py_p50s {
            println!("  {name}: API launch -> exit {:.2}x", p / p_peer_py);
        }
        println!("  wasmvisor run: {:.2}x (--snapshot {:.2}x)", p_run_py_boot / p_peer_py, p_run_py / p_peer_py);
    }
    // `$WASMVISOR_BENCH_CLIENTS` (8; 0: skip this part, so that the phases below are the
    // sequential launches' alone).
    let clients: usize = std::env::var("WASMVISOR_BENCH_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let per_client = n.div_ceil(clients.max(1)).max(1);
    if clients > 0 {
        println!("\nlaunches/s, {clients} concurrent clients, {} launches each (PUT, first GET, DELETE)", per_client);
    }
    for (name, daemon, _) in paths.iter().filter(|_| clients > 0) {
        let t = Instant::now();
        std::thread::scope(|scope| {
            for c in 0..clients {
                let (socket, addr, spec) = (&daemon.socket, daemon.addr, &spec);
                scope.spawn(move || {
                    for i in 0..per_client {
                        let tenant = format!("l{c}x{i}");
                        let path = format!("/v1/tenants/{tenant}");
                        let (status, body) = api(socket, "PUT", &path, spec.as_bytes(), "application/json");
                        assert_eq!(status, 201, "{body}");
                        assert!(blocking_get(addr, &format!("{tenant}.localhost")).ends_with("Hello, world!\n"));
                        let (status, body) = api(socket, "DELETE", &path, b"", "application/json");
                        assert_eq!(status, 204, "{body}");
                    }
                });
            }
        });
        let secs = t.elapsed().as_secs_f64();
        println!("  {name:<40} {:>8.0} launches/s", (clients * per_client) as f64 / secs);
    }
    for (name, daemon, _) in &paths {
        println!("\nthe daemon's phases ({name}), mean per cold start (its /metrics):");
        for metric in ["wasmvisor_launch_seconds", "wasmvisor_http_request_seconds"] {
            for (phase, sum, count) in common::phases(&daemon.socket, metric) {
                if count > 0.0 {
                    println!("  {phase:<14} {:>8.0} us over {count:.0}", sum / count * 1e6);
                }
            }
        }
    }
    drop(paths);
    let _ = std::fs::remove_dir_all(&dir);
}
