//! Daemon benchmark: launching command tenants through `wasmvisor serve`'s API, against the
//! whole `wasmvisor run` process, in the same run.
//!
//! `cargo bench --bench daemon` measures:
//! (a) N launches (default 200) of hello.wasm through the API, each a new tenant: `PUT
//!     /v1/tenants/NAME` answered (spec committed, VMM child spawned) and then its recorded exit
//!     (`GET ...?wait=true` answered), interleaved with N `wasmvisor run hello.wasm` processes;
//!     the daemon's own phase means from `/metrics` (child spawn, VMM phases, total);
//! (b) launches per second with 8 concurrent clients, each launching, waiting for the exit and
//!     removing its tenants (50 each), in 5 rounds, and the CPU each launch costs (daemon,
//!     VMM children, the clients);
//! (c) the daemon's resident memory: idle after start, after the upload (compiling), and with
//!     100 settled tenants held (per-tenant overhead), its threads, and its idle VMM children.
//!
//! Under `cargo test` it runs a short smoke pass. `WASMVISOR_BENCH_N` sets N;
//! `WASMVISOR_BENCH_SERVE_ARGS` adds arguments to `serve` (`--insecure-no-jail`: the same
//! launches with unjailed VMM children, to see what the jail costs).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wasmvisor::images;

mod common;
#[path = "../../tests/common/mod.rs"]
mod test_common;

use test_common::children_of;

fn row(name: &str, us: Vec<f64>) -> f64 {
    common::row(52, name, us)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

/// CPU seconds of `pid` itself and of its reaped children (utime + stime, cutime + cstime).
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<f64> =
        stat.rsplit(')').next().unwrap().split_whitespace().skip(11).take(4).map(|v| v.parse().unwrap()).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ((f[0] + f[1]) / hz, (f[2] + f[3]) / hz)
}

/// This process's own CPU seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

struct Daemon {
    process: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Launches tenant `name` and waits for its exit: (PUT answered, exit recorded) in µs.
fn launch(socket: &Path, name: &str, spec: &[u8]) -> (f64, f64) {
    let t = Instant::now();
    let (status, body) = common::api(socket, "PUT", &format!("/v1/tenants/{name}"), spec, "application/json");
    assert_eq!(status, 201, "{body}");
    let put = t.elapsed().as_secs_f64() * 1e6;
    let (status, text) = common::api(socket, "GET", &format!("/v1/tenants/{name}?wait=true"), b"", "application/json");
    let exit = t.elapsed().as_secs_f64() * 1e6;
    assert!(status == 200 && text.contains("\"exit_code\":0"), "{text}");
    (put, exit)
}

fn remove(socket: &Path, name: &str) {
    let (status, body) =
        common::api(socket, "DELETE", &format!("/v1/tenants/{name}?purge=true"), b"", "application/json");
    assert_eq!(status, 204, "{body}");
}

fn main() {
    let (bench, n) = common::iterations(200, 3);
    let per_client = if bench { 50 } else { 2 };
    let held = if bench { 100 } else { 5 };
    if !test_common::kvm_available("the daemon benchmark") {
        return;
    }
    let exe = Path::new(env!("CARGO_BIN_EXE_wasmvisor"));
    let hello = images::component("hello");
    assert!(hello.is_file(), "build the components first: scripts/build-images.sh");
    let dir = std::env::temp_dir().join(format!("wasmvisor-bench-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = dir.join("cache");
    let socket = dir.join("api.sock");
    let process = Command::new(exe)
        .args(["serve", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--cache-dir")
        .arg(&cache)
        .args(std::env::var("WASMVISOR_BENCH_SERVE_ARGS").unwrap_or_default().split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let daemon = Daemon { process };
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = daemon.process.id();
    std::thread::sleep(Duration::from_millis(200));
    let rss_idle = rss_kib(pid);
    let threads_idle = threads(pid);

    // Upload (compiles hello for the guest into the daemon's cache).
    let bytes = std::fs::read(&hello).unwrap();
    let t = Instant::now();
    let mut s = UnixStream::connect(&socket).unwrap();
    let head = format!(
        "POST /v1/components HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&bytes).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let upload_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(raw.starts_with("HTTP/1.1 201"), "{raw}");
    let digest = raw.split("\"digest\":\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let spec = format!("{{\"component\":\"{digest}\"}}").into_bytes();
    let rss_uploaded = rss_kib(pid);

    println!(
        "wasmvisor daemon benchmark | {} CPUs | {n} launches | upload + compile of hello.wasm {upload_ms:.0} ms",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    common::header(52);

    // (a) Interleaved: an API launch, then a whole `wasmvisor run` process (same cache).
    let warm = launch(&socket, "warm", &spec);
    let _ = warm;
    remove(&socket, "warm");
    let (mut puts, mut exits, mut runs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("b{i}");
        let (put, exit) = launch(&socket, &name, &spec);
        puts.push(put);
        exits.push(exit);
        remove(&socket, &name);
        let t = Instant::now();
        let status = Command::new(exe)
            .args(["run"])
            .arg(&hello)
            .env("WASMVISOR_CACHE_DIR", &cache)
            .env("WASMVISOR_DATA_DIR", dir.join("run-data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        runs.push(t.elapsed().as_secs_f64() * 1e6);
    }
    row("API: PUT answered (committed, child spawned)", puts);
    let api = row("API: launch to recorded exit (hello)", exits);
    let run = row("`wasmvisor run hello.wasm`, whole process", runs);
    println!("{:<52} {:>10.2}", "ratio API launch / wasmvisor run (p50)", api / run);
    println!("daemon phase means (us, from /metrics):");
    for (phase, sum, count) in common::phases(&socket, "wasmvisor_launch_seconds") {
        if count > 0.0 {
            println!("  {phase:<14} {:>10.0}", sum / count * 1e6);
        }
    }

    // (b) 8 concurrent clients, in rounds (this host is shared and noisy: each round's rate).
    let clients = 8;
    let rounds = if bench { 5 } else { 1 };
    let (mut rates, mut all_lat) = (Vec::new(), Vec::new());
    let (daemon_cpu0, children_cpu0) = cpu_seconds(pid);
    let bench_cpu0 = own_cpu_seconds();
    let t_all = Instant::now();
    for round in 0..rounds {
        let t = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                let socket = socket.clone();
                let spec = spec.clone();
                std::thread::spawn(move || {
                    let mut lat = Vec::new();
                    for i in 0..per_client {
                        let name = format!("c{round}-{c}-{i}");
                        lat.push(launch(&socket, &name, &spec).1);
                        remove(&socket, &name);
                    }
                    lat
                })
            })
            .collect();
        let lat: Vec<f64> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        rates.push(lat.len() as f64 / t.elapsed().as_secs_f64());
        all_lat.extend(lat);
    }
    let elapsed = t_all.elapsed().as_secs_f64();
    let total = all_lat.len();
    let (daemon_cpu1, children_cpu1) = cpu_seconds(pid);
    let bench_cpu = own_cpu_seconds() - bench_cpu0;
    row(&format!("{clients} clients: launch to recorded exit"), all_lat);
    let mut sorted = rates.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{:<52} {:>10.1}   (median of {rounds} rounds of {} launches + removals: {})",
        format!("{clients} clients: launches/s"),
        common::percentile(&sorted, 0.5),
        clients * per_client,
        rates.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(", ")
    );
    let per = |cpu: f64| cpu / total as f64 * 1e3;
    println!(
        "CPU per launch + removal: daemon {:.2} ms, VMM children {:.2} ms, these clients {:.2} ms ({:.2} ms of {:.2} ms available)",
        per(daemon_cpu1 - daemon_cpu0),
        per(children_cpu1 - children_cpu0),
        per(bench_cpu),
        per(daemon_cpu1 - daemon_cpu0 + children_cpu1 - children_cpu0 + bench_cpu),
        per(elapsed * std::thread::available_parallelism().map_or(1, |p| p.get()) as f64)
    );

    // (c) Memory: hold settled tenants.
    for i in 0..held {
        launch(&socket, &format!("h{i}"), &spec);
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss_held = rss_kib(pid);
    let threads_held = threads(pid);
    println!(
        "daemon RSS: idle {rss_idle} KiB ({threads_idle} threads); after the upload {rss_uploaded} KiB; \
         with {held} settled tenants {rss_held} KiB ({threads_held} threads): {:.1} KiB and {:.2} threads per tenant",
        (rss_held as f64 - rss_uploaded as f64) / held as f64,
        (threads_held as f64 - threads_idle as f64) / held as f64
    );
    let idle = children_of(pid);
    let idle_rss: Vec<u64> = idle.iter().map(|&p| rss_kib(p)).collect();
    println!(
        "idle VMM children (the pool): {} of {:?} KiB RSS each (mostly the binary's page-cache pages, shared)",
        idle.len(),
        idle_rss
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
