//! Integration tests for `wasmvisor serve`: a real daemon in a temporary data directory, driven
//! through the CLI client and through raw HTTP/1.1 on its Unix socket, with real KVM VMs.
//!
//! Tests that need KVM skip loudly where `/dev/kvm` is absent, and fail when `CI=true`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmvisor::images;

use common::{TempDir, children_of, code, kvm_available, read_edge_files, stderr, stdout};

mod common;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wasmvisor"))
}

/// A daemon under test; killed (-9) when dropped.
struct Daemon {
    process: Child,
    data: PathBuf,
    socket: PathBuf,
    extra: Vec<String>,
}

impl Daemon {
    fn start(dir: &TempDir) -> Self {
        Self::start_with(dir, &[])
    }

    fn start_with(dir: &TempDir, extra: &[&str]) -> Self {
        let data = dir.path().join("data");
        let socket = dir.path().join("api.sock");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let process = spawn_daemon(&data, &socket, &extra);
        let d = Self { process, data, socket, extra };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the daemon did not listen on {} within 60 s", self.socket.display());
    }

    /// `kill -9`, then a new daemon on the same data directory.
    fn kill9_and_restart(&mut self) {
        self.process.kill().unwrap();
        self.process.wait().unwrap();
        self.process = spawn_daemon(&self.data, &self.socket, &self.extra);
        self.wait_ready();
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    fn http(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Response {
        http(&self.socket, method, path, body, &[])
    }

    fn json(&self, method: &str, path: &str, body: Value) -> Response {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.http(method, path, Some(("application/json", &bytes)))
    }

    fn upload(&self, component: &str) -> String {
        let bytes = std::fs::read(images::component(component)).unwrap();
        let r = self.http("POST", "/v1/components", Some(("application/wasm", &bytes)));
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["digest"].as_str().unwrap().to_owned()
    }

    fn put(&self, name: &str, spec: Value) -> Response {
        self.json("PUT", &format!("/v1/tenants/{name}"), spec)
    }

    /// The tenant once it has settled.
    fn settled(&self, name: &str) -> Value {
        let r = self.http("GET", &format!("/v1/tenants/{name}?wait=true&timeout_s=60"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_ne!(v["status"]["restart_pending"], json!(true));
        assert!(matches!(v["status"]["state"].as_str(), Some("exited" | "failed" | "stopped")), "{v}");
        v
    }

    fn logs(&self, name: &str) -> String {
        let r = self.http("GET", &format!("/v1/tenants/{name}/logs"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }

    /// Waits until `name`'s VM runs and returns its VMM child's pid.
    fn running_pid(&self, name: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let v = self.http("GET", &format!("/v1/tenants/{name}"), None).json();
            if v["status"]["state"] == "running"
                && let Some(pid) = v["status"]["pid"].as_u64()
            {
                return pid as u32;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{name} did not start running");
    }

    fn cli(&self, args: &[&str]) -> Output {
        let socket = self.socket.to_str().unwrap();
        let mut full = vec![args[0], "--api-socket", socket];
        full.extend_from_slice(&args[1..]);
        Command::new(exe()).args(&full).output().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn spawn_daemon(data: &Path, socket: &Path, extra: &[String]) -> Child {
    // The daemon's own log goes next to its data (appended across restarts).
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.parent().unwrap().join(format!("daemon-{}.log", socket.file_name().unwrap().to_string_lossy())))
        .unwrap();
    Command::new(exe())
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--api-socket")
        .arg(socket)
        // Tests run side by side: each front door on a port of its own.
        .args(if extra.iter().any(|a| a == "--http-listen") { &[][..] } else { &["--http-listen", "127.0.0.1:0"][..] })
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// An HTTP answer.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// An error answer: the status and its `{"error": ...}` message.
    fn error(&self) -> (u16, String) {
        let v = self.json();
        let keys: Vec<&String> = v.as_object().expect("an object").keys().collect();
        assert_eq!(keys, ["error"], "{v}");
        (self.status, v["error"].as_str().unwrap().to_owned())
    }
}

/// One raw HTTP/1.1 exchange on a fresh connection (`Connection: close`).
fn http(socket: &Path, method: &str, path: &str, body: Option<(&str, &[u8])>, headers: &[(&str, &str)]) -> Response {
    let mut s = UnixStream::connect(socket).unwrap();
    exchange(&mut s, method, path, body, headers)
}

fn exchange(
    s: &mut (impl Read + Write),
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    headers: &[(&str, &str)],
) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let payload = body.map(|(_, b)| b).unwrap_or_default();
    if let Some((ct, b)) = body {
        req.push_str(&format!("Content-Type: {ct}\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A peer may answer (413) before reading the whole body and close: not an error here.
    let _ = s.write_all(payload);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head");
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body
    } else {
        rest.to_vec()
    };
    Response { status, headers, body }
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose (its parent has not reaped it yet).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn wait_dead(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn stdout_lines(log: &str) -> Vec<&str> {
    log.lines().filter_map(|l| l.split_once(" stdout ").map(|(_, text)| text)).collect()
}

#[test]
fn launch_ps_logs_and_rm_through_the_cli() {
    if !kvm_available("launch_ps_logs_and_rm_through_the_cli") {
        return;
    }
    let dir = TempDir::new("daemon-cli");
    let d = Daemon::start(&dir);
    let hello = images::component("hello");
    let out = d.cli(&["launch", "--name", "greeter", hello.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "greeter");
    let v = d.settled("greeter");
    assert_eq!(v["status"]["state"], "exited");
    assert_eq!(v["status"]["exit_code"], 0);
    assert_eq!(v["status"]["launches"], 1);

    // A default name: the file's stem and a suffix.
    let out = d.cli(&["launch", hello.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let generated = stdout(&out).trim().to_owned();
    assert!(generated.starts_with("hello-") && generated.len() == "hello-".len() + 8, "{generated}");
    d.settled(&generated);

    let ps = d.cli(&["ps"]);
    assert_eq!(code(&ps), 0, "{}", stderr(&ps));
    let ps = stdout(&ps);
    let row = ps.lines().find(|l| l.starts_with("greeter ")).unwrap_or_else(|| panic!("{ps}"));
    assert!(row.contains(" exited ") && row.contains(" 0 "), "{row}");
    assert!(ps.lines().any(|l| l.starts_with(&format!("{generated} "))), "{ps}");

    let logs = d.cli(&["logs", "greeter"]);
    assert_eq!(code(&logs), 0, "{}", stderr(&logs));
    assert_eq!(stdout_lines(&stdout(&logs)), ["Hello, world!"]);
    // Following a settled tenant prints its log and ends.
    let logs = d.cli(&["logs", "-f", "greeter"]);
    assert_eq!(stdout_lines(&stdout(&logs)), ["Hello, world!"]);

    let components = stdout(&d.cli(&["components"]));
    assert_eq!(components.lines().count(), 2, "a header and one component: {components}");
    assert!(components.contains(" command "), "{components}");

    let rm = d.cli(&["rm", "greeter", &generated]);
    assert_eq!(code(&rm), 0, "{}", stderr(&rm));
    assert!(!stdout(&d.cli(&["ps"])).contains("greeter"));
    let gone = d.cli(&["logs", "greeter"]);
    assert_eq!(code(&gone), 1);
    assert_eq!(stderr(&gone).trim(), "wasmvisor: error: no tenant greeter");
    let again = d.cli(&["rm", "greeter"]);
    assert_eq!((code(&again), stderr(&again).trim().to_owned()), (1, "wasmvisor: error: no tenant greeter".into()));

    // Errors from the daemon are one line; so is a refused grant.
    let kv = images::component("kv-counter");
    let refused = d.cli(&["launch", "--name", "k", kv.to_str().unwrap()]);
    assert_eq!(code(&refused), 1);
    let msg = stderr(&refused);
    assert!(
        msg.starts_with("wasmvisor: error: ") && msg.contains("wasi:keyvalue/store") && msg.contains("keyvalue"),
        "{msg}"
    );
    assert_eq!(d.http("GET", "/v1/tenants/k", None).status, 404, "a refused launch leaves no tenant");
}

#[test]
fn the_cli_says_how_to_start_a_missing_daemon() {
    let dir = TempDir::new("daemon-none");
    let socket = dir.path().join("api.sock");
    let out = Command::new(exe()).args(["ps", "--api-socket", socket.to_str().unwrap()]).output().unwrap();
    assert_eq!(code(&out), 1);
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "wasmvisor: error: no wasmvisor daemon is listening on {}; start one with `wasmvisor serve`",
            socket.display()
        )
    );
}

#[test]
fn a_counter_survives_launches_and_a_kill_9_of_the_daemon() {
    if !kvm_available("a_counter_survives_launches_and_a_kill_9_of_the_daemon") {
        return;
    }
    let dir = TempDir::new("daemon-durable");
    let mut d = Daemon::start(&dir);
    let counter = d.upload("kv-counter");
    let spin = d.upload("spin");
    let spec = json!({ "component": counter, "grants": ["keyvalue"] });
    let r = d.put("counter", spec.clone());
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["generation"], 1);
    d.settled("counter");
    for generation in [2, 3] {
        let r = d.put("counter", spec.clone());
        assert_eq!(r.status, 200, "a replacement: {}", r.text());
        assert_eq!(r.json()["generation"], generation);
        d.settled("counter");
    }
    assert_eq!(stdout_lines(&d.logs("counter")), ["counter = 1", "counter = 2", "counter = 3"]);

    // A running VM when the daemon dies: its child goes with it.
    let r = d.put("spinner", json!({ "component": spin, "timeout_s": 60 }));
    assert_eq!(r.status, 201, "{}", r.text());
    let child = d.running_pid("spinner");
    let all = children_of(d.pid());
    assert!(all.contains(&child), "the VMM (and whatever the pool holds): {all:?}");
    d.kill9_and_restart();
    for pid in all {
        assert!(wait_dead(pid, Duration::from_secs(5)), "child {pid} outlived its daemon");
    }

    // Everything is back: the finished counter keeps its outcome (it does not run again), the
    // interrupted spinner runs again.
    let v = d.http("GET", "/v1/tenants/counter", None).json();
    assert_eq!(v["generation"], 3);
    assert_eq!(v["status"]["state"], "exited", "{v}");
    assert_eq!(v["status"]["exit_code"], 0);
    assert_eq!(v["status"]["launches"], 0, "not run again");
    let again = d.running_pid("spinner");
    assert_ne!(again, child);
    let components = d.http("GET", "/v1/components", None).json();
    assert_eq!(components.as_array().unwrap().len(), 2);

    let r = d.put("counter", spec);
    assert_eq!(r.json()["generation"], 4);
    d.settled("counter");
    assert_eq!(stdout_lines(&d.logs("counter")), ["counter = 1", "counter = 2", "counter = 3", "counter = 4"]);
    assert_eq!(d.http("DELETE", "/v1/tenants/spinner", None).status, 204);
    assert!(wait_dead(again, Duration::from_secs(5)));
}

#[test]
fn two_tenants_keys_are_apart_and_purge_deletes_data() {
    if !kvm_available("two_tenants_keys_are_apart_and_purge_deletes_data") {
        return;
    }
    let dir = TempDir::new("daemon-apart");
    let d = Daemon::start(&dir);
    let counter = d.upload("kv-counter");
    let spec = json!({ "component": counter, "grants": ["keyvalue"] });
    for _ in 0..2 {
        d.put("a", spec.clone());
        d.settled("a");
    }
    d.put("b", spec.clone());
    d.settled("b");
    assert_eq!(stdout_lines(&d.logs("a")), ["counter = 1", "counter = 2"]);
    assert_eq!(stdout_lines(&d.logs("b")), ["counter = 1"]);

    // Removed without purge, a tenant's data stays for its next life; purged, it is gone.
    assert_eq!(d.http("DELETE", "/v1/tenants/a", None).status, 204);
    assert_eq!(d.put("a", spec.clone()).status, 201, "a deleted tenant's store is closed with it");
    d.settled("a");
    assert_eq!(stdout_lines(&d.logs("a")).last(), Some(&"counter = 3"));
    assert_eq!(d.http("DELETE", "/v1/tenants/a?purge=true", None).status, 204);
    assert!(!d.data.join("tenants/a").exists());
    assert_eq!(d.put("a", spec).status, 201);
    d.settled("a");
    assert_eq!(stdout_lines(&d.logs("a")), ["counter = 1"]);
}

#[test]
fn a_tenant_past_its_keyvalue_quota_gets_an_error_naming_it_and_keeps_its_data() {
    if !kvm_available("a_tenant_past_its_keyvalue_quota_gets_an_error_naming_it_and_keeps_its_data") {
        return;
    }
    let dir = TempDir::new("daemon-quota");
    let d = Daemon::start(&dir);
    let probe = d.upload("kv-probe");
    // kv-probe: `set a=1` is 2 bytes; `set-many b=2 c=3` adds 4, past a 5-byte quota.
    let spec = json!({ "component": probe, "grants": ["keyvalue"], "quotas": {"keyvalue_bytes": 5} });
    assert_eq!(d.put("q", spec).status, 201);
    let v = d.settled("q");
    assert_eq!(v["spec"]["quotas"]["keyvalue_bytes"], json!(5));
    let log = d.logs("q");
    let lines = stdout_lines(&log);
    assert!(lines.contains(&"set a=1: ok"), "{log}");
    let refused = lines.iter().find(|l| l.starts_with("set-many b=2 c=3: error:")).expect("the batch is refused");
    assert!(refused.contains("key-value quota of 5 bytes") && refused.contains("nothing was written"), "{refused}");
    assert!(lines.contains(&"get-many a b missing: a=1 none none"), "nothing of the batch was written: {log}");
    // Deletes always go through; a bigger quota lets the same writes in.
    assert!(lines.contains(&"delete a: ok"), "{log}");
    let spec = json!({ "component": probe, "grants": ["keyvalue"], "quotas": {"keyvalue_bytes": 1024} });
    assert_eq!(d.put("q", spec).status, 200);
    d.settled("q");
    assert!(!stdout_lines(&d.logs("q")).iter().skip(lines.len()).any(|l| l.contains("error")), "{}", d.logs("q"));
    assert_eq!(d.put("q", json!({ "component": probe, "quotas": {"keyvalue_bytez": 1} })).status, 400);

    // A log quota keeps the newest lines within it (each line here is well under its half).
    let spec = json!({ "component": probe, "grants": ["keyvalue"], "quotas": {"log_bytes": 400} });
    assert_eq!(d.put("small-log", spec).status, 201);
    d.settled("small-log");
    let log = d.logs("small-log");
    assert!(log.len() <= 400 && log.contains("delete-many b c: ok"), "{} bytes: {log}", log.len());
    assert!(!log.contains("open probe: ok"), "the oldest lines were dropped: {log}");
}

/// The `Name:` field of `/proc/PID/status`.
fn proc_status(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or_default().trim().to_owned()
}

/// The cgroup v1 directory of `pid` for `controller`, or its v2 directory.
fn cgroup_dir(pid: u32, controller: &str) -> Option<std::path::PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let v1 = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        list.split(',').any(|c| c == controller).then(|| format!("/sys/fs/cgroup/{controller}{path}"))
    });
    let dir =
        v1.or_else(|| cgroups.lines().find_map(|l| l.strip_prefix("0::")).map(|p| format!("/sys/fs/cgroup{p}")))?;
    Some(dir.into())
}

#[test]
fn each_vmm_child_is_jailed_with_its_tenants_uid_and_limits() {
    if !kvm_available("each_vmm_child_is_jailed_with_its_tenants_uid_and_limits") {
        return;
    }
    let dir = TempDir::new("daemon-jail");
    let d = Daemon::start(&dir);
    let spin = d.upload("spin");
    let spec = |cpu: u32| json!({ "component": spin, "timeout_s": 60, "memory_mib": 64, "limits": {"cpu_millis": cpu, "pids": 24} });
    assert_eq!(d.put("one", spec(500)).status, 201);
    assert_eq!(d.put("two", spec(250)).status, 201);
    let (one, two) = (d.running_pid("one"), d.running_pid("two"));
    let uid = |pid| proc_status(pid, "Uid").split_whitespace().next().unwrap().parse::<u32>().unwrap();
    assert!(uid(one) >= 200_000 && uid(two) >= 200_000 && uid(one) != uid(two), "a uid per tenant");
    for pid in [one, two] {
        assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
            std::fs::read_link("/proc/self/ns/net").unwrap()
        );
        let root: Vec<_> =
            std::fs::read_dir(format!("/proc/{pid}/root")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(root, ["run"]);
    }
    // Memory: its RAM plus the VMM's overhead; CPU: its quota; pids: its limit.
    let read = |pid, controller: &str, file: &str| {
        let dir = cgroup_dir(pid, controller).expect("in a cgroup");
        std::fs::read_to_string(dir.join(file)).map(|s| s.trim().to_owned()).unwrap_or_default()
    };
    let v1 = cgroup_dir(one, "memory").is_some_and(|d| d.join("memory.limit_in_bytes").exists());
    if v1 {
        assert_eq!(read(one, "memory", "memory.limit_in_bytes"), ((64u64 + 64) << 20).to_string());
        assert_eq!(read(one, "cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(two, "cpu", "cpu.cfs_quota_us"), "25000");
        assert_eq!(read(one, "pids", "pids.max"), "24");
    } else {
        assert_eq!(read(one, "memory", "memory.max"), ((64u64 + 64) << 20).to_string());
        assert_eq!(read(one, "cpu", "cpu.max"), "50000 100000");
        assert_eq!(read(one, "pids", "pids.max"), "24");
    }
    // Spinning, each gets its quota and no more (measured over a second of its CPU time).
    let ticks = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let (a, b, t) = (ticks(one), ticks(two), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let secs = t.elapsed().as_secs_f64() * 100.0;
    let (share_one, share_two) = ((ticks(one) - a) as f64 / secs, (ticks(two) - b) as f64 / secs);
    eprintln!("CPU shares: {share_one:.2} and {share_two:.2} of a core");
    assert!(share_one <= 0.6 && share_two <= 0.35, "CPU shares {share_one:.2} and {share_two:.2} of a core");
    assert!(share_one >= 0.3 && share_two >= 0.15, "spinning, each uses its quota: {share_one:.2}, {share_two:.2}");
    // Removed, its cgroup and its directories go with it.
    let memory_dir = cgroup_dir(one, "memory").unwrap();
    assert_eq!(d.http("DELETE", "/v1/tenants/one", None).status, 204);
    assert!(wait_dead(one, Duration::from_secs(5)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while memory_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!memory_dir.exists(), "{} outlived its VM", memory_dir.display());
}

#[test]
fn a_tenant_that_allocates_beyond_its_memory_fails_out_of_memory_and_its_neighbour_runs_on() {
    if !kvm_available("a_tenant_that_allocates_beyond_its_memory_fails_out_of_memory_and_its_neighbour_runs_on") {
        return;
    }
    let dir = TempDir::new("daemon-oom");
    let d = Daemon::start(&dir);
    let alloc = d.upload("alloc");
    let spin = d.upload("spin");
    d.put("neighbour", json!({ "component": spin, "timeout_s": 60 }));
    let neighbour = d.running_pid("neighbour");
    d.put("greedy", json!({ "component": alloc, "memory_mib": 32, "args": ["64"] }));
    let v = d.settled("greedy");
    assert_eq!(v["status"]["state"], "failed", "{v}");
    assert_eq!(v["status"]["exit_code"], 134, "{v}");
    let reason = v["status"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("out of memory: ") && reason.contains("guest's 32 MiB"), "{reason}");
    // Within its memory the same component succeeds; the neighbour never stopped.
    d.put("greedy", json!({ "component": alloc, "memory_mib": 128, "args": ["64"] }));
    assert_eq!(d.settled("greedy")["status"]["state"], "exited");
    let n = d.http("GET", "/v1/tenants/neighbour", None).json();
    assert_eq!(
        (n["status"]["state"].as_str(), n["status"]["pid"].as_u64()),
        (Some("running"), Some(u64::from(neighbour)))
    );
}

#[test]
fn a_wasip1_command_module_is_uploaded_as_its_component_and_runs() {
    if !kvm_available("a_wasip1_command_module_is_uploaded_as_its_component_and_runs") {
        return;
    }
    let dir = TempDir::new("daemon-wasip1");
    let d = Daemon::start(&dir);
    let bytes = std::fs::read(images::preview1_module("echo")).unwrap();
    let r = d.http("POST", "/v1/components", Some(("application/wasm", &bytes)));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["kind"], "command", "{v}");
    assert!(v["exports"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().starts_with("wasi:cli/run@")), "{v}");
    let digest = v["digest"].as_str().unwrap();
    assert_eq!(d.put("p1", json!({ "component": digest, "args": ["x"] })).status, 201);
    assert_eq!(d.settled("p1")["status"]["exit_code"], 0);
    assert_eq!(stdout_lines(&d.logs("p1")), ["args: 2", "arg: p1", "arg: x"]);
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    if !kvm_available("bad_input_is_refused_clearly_and_changes_nothing") {
        return;
    }
    let dir = TempDir::new("daemon-bad");
    let d = Daemon::start_with(&dir, &["--max-component-mib", "1"]);
    let hello = d.upload("hello");
    let counter = d.upload("kv-counter");
    let ok = d.put("good", json!({ "component": hello }));
    assert_eq!(ok.status, 201, "{}", ok.text());
    d.settled("good");
    let before_tenants = d.http("GET", "/v1/tenants", None).json();
    let before_components = d.http("GET", "/v1/components", None).json();

    let put_raw = |name: &str, body: &[u8]| {
        d.http("PUT", &format!("/v1/tenants/{name}"), Some(("application/json", body))).error()
    };
    let cases: Vec<((u16, String), &str)> = vec![
        (put_raw("x", b"{\"component\": "), "bad tenant spec"),
        (put_raw("x", b"[1, 2]"), "bad tenant spec"),
        (put_raw("x", format!("{{\"component\": \"{hello}\", \"colour\": 1}}").as_bytes()), "unknown field `colour`"),
        (put_raw("x", b"{}"), "missing field `component`"),
        (put_raw("x", b"{\"component\": \"sha256:zz\"}"), "is not a component digest"),
        (
            put_raw("x", format!("{{\"component\": \"sha256:{}\"}}", "0".repeat(64)).as_bytes()),
            "no component sha256:000",
        ),
        (put_raw("x", format!("{{\"component\": \"{hello}\", \"grants\": [\"network\"]}}").as_bytes()), "network"),
        (
            put_raw("x", format!("{{\"component\": \"{hello}\", \"memory_mib\": 100000000}}").as_bytes()),
            "more than this host has",
        ),
        (put_raw("x", format!("{{\"component\": \"{hello}\", \"memory_mib\": 3}}").as_bytes()), "MiB"),
        (
            put_raw("x", format!("{{\"component\": \"{hello}\", \"timeout_s\": 0}}").as_bytes()),
            "timeout_s 0 is out of range",
        ),
        (
            put_raw("x", format!("{{\"component\": \"{hello}\", \"restart\": \"sometimes\"}}").as_bytes()),
            "unknown variant",
        ),
        (put_raw("x", format!("{{\"component\": \"{hello}\", \"env\": {{\"A=B\": \"c\"}}}}").as_bytes()), "env key"),
        (put_raw("x", format!("{{\"component\": \"{counter}\"}}").as_bytes()), "not granted the keyvalue capability"),
        (put_raw("a%20b", format!("{{\"component\": \"{hello}\"}}").as_bytes()), "invalid tenant name \"a b\""),
        (put_raw(".hidden", format!("{{\"component\": \"{hello}\"}}").as_bytes()), "invalid tenant name"),
        (put_raw(&"n".repeat(65), format!("{{\"component\": \"{hello}\"}}").as_bytes()), "longer than 64"),
        (d.http("POST", "/v1/components", Some(("application/wasm", b"hello, world"))).error(), "not a WebAssembly"),
        (d.http("POST", "/v1/components", Some(("application/wasm", b""))).error(), "the body is empty"),
        (
            d.http("POST", "/v1/components", Some(("application/wasm", b"\0asm\x01\0\0\0"))).error(),
            "core WebAssembly module",
        ),
        (
            d.http("POST", "/v1/components", Some(("application/wasm", &vec![0u8; 2 << 20]))).error(),
            "larger than this daemon accepts",
        ),
        (d.http("DELETE", &format!("/v1/components/{hello}"), None).error(), "in use by tenant good"),
        (d.http("DELETE", "/v1/components/sha256:12", None).error(), "is not a component digest"),
        (d.http("GET", &format!("/v1/components/sha256:{}", "1".repeat(64)), None).error(), "no component"),
        (d.http("DELETE", "/v1/tenants/good?purge=maybe", None).error(), "bad query"),
        (d.http("GET", "/v1/tenants/good?colour=red", None).error(), "bad query"),
        (d.http("GET", "/v1/nothing", None).error(), "no such route"),
        (d.http("PATCH", "/v1/tenants/good", None).error(), "method not allowed"),
    ];
    let expected_status = [
        400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 413, 409, 400,
        404, 400, 400, 404, 405,
    ];
    assert_eq!(cases.len(), expected_status.len());
    for (((status, message), wanted), want_status) in cases.iter().zip(expected_status) {
        assert_eq!(*status, want_status, "{message}");
        assert!(message.contains(wanted), "{message:?} should mention {wanted:?}");
    }
    // Nothing changed.
    assert_eq!(d.http("GET", "/v1/tenants", None).json(), before_tenants);
    assert_eq!(d.http("GET", "/v1/components", None).json(), before_components);
    assert_eq!(std::fs::read_dir(d.data.join("components")).unwrap().count(), 2, "no stray component file");
    // And the daemon still serves.
    assert_eq!(d.put("good", json!({ "component": hello })).status, 200);
    d.settled("good");
}

#[test]
fn concurrent_puts_of_one_tenant_are_serialised() {
    if !kvm_available("concurrent_puts_of_one_tenant_are_serialised") {
        return;
    }
    let dir = TempDir::new("daemon-concurrent");
    let d = Daemon::start(&dir);
    let hello = d.upload("hello");
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let socket = socket.clone();
            let hello = hello.clone();
            std::thread::spawn(move || {
                let body = serde_json::to_vec(&json!({ "component": hello, "args": [format!("{i}")] })).unwrap();
                let r = http(&socket, "PUT", "/v1/tenants/same", Some(("application/json", &body)), &[]);
                assert!(r.status == 200 || r.status == 201, "{}", r.text());
                let v = r.json();
                (v["generation"].as_u64().unwrap(), v["spec"]["args"][0].as_str().unwrap().to_owned(), r.status)
            })
        })
        .collect();
    let mut answers: Vec<(u64, String, u16)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    answers.sort();
    let generations: Vec<u64> = answers.iter().map(|a| a.0).collect();
    assert_eq!(generations, (1..=8).collect::<Vec<_>>(), "each put its own generation");
    assert_eq!(answers.iter().filter(|a| a.2 == 201).count(), 1, "one created, the others replaced");
    // The last committed wins, and its answer said so.
    let v = d.settled("same");
    assert_eq!(v["generation"], 8);
    assert_eq!(v["spec"]["args"][0].as_str().unwrap(), answers[7].1);
}

#[test]
fn a_crashing_tenant_leaves_a_healthy_one_alone() {
    if !kvm_available("a_crashing_tenant_leaves_a_healthy_one_alone") {
        return;
    }
    let dir = TempDir::new("daemon-crash");
    let d = Daemon::start(&dir);
    let spin = d.upload("spin");
    let trap = d.upload("trap");
    let counter = d.upload("kv-counter");
    let exit_code = d.upload("exit-code");
    d.put("healthy", json!({ "component": spin, "timeout_s": 60 }));
    let healthy = d.running_pid("healthy");
    d.put("trapper", json!({ "component": trap }));
    let v = d.settled("trapper");
    assert_eq!(v["status"]["exit_code"], 134, "{v}");
    // A VMM child killed from outside: its run fails, nothing else notices.
    d.put("victim", json!({ "component": spin, "timeout_s": 60 }));
    let victim = d.running_pid("victim");
    // SAFETY-free: kill(1) the process, as an operator or the OOM killer would.
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    let v = d.settled("victim");
    assert_eq!(v["status"]["state"], "failed");
    assert!(v["status"]["reason"].as_str().unwrap().contains("killed by signal 9"), "{v}");
    // A timeout is a failure with the reason.
    d.put("slow", json!({ "component": spin, "timeout_s": 1 }));
    let v = d.settled("slow");
    assert_eq!(v["status"]["state"], "failed", "{v}");
    assert_eq!(v["status"]["exit_code"], 124, "{v}");
    // The healthy one still runs, in the same VM, and a new tenant works.
    let h = d.http("GET", "/v1/tenants/healthy", None).json();
    assert_eq!((h["status"]["state"].as_str(), h["status"]["pid"].as_u64()), (Some("running"), Some(healthy as u64)));
    d.put("after", json!({ "component": counter, "grants": ["keyvalue"] }));
    assert_eq!(d.settled("after")["status"]["exit_code"], 0);
    // on-failure restarts a failing command (exit 3) with a backoff; a success stops it.
    d.put("flaky", json!({ "component": exit_code, "restart": "on-failure" }));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = d.http("GET", "/v1/tenants/flaky", None).json();
        if v["status"]["restarts"].as_u64().unwrap() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no restarts: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = d.put("flaky", json!({ "component": exit_code, "args": ["0"], "restart": "on-failure" }));
    let restarts = r.json()["status"]["restarts"].as_u64().unwrap();
    let v = d.settled("flaky");
    // Counters are the tenant's since the daemon started, across replacements; a success
    // is not restarted.
    assert_eq!(v["status"]["exit_code"], 0, "{v}");
    assert_eq!(v["status"]["restarts"].as_u64(), Some(restarts), "no restart after a success: {v}");
    assert!(restarts >= 2, "{v}");
    // A settled run's process may still be exiting (it is reaped after its outcome is shown).
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = d.http("GET", "/metrics", None).text();
        if m.contains("wasmvisor_live_vms 1\n") || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    for family in [
        "wasmvisor_tenants{state=\"running\"} 1",
        "wasmvisor_launches_total",
        "wasmvisor_launch_failures_total",
        "wasmvisor_launch_seconds_bucket{le=",
        "phase=\"spawn\"",
        "phase=\"guest_run\"",
        "wasmvisor_live_vms 1",
        "wasmvisor_capability_calls_total",
        "wasmvisor_vm_exits_total",
    ] {
        assert!(metrics.contains(family), "{family} missing from\n{metrics}");
    }
}

#[test]
fn sigterm_stops_every_child() {
    if !kvm_available("sigterm_stops_every_child") {
        return;
    }
    let dir = TempDir::new("daemon-term");
    let mut d = Daemon::start(&dir);
    let spin = d.upload("spin");
    d.put("s1", json!({ "component": spin, "timeout_s": 60 }));
    d.put("s2", json!({ "component": spin, "timeout_s": 60 }));
    let pids = [d.running_pid("s1"), d.running_pid("s2")];
    // The daemon's children: the two VMMs and the idle ones of its pool (2 by default).
    let deadline = Instant::now() + Duration::from_secs(10);
    let children = loop {
        let c = children_of(d.pid());
        if c.len() == 4 || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(children.len(), 4, "two VMMs and two idle children: {children:?}");
    assert!(pids.iter().all(|p| children.contains(p)), "{pids:?} {children:?}");
    // An idle child holds stdio, its socket and its pre-booted VM's (KVM, the VM, its vCPU,
    // the guest image, and its vsock device's eventfds and epoll, made at the pre-boot),
    // nothing of the daemon's (no state store, no listener, no tenant log
    // leaks into it). A child the pool has just spawned closes what it inherited first thing;
    // on a loaded machine the test may look before it has: it waits.
    let guest = wasmvisor::images::guest_image(wasmvisor::images::GUEST);
    let own = |fd: u32, target: &str| match fd {
        0..=2 => target == "/null" || target == "/dev/null",
        3 => target.starts_with("socket:"),
        _ => {
            ["/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0", "anon_inode:[eventfd]", "anon_inode:[eventpoll]"]
                .contains(&target)
                || Path::new(target) == guest.as_path()
        }
    };
    for idle in children.iter().filter(|p| !pids.contains(p)) {
        let fds = || -> Vec<(u32, String)> {
            let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{idle}/fd"))
                .unwrap()
                .flatten()
                .filter_map(|e| {
                    let target = std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
                    Some((e.file_name().to_string_lossy().parse().ok()?, target))
                })
                .collect();
            fds.sort();
            fds
        };
        let settled = |fds: &[(u32, String)]| fds.len() >= 4 && fds.iter().all(|(fd, t)| own(*fd, t));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !settled(&fds()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let fds = fds();
        assert!(settled(&fds), "idle VMM child {idle}: {fds:?}");
    }
    assert!(Command::new("kill").args(["-TERM", &d.pid().to_string()]).status().unwrap().success());
    let status = d.process.wait().unwrap();
    assert!(status.success(), "{status}");
    for pid in children {
        assert!(!alive(pid), "child {pid} survived SIGTERM");
    }
    assert!(!d.socket.exists(), "the socket is removed");
    // Stopped by the daemon, not done: a new daemon runs them again.
    d.process = spawn_daemon(&d.data, &d.socket, &[]);
    d.wait_ready();
    d.running_pid("s1");
    d.running_pid("s2");
}

#[test]
fn logs_are_tagged_in_order_and_followed_to_the_end() {
    if !kvm_available("logs_are_tagged_in_order_and_followed_to_the_end") {
        return;
    }
    let dir = TempDir::new("daemon-logs");
    let d = Daemon::start_with(&dir, &["--log-limit-mib", "1"]);
    let logger = d.upload("logger");
    let exit_code = d.upload("exit-code");
    d.put("logger", json!({ "component": logger, "args": ["one\ntwo"], "grants": ["logging"] }));
    // Follow from the start: the stream ends by itself once the tenant settles.
    let r = d.http("GET", "/v1/tenants/logger/logs?follow=true", None);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    let tags: Vec<&str> = text.lines().map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(tags, ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL", "INFO", "stdout"], "{text}");
    assert!(text.contains(" INFO [args] one\\ntwo\n"), "guest text stays on one line: {text}");
    assert!(text.ends_with(" stdout logged 7 records\n"), "{text}");
    d.put("codes", json!({ "component": exit_code, "args": ["5"] }));
    d.settled("codes");
    let text = d.logs("codes");
    let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
    assert!(lines.contains(&"stdout exiting with 5") && lines.contains(&"stderr to stderr"), "{text}");
}

#[test]
fn the_tcp_api_needs_the_token_and_the_document_is_complete() {
    if !kvm_available("the_tcp_api_needs_the_token_and_the_document_is_complete") {
        return;
    }
    let dir = TempDir::new("daemon-tcp");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "0123456789abcdef-secret\n").unwrap();
    // A free port on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    // Without a token file, TCP is refused at start.
    let data = dir.path().join("data");
    let refused = Command::new(exe())
        .args(["serve", "--data-dir", data.to_str().unwrap(), "--api-listen", &addr])
        .arg("--api-socket")
        .arg(dir.path().join("x.sock"))
        .output()
        .unwrap();
    assert_ne!(code(&refused), 0);
    assert!(stderr(&refused).contains("--api-listen needs --api-token-file"), "{}", stderr(&refused));

    let d = Daemon::start_with(&dir, &["--api-listen", &addr, "--api-token-file", token_file.to_str().unwrap()]);
    let tcp = |headers: &[(&str, &str)]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match std::net::TcpStream::connect(&addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        exchange(&mut s, "GET", "/v1/health", None, headers)
    };
    let r = tcp(&[]);
    assert_eq!(r.error().0, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(tcp(&[("Authorization", "Bearer wrong-token-wrong-token")]).status, 401);
    let r = tcp(&[("Authorization", "Bearer 0123456789abcdef-secret")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    // The socket needs no token (its permissions are the boundary: 0600).
    assert_eq!(d.http("GET", "/v1/health", None).status, 200);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&d.socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // The OpenAPI document: every route, every reference resolves.
    let doc = d.http("GET", "/v1/openapi.json", None).json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    let mut routes: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path} has no responses");
            routes.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    routes.sort();
    let mut expected = vec![
        "DELETE /v1/components/{digest}",
        "DELETE /v1/tenants/{name}",
        "GET /metrics",
        "GET /v1/components",
        "GET /v1/components/{digest}",
        "GET /v1/health",
        "GET /v1/openapi.json",
        "GET /v1/tenants",
        "GET /v1/tenants/{name}",
        "GET /v1/tenants/{name}/logs",
        "POST /v1/components",
        "PUT /v1/tenants/{name}",
    ];
    expected.sort();
    assert_eq!(routes, expected);
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected ref {r}"));
        assert!(doc["components"]["schemas"].get(name).is_some(), "{r} does not resolve");
    }
    // And a validator of the OpenAPI specification accepts it (scripts/install-python-tools.sh).
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pytools/bin/python");
    if python.is_file() {
        let file = dir.path().join("openapi.json");
        std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
        let out = Command::new(&python).args(["-m", "openapi_spec_validator"]).arg(&file).output().unwrap();
        assert!(out.status.success(), "the OpenAPI document does not validate:\n{}{}", stdout(&out), stderr(&out));
    } else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true but {} is missing: run scripts/install-python-tools.sh",
            python.display()
        );
        eprintln!("SKIPPED the OpenAPI validator: run scripts/install-python-tools.sh");
    }
    // Each route in the document answers (no 404/405 from the router itself).
    for route in ["/v1/health", "/v1/components", "/v1/tenants", "/metrics", "/v1/openapi.json"] {
        assert_eq!(d.http("GET", route, None).status, 200, "{route}");
    }
}

/// The daemon's resources that a launch and removal must give back.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    fds: usize,
    children: usize,
    cgroups: usize,
    run_entries: Vec<String>,
    jail_entries: usize,
}

fn held(d: &Daemon) -> Held {
    let pid = d.pid();
    let count = |dir: &Path| std::fs::read_dir(dir).map_or(0, |e| e.count());
    // The VM cgroups under the daemon's `wasmvisor-<pid>` parent (v1 memory hierarchy, or v2).
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let parent = own
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, list, path) = (p.next()?, p.next()?, p.next()?);
            list.split(',').any(|c| c == "memory").then(|| format!("/sys/fs/cgroup/memory{path}/wasmvisor-{pid}"))
        })
        .or_else(|| {
            let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            let base = Path::new(path).parent()?.display().to_string();
            Some(format!("/sys/fs/cgroup{base}/wasmvisor-{pid}"))
        })
        .unwrap();
    let cgroups = std::fs::read_dir(&parent)
        .map(|e| e.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).count())
        .unwrap_or(0);
    let mut run_entries: Vec<String> = std::fs::read_dir(d.data.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('c'))
        .collect();
    run_entries.sort();
    Held {
        fds: count(Path::new(&format!("/proc/{pid}/fd"))),
        children: children_of(pid).len(),
        cgroups,
        run_entries,
        jail_entries: count(&d.data.join("jail")),
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

/// `WASMVISOR_RELIABILITY_CYCLES` launch/remove cycles (40 by default; 1000 for the long run)
/// of a command tenant, a capability tenant and an HTTP tenant answering a request: afterwards
/// the daemon holds exactly what it held before (descriptors, children, cgroups, sockets, cell
/// directories), and its memory has not grown with the cycles.
#[test]
fn launch_and_remove_cycles_leak_nothing() {
    if !kvm_available("launch_and_remove_cycles_leak_nothing") {
        return;
    }
    let cycles: usize = std::env::var("WASMVISOR_RELIABILITY_CYCLES").map_or(40, |v| v.parse().expect("a count"));
    let dir = TempDir::new("daemon-cycles");
    let d = Daemon::start(&dir);
    let health = d.http("GET", "/v1/health", None).json();
    let front: std::net::SocketAddr = health["http_listen"].as_str().unwrap().parse().unwrap();
    let hello = d.upload("hello");
    let counter = d.upload("kv-counter");
    let web = d.upload("http_hello");
    let cycle = |i: usize| {
        let name = format!("t{i}");
        match i % 3 {
            0 => assert_eq!(d.put(&name, json!({ "component": hello })).status, 201),
            1 => assert_eq!(d.put(&name, json!({ "component": counter, "grants": ["keyvalue"] })).status, 201),
            _ => assert_eq!(d.put(&name, json!({ "component": web })).status, 201),
        }
        if i % 3 == 2 {
            let mut s = std::net::TcpStream::connect(front).unwrap();
            write!(s, "GET / HTTP/1.1\r\nHost: {name}.localhost\r\nConnection: close\r\n\r\n").unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("Hello, world!\n"), "{answer}");
        } else {
            let v = d.settled(&name);
            assert_eq!(v["status"]["exit_code"], 0, "{v}");
        }
        assert_eq!(d.http("DELETE", &format!("/v1/tenants/{name}?purge=true"), None).status, 204);
    };
    // Warm: the pool refilled, every code path and allocation size seen once.
    for i in 0..6 {
        cycle(i);
    }
    let settle = |want: &Held| {
        // The pool refills a moment after a launch; reaped children go a moment after removal.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = held(&d);
            if &now == want || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = held(&d);
    let rss_before = rss_kib(d.pid());
    let t = Instant::now();
    for i in 6..6 + cycles {
        cycle(i);
    }
    let elapsed = t.elapsed();
    let after = settle(&before);
    let rss_after = rss_kib(d.pid());
    eprintln!(
        "{cycles} cycles in {:.1} s: {before:?} before, {after:?} after; daemon RSS {rss_before} -> {rss_after} KiB",
        elapsed.as_secs_f64()
    );
    assert_eq!(before, after, "the daemon gave back everything it took");
    assert!(before.run_entries.is_empty(), "no socket of a removed tenant remains: {:?}", before.run_entries);
    assert!(rss_after <= rss_before + 8 * 1024, "daemon RSS grew from {rss_before} to {rss_after} KiB");
    let tenants = d.http("GET", "/v1/tenants", None).json();
    assert_eq!(tenants.as_array().map(Vec::len), Some(0), "{tenants}");
    let metrics = d.http("GET", "/metrics", None).text();
    let launches: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wasmvisor_launches_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(launches >= (cycles + 6) as f64, "every launch accounted for: {launches}");
}

/// The API fuzzed from its own OpenAPI document by schemathesis (pinned in
/// scripts/install-python-tools.sh): every operation, its examples, coverage of its schema's
/// edges, random inputs and stateful sequences (`PUT` then `GET`/`DELETE` of what it made),
/// checked for server errors; `WASMVISOR_SCHEMATHESIS_EXAMPLES` (default 60) sets how many
/// examples each operation gets. `POST /v1/components` takes raw Wasm, which schemathesis
/// cannot generate; its bad inputs are `bad_input_is_refused_clearly_and_changes_nothing`'s.
#[test]
fn the_api_takes_schemathesis_without_a_server_error_or_a_crash() {
    if !kvm_available("the_api_takes_schemathesis_without_a_server_error_or_a_crash") {
        return;
    }
    let schemathesis = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pytools/bin/schemathesis");
    if !schemathesis.is_file() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true but schemathesis is missing");
        eprintln!("SKIPPED the_api_takes_schemathesis...: run scripts/install-python-tools.sh");
        return;
    }
    let examples = std::env::var("WASMVISOR_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "60".into());
    let dir = TempDir::new("daemon-schemathesis");
    let token = "schemathesis-0123456789abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&dir, &["--api-listen", &addr, "--api-token-file", token_file.to_str().unwrap()]);
    // Something to find: a component and a tenant.
    let hello = d.upload("hello");
    assert_eq!(d.put("existing", json!({ "component": hello })).status, 201);
    let out = Command::new(&schemathesis)
        .current_dir(dir.path())
        .args(["run", &format!("http://{addr}/v1/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "not_a_server_error", "--max-examples", &examples, "--workers", "2"])
        .args(["--exclude-name", "POST /v1/components", "--wait-for-schema", "30"])
        .output()
        .unwrap();
    let report = format!("{}\n{}", stdout(&out), stderr(&out));
    eprintln!("{}", report.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));
    assert_eq!(code(&out), 0, "schemathesis found a server error (or could not run):\n{report}");
    assert!(report.contains("passed"), "{report}");
    // And the daemon is whole: alive, answering, with nothing panicked in its log.
    assert_eq!(d.http("GET", "/v1/health", None).status, 200);
    let log = std::fs::read_to_string(dir.path().join("daemon-api.sock.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn each_tenant_sees_only_its_own_dirs_under_the_root() {
    if !kvm_available("each_tenant_sees_only_its_own_dirs_under_the_root") {
        return;
    }
    let dir = TempDir::new("daemon-dirs");
    let root = dir.path().join("root");
    for d in ["a", "b"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("a/mine"), "a's\n").unwrap();
    std::fs::write(root.join("b/theirs"), "b's\n").unwrap();
    // A link the operator left in a's directory, pointing at b's (inside the root, outside a's).
    std::os::unix::fs::symlink("../b", root.join("a/link")).unwrap();
    let d = Daemon::start_with(&dir, &["--dirs-root", root.to_str().unwrap()]);
    let probe = d.upload("fs-probe");
    let spec = |args: &[&str], dirs: Value| json!({ "component": probe, "args": args, "grants": ["filesystem"], "dirs": dirs });
    let a = spec(
        &["read", "/data/mine", "/data/../b/theirs", "/data/link/theirs", "/b/theirs"],
        json!([{ "host": "a", "guest": "/data" }]),
    );
    assert_eq!(d.put("a", a).status, 201);
    d.settled("a");
    let lines = stdout_lines(&d.logs("a")).into_iter().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(lines.len(), 4, "{lines:?}");
    // (The log escapes the probe's backslashes once more.)
    assert!(lines[0].starts_with(r#"/data/mine: ok "a's"#), "{}", lines[0]);
    for l in &lines[1..] {
        assert!(l.contains(": err ") && !l.contains("b's"), "{l}");
    }
    let b = spec(&["write", "/data/theirs", "changed"], json!([{ "host": "b", "guest": "/data", "readonly": true }]));
    assert_eq!(d.put("b", b).status, 201);
    d.settled("b");
    assert_eq!(stdout_lines(&d.logs("b")), ["/data/theirs: err Some(63) PermissionDenied"]);
    assert_eq!(std::fs::read_to_string(root.join("b/theirs")).unwrap(), "b's\n");
    let w = spec(&["write", "/data/new", "written"], json!([{ "host": "a", "guest": "/data" }]));
    assert_eq!(d.put("w", w).status, 201);
    d.settled("w");
    assert_eq!(std::fs::read_to_string(root.join("a/new")).unwrap(), "written");

    // Large files read whole: here the broker (in the daemon) answers the bytes, at most a
    // frame's chunk each, which the VMM places.
    let (paths, lines) = read_edge_files(&root.join("a"), "/data");
    let mut args = vec!["sum"];
    args.extend(paths.iter().map(String::as_str));
    assert_eq!(d.put("sums", spec(&args, json!([{ "host": "a", "guest": "/data" }]))).status, 201);
    d.settled("sums");
    assert_eq!(stdout_lines(&d.logs("sums")), lines);

    // Specs that name anything else are refused, saying why.
    for (dirs, grants, says) in [
        (json!([{ "host": "a", "guest": "/data" }]), json!([]), "filesystem grant"),
        (json!([{ "host": "../x", "guest": "/data" }]), json!(["filesystem"]), "without `..`"),
        (json!([{ "host": "/etc", "guest": "/data" }]), json!(["filesystem"]), "relative path"),
        (json!([{ "host": "a/link", "guest": "/data" }]), json!(["filesystem"]), ""),
        (json!([{ "host": "missing", "guest": "/data" }]), json!(["filesystem"]), "missing"),
        (json!([{ "host": "a", "guest": "" }]), json!(["filesystem"]), "guest name"),
        (json!([{ "host": "a", "guest": "/d", "extra": 1 }]), json!(["filesystem"]), "unknown field"),
    ] {
        let r = d.put("bad", json!({ "component": probe, "grants": grants, "dirs": dirs }));
        if says.is_empty() {
            // a/link resolves to b, inside the root: allowed (the operator made it).
            assert_eq!(r.status, 201, "{}", r.text());
            assert_eq!(d.http("DELETE", "/v1/tenants/bad", None).status, 204);
            continue;
        }
        let (status, message) = r.error();
        assert_eq!(status, 400, "{dirs}: {message}");
        assert!(message.contains(says), "{dirs}: {message}");
    }
    let outside = TempDir::new("daemon-dirs-outside");
    std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
    let (status, message) = d
        .put(
            "bad",
            json!({ "component": probe, "grants": ["filesystem"], "dirs": [{ "host": "escape", "guest": "/x" }] }),
        )
        .error();
    assert_eq!(status, 400);
    assert!(message.contains("inside the dirs root"), "{message}");
}

#[test]
fn a_daemon_without_a_dirs_root_takes_no_dirs() {
    let dir = TempDir::new("daemon-no-dirs");
    let d = Daemon::start(&dir);
    let probe = d.upload("fs-probe");
    let r =
        d.put("t", json!({ "component": probe, "grants": ["filesystem"], "dirs": [{ "host": "a", "guest": "/a" }] }));
    let (status, message) = r.error();
    assert_eq!(status, 400);
    assert!(message.contains("--dirs-root"), "{message}");
}
