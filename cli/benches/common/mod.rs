//! What the benchmarks share: percentiles and the p50/p99/mean rows they print, a daemon to
//! measure and calls on its API socket.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One API call on the daemon's Unix socket: status and body.
pub fn api(socket: &Path, method: &str, path: &str, body: &[u8], content_type: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("the daemon's socket");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let status = std::str::from_utf8(&raw[9..12]).unwrap().parse().unwrap();
    (status, String::from_utf8_lossy(&raw[end + 4..]).into_owned())
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[(((sorted.len() as f64 - 1.0) * p).round() as usize).min(sorted.len() - 1)]
}

/// Prints a `width`-wide name and the p50/p99/mean of samples in microseconds; returns the p50.
pub fn row(width: usize, name: &str, mut us: Vec<f64>) -> f64 {
    us.sort_by(|a, b| a.total_cmp(b));
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    let p50 = percentile(&us, 0.5);
    println!("{name:<width$} {p50:>10.0} {:>10.0} {mean:>10.0}", percentile(&us, 0.99));
    p50
}

/// The header line over [`row`]s.
pub fn header(width: usize) {
    println!("{:<width$} {:>10} {:>10} {:>10}", "", "p50 us", "p99 us", "mean us");
}

/// Whether this is a real benchmark run (`cargo bench`) rather than `cargo test`'s smoke pass,
/// and the iteration count: `$WASMVISOR_BENCH_N`, else `bench_n` or `smoke_n`.
pub fn iterations(bench_n: usize, smoke_n: usize) -> (bool, usize) {
    let bench = std::env::args().any(|a| a == "--bench");
    let n = match std::env::var("WASMVISOR_BENCH_N") {
        Ok(v) => v.parse().expect("WASMVISOR_BENCH_N is a count"),
        Err(_) if bench => bench_n,
        Err(_) => smoke_n,
    };
    (bench, n)
}

/// The value of the unlabelled metric `name` (e.g. `wasmvisor_snapshots_made_total`) in the
/// daemon's `/metrics`, 0 if it is not there.
pub fn metric(socket: &Path, name: &str) -> f64 {
    let (_, text) = api(socket, "GET", "/metrics", b"", "text/plain");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// The daemon's histogram sums and counts per phase of `metric` (e.g.
/// `wasmvisor_http_request_seconds`), from its `/metrics`.
pub fn phases(socket: &Path, metric: &str) -> Vec<(String, f64, f64)> {
    let (_, text) = api(socket, "GET", "/metrics", b"", "text/plain");
    let mut out: Vec<(String, f64, f64)> = Vec::new();
    for line in text.lines() {
        for (suffix, is_sum) in [("_sum{", true), ("_count{", false)] {
            let Some(rest) = line.strip_prefix(&format!("{metric}{suffix}")) else { continue };
            let Some((labels, value)) = rest.split_once("} ") else { continue };
            let phase = labels.trim_start_matches("phase=\"").trim_end_matches('"').to_string();
            let value: f64 = value.trim().parse().unwrap_or(0.0);
            match out.iter_mut().find(|(p, _, _)| *p == phase) {
                Some(e) => {
                    if is_sum {
                        e.1 = value
                    } else {
                        e.2 = value
                    }
                }
                None => out.push(if is_sum { (phase, value, 0.0) } else { (phase, 0.0, value) }),
            }
        }
    }
    out
}

/// Whether KVM is here for `bench`: a loud skip where it is not, a failure when `CI=true`.
pub fn kvm_present(bench: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but /dev/kvm is missing");
    eprintln!("SKIPPED {bench} bench: /dev/kvm is missing");
    false
}

/// An empty directory of this run's, `<tmp>/wasmvisor-<name>-<pid>`.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmvisor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A daemon (`wasmvisor serve`, jailed as in production) with its data, API socket and log
/// under `dir`, its front door on a free loopback port; stopped as an operator would (SIGTERM,
/// which stops its children) when dropped.
pub struct ServeDaemon {
    pub child: Child,
    pub socket: PathBuf,
    pub addr: SocketAddr,
}

impl ServeDaemon {
    /// Starts it with `extra` arguments and waits until both its API and its front door
    /// answer.
    pub fn start(exe: &Path, dir: &Path, extra: &[&str]) -> Self {
        let socket = dir.join("api.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(exe)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--api-socket")
            .arg(&socket)
            .args(["--http-listen", &addr.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&socket).is_err() || std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start: see {}", dir.join("daemon.log").display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket, addr }
    }

    /// Uploads a component; returns its digest.
    pub fn upload(&self, component: &Path) -> String {
        let bytes = std::fs::read(component).unwrap();
        let (status, body) = api(&self.socket, "POST", "/v1/components", &bytes, "application/wasm");
        assert_eq!(status, 201, "{body}");
        body.split("\"digest\":\"").nth(1).unwrap().split('"').next().unwrap().to_string()
    }
}

impl Drop for ServeDaemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the daemon's own pid, a process this one started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peer's CLI: `$WASMTIME`, else the one `scripts/install-wasmtime-cli.sh` installs.
pub fn wasmtime_cli() -> PathBuf {
    std::env::var_os("WASMTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasmtime-cli/bin/wasmtime"))
}

/// `wasmtime compile COMPONENT -o OUT` with the peer's CLI: whether it succeeded.
pub fn wasmtime_compile(wasmtime: &Path, component: &Path, out: &Path) -> bool {
    Command::new(wasmtime).arg("compile").arg(component).arg("-o").arg(out).status().is_ok_and(|s| s.success())
}
