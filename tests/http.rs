//! Integration tests for the front door: real daemons (`wasmvisor serve`) with real KVM VMs,
//! driven by an HTTP/1.1 client over TCP on loopback (keep-alive, chunked bodies, and the
//! malformed and slow requests a well-behaved client library would never send).
//!
//! Tests that need KVM skip loudly where `/dev/kvm` is absent, and fail when `CI=true`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmvisor::images;

use common::{TempDir, kvm_available};

mod common;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wasmvisor"))
}

// ---- an HTTP/1.1 client ----

/// A response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

/// One keep-alive connection to the front door.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        Self { reader: BufReader::new(s) }
    }

    fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    /// Sends a request for `host` and reads its response.
    fn request(&mut self, method: &str, host: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let s = self.stream();
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        self.read_response().expect("a response")
    }

    fn get(&mut self, host: &str, path: &str) -> Response {
        self.request("GET", host, path, &[], b"")
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_owned()),
        }
    }

    /// Reads one response (by its length or its chunks); None if the connection closed first.
    fn read_response(&mut self) -> Option<Response> {
        let status_line = self.line()?;
        let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let line = self.line()?;
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':')?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let find = |name: &str| headers.iter().find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name));
        let mut body = Vec::new();
        if find("transfer-encoding").is_some_and(|(_, v)| v.contains("chunked")) {
            loop {
                let size = usize::from_str_radix(self.line()?.split(';').next()?.trim(), 16).ok()?;
                if size == 0 {
                    // Trailers, then the blank line.
                    while !self.line()?.is_empty() {}
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.reader.read_exact(&mut body[start..]).ok()?;
                self.line()?;
            }
        } else if let Some((_, len)) = find("content-length") {
            body.resize(len.parse().ok()?, 0);
            self.reader.read_exact(&mut body).ok()?;
        }
        Some(Response { status, headers, body })
    }
}

// ---- daemons ----

/// A daemon under test, with its API socket and front door; killed (-9) when dropped.
struct Daemon {
    process: Child,
    socket: PathBuf,
    addr: SocketAddr,
}

impl Daemon {
    /// `wasmvisor serve` on a fresh data directory, the front door on an ephemeral port.
    fn start(dir: &TempDir, extra: &[&str]) -> Self {
        let socket = dir.path().join("api.sock");
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let process = Command::new(exe())
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--api-socket")
            .arg(&socket)
            .args(["--http-listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Built first, so that a failed start below still kills the process.
        let mut d = Self { process, socket, addr: SocketAddr::from(([0, 0, 0, 0], 0)) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "the daemon did not answer within 60 s");
            if UnixStream::connect(&d.socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let health = api(&d.socket, "GET", "/v1/health", None).1;
        d.addr = health["http_listen"].as_str().expect("the front door listens").parse().unwrap();
        d
    }

    fn upload(&self, component: &str) -> String {
        self.upload_kind(component, "http")
    }

    fn upload_kind(&self, component: &str, kind: &str) -> String {
        let bytes = std::fs::read(images::component(component)).unwrap();
        let (status, v) = api(&self.socket, "POST", "/v1/components", Some(("application/wasm", &bytes)));
        assert_eq!(status, 201, "{v}");
        assert_eq!(v["kind"], kind, "{v}");
        v["digest"].as_str().unwrap().to_owned()
    }

    fn put(&self, name: &str, spec: Value) -> (u16, Value) {
        let body = serde_json::to_vec(&spec).unwrap();
        api(&self.socket, "PUT", &format!("/v1/tenants/{name}"), Some(("application/json", &body)))
    }

    fn tenant(&self, name: &str) -> Value {
        api(&self.socket, "GET", &format!("/v1/tenants/{name}"), None).1
    }

    fn logs(&self, name: &str) -> String {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        write!(s, "GET /v1/tenants/{name}/logs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    }

    fn conn(&self) -> Conn {
        Conn::open(self.addr)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// One API call on the Unix socket: status and JSON body (Null if empty).
fn api(socket: &Path, method: &str, path: &str, body: Option<(&str, &[u8])>) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some((ct, b)) = body {
        req.push_str(&format!("Content-Type: {ct}\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    if let Some((_, b)) = body {
        s.write_all(b).unwrap();
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let mut rest = &raw[end + 4..];
    let mut body = Vec::new();
    if chunked {
        loop {
            let le = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..le]).unwrap().trim(), 16).unwrap();
            rest = &rest[le + 2..];
            if n == 0 {
                break;
            }
            body.extend_from_slice(&rest[..n]);
            rest = &rest[n + 2..];
        }
    } else {
        body = rest.to_vec();
    }
    let v = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
    (status, v)
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {within:?}");
}

// ---- tests ----

#[test]
fn serve_app_wasm_answers_like_wasmtime_serve() {
    if !kvm_available("serve_app_wasm_answers_like_wasmtime_serve") {
        return;
    }
    let dir = TempDir::new("http-serve-app");
    let mut child = Command::new(exe())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--api-socket")
        .arg(dir.path().join("api.sock"))
        .args(["--http-listen", "127.0.0.1:0"])
        .arg(images::component("http_hello"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let addr: SocketAddr = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "serve ended before it served");
        if let Some(rest) = line.trim().strip_prefix("Serving HTTP on http://") {
            break rest.trim_end_matches('/').parse().unwrap();
        }
    };
    // Any host reaches the one component; one keep-alive connection serves several requests.
    let mut conn = Conn::open(addr);
    for host in ["localhost", "example.com", "127.0.0.1"] {
        let r = conn.get(host, "/anything?x=1");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), "Hello, world!\n");
        assert_eq!(r.header("content-type"), Some("text/plain"));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn requests_and_responses_cross_exactly() {
    if !kvm_available("requests_and_responses_cross_exactly") {
        return;
    }
    let dir = TempDir::new("http-exact");
    let d = Daemon::start(&dir, &[]);
    let digest = d.upload("http_examples");
    let (status, v) = d.put("ex", json!({"component": digest, "env": {"GREETING": "hi"}}));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"]["state"], "running", "{v}");
    let host = "ex.localhost";
    let mut c = d.conn();

    let r = c.request("GET", host, "/headers?a=b%20c", &[("X-Test", "one"), ("x-test", "two"), ("Accept", "*/*")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "method: GET\nscheme: http\nauthority: ex.localhost\npath: /headers?a=b%20c\naccept: */*\nx-test: one\nx-test: two\n"
    );
    assert_eq!(r.all("x-multi"), ["a", "b"]);
    assert_eq!(r.header("content-type"), Some("text/plain"));

    for code in [201, 204, 404, 418, 503] {
        let r = c.get(host, &format!("/status/{code}"));
        assert_eq!(r.status, code);
        if code != 204 {
            assert_eq!(r.text(), format!("status {code}\n"));
        }
    }
    // -S cli=y: the environment reaches an HTTP handler.
    assert_eq!(c.get(host, "/env").text(), "GREETING=hi\n");
    // A fresh instance per request, each with its own random seed.
    assert_eq!(c.get(host, "/count").text(), "1\n");
    assert_eq!(c.get(host, "/count").text(), "1\n");
    let (a, b) = (c.get(host, "/random").text(), c.get(host, "/random").text());
    assert_eq!(a.len(), 33);
    assert_ne!(a, b);

    // 1 MiB streamed through the guest and back, byte for byte, on the same connection.
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let r = c.request("POST", host, "/echo", &[("Content-Type", "application/x-test")], &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-test"));
    assert!(r.body == body, "the echo differs ({} bytes back)", r.body.len());
    // A chunked upload, too.
    let s = c.stream();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: ex.localhost\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    s.write_all(b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n").unwrap();
    let r = c.read_response().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "hello, world"));

    // A panicking handler answers 500; the next request is served as usual.
    let r = c.get(host, "/panic");
    assert_eq!(r.status, 500);
    assert_eq!(c.get(host, "/count").text(), "1\n");
    // The message travels the VMM child's event pipe to the log while the 500 takes the vsock
    // path to the client: the two are not ordered.
    wait_for("the panic is in the tenant's log", Duration::from_secs(5), || {
        d.logs("ex").contains("the handler panicked on purpose")
    });

    // Outgoing HTTP is a capability this tenant was not granted: denied, as wasi:http says.
    let r = c.get(host, "/fetch?url=http://127.0.0.1:9/");
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "fetch failed: ErrorCode::HttpRequestDenied\n");
    assert_eq!(d.tenant("ex")["status"]["instances"], 1, "one VM served all of it");
}

#[test]
fn tenants_are_routed_apart_by_host() {
    if !kvm_available("tenants_are_routed_apart_by_host") {
        return;
    }
    let dir = TempDir::new("http-routes");
    let d = Daemon::start(&dir, &[]);
    let hello = d.upload("http_hello");
    let examples = d.upload("http_examples");
    assert_eq!(d.put("a", json!({"component": hello})).0, 201);
    let (status, v) = d.put("b", json!({"component": examples, "http": {"hosts": ["api.example.test"]}}));
    assert_eq!(status, 201, "{v}");
    let mut c = d.conn();
    assert_eq!(c.get("a.localhost", "/").text(), "Hello, world!\n");
    assert_eq!(c.get("b.localhost", "/").text(), "wasmvisor http examples\n");
    assert_eq!(c.get("api.example.test", "/").text(), "wasmvisor http examples\n");
    assert_eq!(c.get("API.Example.Test:8080", "/").text(), "wasmvisor http examples\n", "case and port");
    let r = c.get("nobody.localhost", "/");
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "no tenant serves nobody.localhost\n");

    // A host is one tenant's; a spec cannot claim another's.
    let (status, v) = d.put("c", json!({"component": hello, "http": {"hosts": ["api.example.test"]}}));
    assert_eq!(status, 409, "{v}");
    let (status, v) = d.put("c", json!({"component": hello, "http": {"hosts": ["a.localhost"]}}));
    assert_eq!(status, 400, "{v}");
    let (status, v) = d.put("c", json!({"component": hello, "instances": {"min": 2, "max": 1}}));
    assert_eq!(status, 400, "{v}");
    let command = {
        let bytes = std::fs::read(images::component("hello")).unwrap();
        let (_, v) = api(&d.socket, "POST", "/v1/components", Some(("application/wasm", &bytes)));
        v["digest"].as_str().unwrap().to_owned()
    };
    let (status, v) = d.put("c", json!({"component": command, "http": {"hosts": ["x.test"]}}));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("command component"), "{v}");

    // Removing a tenant removes its routes and its VMs.
    let (status, _) = api(&d.socket, "DELETE", "/v1/tenants/b", None);
    assert_eq!(status, 204);
    assert_eq!(c.get("api.example.test", "/").status, 404);
    assert_eq!(c.get("a.localhost", "/").text(), "Hello, world!\n");
}

#[test]
fn requests_beyond_max_instances_queue_then_get_503() {
    if !kvm_available("requests_beyond_max_instances_queue_then_get_503") {
        return;
    }
    let dir = TempDir::new("http-queue");
    let d = Daemon::start(&dir, &[]);
    let examples = d.upload("http_examples");
    let spec = json!({"component": examples, "instances": {"min": 1, "max": 1, "queue": 1}});
    assert_eq!(d.put("q", spec).0, 201);
    wait_for("the min VM", Duration::from_secs(30), || d.tenant("q")["status"]["instances"] == 1);
    let addr = d.addr;
    let t0 = Instant::now();
    let sleeper = |ms: u64| {
        std::thread::spawn(move || {
            let r = Conn::open(addr).get("q.localhost", &format!("/sleep?ms={ms}"));
            (r, Instant::now())
        })
    };
    let first = sleeper(600);
    std::thread::sleep(Duration::from_millis(150));
    let second = sleeper(10);
    std::thread::sleep(Duration::from_millis(150));
    // The VM is busy and the queue holds one: the third is turned away at once.
    let third = Conn::open(addr).get("q.localhost", "/sleep?ms=10");
    assert_eq!(third.status, 503, "{third:?}");
    assert_eq!(third.header("retry-after"), Some("1"));
    let (r1, t1) = first.join().unwrap();
    let (r2, t2) = second.join().unwrap();
    assert_eq!((r1.status, r1.text().as_str()), (200, "slept 600 ms\n"));
    assert_eq!((r2.status, r2.text().as_str()), (200, "slept 10 ms\n"));
    assert!(t2 >= t1, "the queued request is served after the first");
    assert!(t2.duration_since(t0) >= Duration::from_millis(600));
    assert_eq!(d.tenant("q")["status"]["instances"], 1, "never more than max");
}

#[test]
fn pipelined_requests_each_get_their_own_response() {
    if !kvm_available("pipelined_requests_each_get_their_own_response") {
        return;
    }
    let dir = TempDir::new("http-pipeline");
    let d = Daemon::start(&dir, &[]);
    let examples = d.upload("http_examples");
    let spec = json!({"component": examples, "instances": {"min": 1, "max": 1, "queue": 64}});
    assert_eq!(d.put("p", spec).0, 201);
    wait_for("the min VM", Duration::from_secs(30), || d.tenant("p")["status"]["instances"] == 1);
    // One VM, 12 clients: bodiless requests queue behind each other on the VM (pipelined),
    // requests with a body never do; every answer must be its own request's.
    let addr = d.addr;
    let clients: Vec<_> = (0..12)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Conn::open(addr);
                for i in 0..40 {
                    if (t + i) % 5 == 0 {
                        let body = format!("body {t}-{i}");
                        let r = c.request("POST", "p.localhost", "/echo", &[], body.as_bytes());
                        assert_eq!((r.status, r.text()), (200, body), "client {t}, request {i}");
                    } else {
                        let path = format!("/headers?id={t}-{i}");
                        let r = c.get("p.localhost", &path);
                        assert_eq!(r.status, 200, "client {t}, request {i}: {r:?}");
                        assert!(r.text().contains(&format!("path: {path}\n")), "client {t}, request {i}: {}", r.text());
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(d.tenant("p")["status"]["instances"], 1, "one VM served them all");
    assert!(!d.logs("p").contains(" stopped: "), "{}", d.logs("p"));
}

#[test]
fn idle_vms_scale_to_zero_and_back() {
    if !kvm_available("idle_vms_scale_to_zero_and_back") {
        return;
    }
    let dir = TempDir::new("http-zero");
    let d = Daemon::start(&dir, &[]);
    let hello = d.upload("http_hello");
    assert_eq!(d.put("z", json!({"component": hello, "idle_timeout_s": 1})).0, 201);
    assert_eq!(d.tenant("z")["status"]["instances"], 0, "no VM before the first request");
    let mut c = d.conn();
    assert_eq!(c.get("z.localhost", "/").status, 200);
    assert_eq!(d.tenant("z")["status"]["instances"], 1);
    wait_for("scale to zero", Duration::from_secs(10), || d.tenant("z")["status"]["instances"] == 0);
    assert_eq!(c.get("z.localhost", "/").text(), "Hello, world!\n", "and back");
    assert_eq!(d.tenant("z")["status"]["launches"], 2, "{}", d.tenant("z"));
}

#[test]
fn a_request_past_its_limit_gets_504_and_the_tenant_recovers() {
    if !kvm_available("a_request_past_its_limit_gets_504_and_the_tenant_recovers") {
        return;
    }
    let dir = TempDir::new("http-timeout");
    let d = Daemon::start(&dir, &[]);
    let examples = d.upload("http_examples");
    assert_eq!(d.put("slow", json!({"component": examples, "timeout_s": 1})).0, 201);
    let mut c = d.conn();
    let t = Instant::now();
    let r = c.get("slow.localhost", "/sleep?ms=5000");
    assert_eq!(r.status, 504);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // That VM was stopped, not reused; another serves the next request.
    let r = c.get("slow.localhost", "/sleep?ms=1");
    assert_eq!((r.status, r.text().as_str()), (200, "slept 1 ms\n"));
    assert!(d.logs("slow").contains("the request ran past its time limit"));
}

#[test]
fn limits_hold_against_oversized_and_slow_clients() {
    if !kvm_available("limits_hold_against_oversized_and_slow_clients") {
        return;
    }
    let dir = TempDir::new("http-limits");
    let d = Daemon::start(
        &dir,
        &["--http-max-body-mib", "1", "--http-header-timeout-s", "1", "--http-max-header-kib", "8"],
    );
    let examples = d.upload("http_examples");
    assert_eq!(d.put("lim", json!({"component": examples})).0, 201);
    let mut c = d.conn();
    // A declared body over the limit: 413 before any VM sees it.
    let s = c.stream();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: lim.localhost\r\nContent-Length: 2000000\r\n\r\n").unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 413);
    // A head over the limit: 431.
    let mut c = d.conn();
    let big = "x".repeat(16 * 1024);
    let s = c.stream();
    let _ = s.write_all(format!("GET / HTTP/1.1\r\nHost: lim.localhost\r\nX-Big: {big}\r\n\r\n").as_bytes());
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 431);
    // A client that never finishes its head is dropped after the header timeout.
    let mut slow = d.conn();
    slow.stream().write_all(b"GET / HTTP/1.1\r\nHost: lim.lo").unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 256];
    let n = slow.stream().read(&mut buf).unwrap_or(0);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Garbage instead of a request: 400, and the daemon serves on.
    let mut bad = d.conn();
    bad.stream().write_all(b"\x16\x03\x01\x02\x00 not http\r\n\r\n").unwrap();
    let r = bad.read_response();
    assert!(r.as_ref().is_none_or(|r| r.status == 400), "{r:?}");
    assert_eq!(d.conn().get("lim.localhost", "/").text(), "wasmvisor http examples\n");
}

/// A one-connection-at-a-time HTTP/1.1 server on loopback that answers `n` requests with
/// status 203 and `upstream saw <method> <path>`, then stops.
fn upstream(n: usize) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..n {
            let (s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut head = Vec::new();
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                head.push(h.trim().to_ascii_lowercase());
            }
            let parts: Vec<&str> = line.split(' ').collect();
            let body = format!("upstream saw {} {}", parts[0], parts[1]);
            seen.push(format!("{} {}", line.trim(), head.join("|")));
            let reply = format!(
                "HTTP/1.1 203 Non-Authoritative Information\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            r.get_mut().write_all(reply.as_bytes()).unwrap();
        }
        seen
    });
    (addr, handle)
}

#[test]
fn outgoing_requests_reach_allowed_hosts_only() {
    if !kvm_available("outgoing_requests_reach_allowed_hosts_only") {
        return;
    }
    let dir = TempDir::new("http-outgoing");
    let d = Daemon::start(&dir, &[]);
    let examples = d.upload("http_examples");
    let (allowed, server) = upstream(2);
    let by_name = format!("localhost:{}", allowed.port());
    let spec = json!({
        "component": examples,
        "grants": ["http-outgoing"],
        "http_outgoing": {"allow": [allowed.to_string(), by_name]},
    });
    let (status, v) = d.put("out", spec);
    assert_eq!(status, 201, "{v}");
    assert_eq!(d.put("closed", json!({"component": examples})).0, 201);
    let mut c = d.conn();
    let r = c.get("out.localhost", &format!("/fetch?url=http://{allowed}/up?q=1"));
    assert_eq!(r.status, 203, "{r:?} {}", r.text());
    assert_eq!(r.text(), "upstream saw GET /up?q=1");
    assert_eq!(r.header("x-upstream-status"), Some("203"));
    // By name: the daemon resolves it.
    let r = c.get("out.localhost", &format!("/fetch?url=http://localhost:{}/named", allowed.port()));
    assert_eq!((r.status, r.text().as_str()), (203, "upstream saw GET /named"));
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].starts_with("GET /up?q=1 HTTP/1.1"), "{seen:?}");
    assert!(seen[0].contains(&format!("host: {allowed}")), "{seen:?}");

    // Another port of the same host is not on the list; nothing listens there either, but the
    // answer is the denial, before any connection.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_addr = other.local_addr().unwrap();
    other.set_nonblocking(true).unwrap();
    let r = c.get("out.localhost", &format!("/fetch?url=http://{other_addr}/"));
    assert_eq!((r.status, r.text().as_str()), (502, "fetch failed: ErrorCode::HttpRequestDenied\n"));
    assert!(other.accept().is_err(), "the denied host was never contacted");
    // A tenant without the grant is denied too.
    let r = c.get("closed.localhost", &format!("/fetch?url=http://{allowed}/"));
    assert_eq!((r.status, r.text().as_str()), (502, "fetch failed: ErrorCode::HttpRequestDenied\n"));
    // Allowed but refused: the error code says so.
    drop(other);
    let spec = json!({
        "component": examples,
        "grants": ["http-outgoing"],
        "http_outgoing": {"allow": [other_addr.to_string()]},
    });
    assert_eq!(d.put("out", spec).0, 200);
    let r = c.get("out.localhost", &format!("/fetch?url=http://{other_addr}/"));
    assert_eq!((r.status, r.text().as_str()), (502, "fetch failed: ErrorCode::ConnectionRefused\n"));
}

#[test]
fn a_guest_that_answers_garbage_or_nothing_fails_only_its_requests() {
    if !kvm_available("a_guest_that_answers_garbage_or_nothing_fails_only_its_requests") {
        return;
    }
    let dir = TempDir::new("http-hostile");
    // The test guest in place of the real one: the tenant's name picks its behaviour.
    let guest = images::build_dir().join(images::TEST_GUEST);
    let d = Daemon::start(&dir, &["--guest", guest.to_str().unwrap()]);
    let hello = d.upload("http_hello");
    assert_eq!(d.put("http-garbage", json!({"component": hello})).0, 201);
    assert_eq!(d.put("http-silent", json!({"component": hello, "timeout_s": 1})).0, 201);
    for _ in 0..2 {
        let r = d.conn().get("http-garbage.localhost", "/");
        assert_eq!((r.status, r.text().as_str()), (502, "the component's response was malformed\n"));
    }
    assert!(d.logs("http-garbage").contains("bad response to a request"), "{}", d.logs("http-garbage"));
    let t = Instant::now();
    let r = d.conn().get("http-silent.localhost", "/");
    assert_eq!(r.status, 504);
    assert!(t.elapsed() < Duration::from_secs(5));
    // The daemon itself is unharmed.
    let (status, health) = api(&d.socket, "GET", "/v1/health", None);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["tenants"], 2);
}

#[test]
fn http_tenants_come_back_after_a_kill_9_of_the_daemon() {
    if !kvm_available("http_tenants_come_back_after_a_kill_9_of_the_daemon") {
        return;
    }
    let dir = TempDir::new("http-restart");
    let hello = {
        let d = Daemon::start(&dir, &[]);
        let hello = d.upload("http_hello");
        let (status, v) = d.put("back", json!({"component": hello, "http": {"hosts": ["back.test"]}}));
        assert_eq!(status, 201, "{v}");
        assert_eq!(d.conn().get("back.test", "/").status, 200);
        hello
        // Dropped: kill -9, its VMs die with it.
    };
    let d = Daemon::start(&dir, &[]);
    assert_eq!(d.tenant("back")["spec"]["component"], hello);
    assert_eq!(d.tenant("back")["status"]["state"], "running");
    let mut c = d.conn();
    assert_eq!(c.get("back.test", "/").text(), "Hello, world!\n");
    assert_eq!(c.get("back.localhost", "/").text(), "Hello, world!\n");
}

/// The effective uid of process `pid`.
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn killing_a_tenants_vmm_children_under_load_fails_only_its_requests() {
    if !kvm_available("killing_a_tenants_vmm_children_under_load_fails_only_its_requests") {
        return;
    }
    let dir = TempDir::new("http-kill-children");
    let d = Daemon::start(&dir, &[]);
    let examples = d.upload("http_examples");
    let hello = d.upload("http_hello");
    // Put in this order, the victim's VMs run as the jail's first tenant uid, the other's as
    // the second; a pooled child not yet handed out is still root's.
    assert_eq!(d.put("victim", json!({"component": examples, "instances": {"max": 2}})).0, 201);
    assert_eq!(d.put("bystander", json!({"component": hello})).0, 201);
    let addr = d.addr;
    assert_eq!(Conn::open(addr).get("victim.localhost", "/sleep?ms=1").status, 200);
    assert_eq!(Conn::open(addr).get("bystander.localhost", "/").status, 200);
    // (Pooled children, pre-booted or not, are still root's.)
    let victim_uid =
        common::children_of(d.process.id()).into_iter().filter_map(uid_of).filter(|uid| *uid != 0).min().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = |host: &'static str, path: &'static str| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            let mut conn = Conn::open(addr);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = conn.get(host, path);
                if r.status != 200 {
                    // A failed exchange may close the connection: a fresh one for the next.
                    conn = Conn::open(addr);
                }
                statuses.push(r.status);
            }
            statuses
        })
    };
    let victims = [load("victim.localhost", "/sleep?ms=20"), load("victim.localhost", "/sleep?ms=5")];
    let bystander = load("bystander.localhost", "/");
    let mut killed = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(250));
        for pid in common::children_of(d.process.id()) {
            if uid_of(pid) == Some(victim_uid) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                killed += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let victim: Vec<u16> = victims.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let others = bystander.join().unwrap();
    let failed = victim.iter().filter(|&&s| s != 200).count();
    eprintln!(
        "killed {killed} VMM children: victim {} requests, {failed} failed; bystander {} requests",
        victim.len(),
        others.len()
    );
    assert!(killed >= 4, "the victim's VMs were killed ({killed})");
    assert!(victim.iter().all(|s| [200, 502, 503].contains(s)), "only clean failures: {victim:?}");
    assert!(failed > 0 && victim.iter().filter(|&&s| s == 200).count() > failed, "{victim:?}");
    assert!(others.iter().all(|&s| s == 200), "the bystander never noticed: {others:?}");
    // And the victim recovers.
    wait_for("the victim to answer again", Duration::from_secs(10), || {
        Conn::open(addr).get("victim.localhost", "/sleep?ms=1").status == 200
    });
}

/// One request on a connection of its own (`Connection: close`): its status and body, or
/// `None` if the server went away.
fn try_get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

#[test]
fn every_acknowledged_increment_survives_a_kill_9_of_the_daemon() {
    if !kvm_available("every_acknowledged_increment_survives_a_kill_9_of_the_daemon") {
        return;
    }
    let dir = TempDir::new("http-kv-kill");
    let mut d = Daemon::start(&dir, &[]);
    let counter = d.upload("http_counter");
    let spec = json!({"component": counter, "grants": ["keyvalue"], "instances": {"max": 2}});
    assert_eq!(d.put("ctr", spec).0, 201);
    let addr = d.addr;
    // The warm-up waits for the first VM: once, under the parallel KVM tests of CI, its very first
    // request got a 502 (not yet explained; noted on issue 12). What this test claims starts below.
    wait_for("the counter tenant to answer", Duration::from_secs(10), || {
        try_get(addr, "ctr.localhost", "/incr?key=warm").map(|r| r.0) == Some(200)
    });
    // Four clients increment a key each until the daemon dies under them.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            std::thread::spawn(move || {
                let key = format!("k{c}");
                let mut acked = 0u64;
                while let Some((status, body)) = try_get(addr, "ctr.localhost", &format!("/incr?key={key}")) {
                    assert_eq!(status, 200, "{body}");
                    let n: u64 = body.trim().rsplit(" = ").next().unwrap().parse().unwrap();
                    assert_eq!(n, acked + 1, "increments of one client follow each other");
                    acked = n;
                }
                (key, acked)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    d.process.kill().unwrap();
    d.process.wait().unwrap();
    let acked: Vec<(String, u64)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(acked.iter().all(|(_, n)| *n > 0), "every client got going: {acked:?}");
    let d = Daemon::start(&dir, &[]);
    for (key, n) in &acked {
        let (status, body) = try_get(d.addr, "ctr.localhost", &format!("/get?key={key}")).unwrap();
        assert_eq!(status, 200, "{body}");
        let stored: u64 = body.trim().rsplit(" = ").next().unwrap().parse().unwrap();
        // Every acknowledged increment is there; one more may be (committed, its answer lost).
        assert!(stored == *n || stored == n + 1, "{key}: acknowledged {n}, stored {stored}");
    }
    eprintln!("acknowledged before the kill: {acked:?}");
}

/// Descriptors the process holds.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn hundreds_of_idle_and_trickling_connections_leave_other_clients_served() {
    if !kvm_available("hundreds_of_idle_and_trickling_connections_leave_other_clients_served") {
        return;
    }
    let dir = TempDir::new("http-idle");
    let d = Daemon::start(&dir, &["--http-header-timeout-s", "1", "--http-max-connections", "300"]);
    let hello = d.upload("http_hello");
    assert_eq!(d.put("h", json!({"component": hello, "instances": {"min": 1}})).0, 201);
    let addr = d.addr;
    assert_eq!(d.conn().get("h.localhost", "/").status, 200);
    let fds_before = fd_count(d.process.id());
    // 400 connections, more than the daemon takes: half say nothing, half trickle a head that
    // never ends, a byte every 100 ms.
    let mut idle = Vec::new();
    for i in 0..400 {
        let Ok(mut s) = TcpStream::connect(addr) else { continue };
        if i % 2 == 1 {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: h.local");
        }
        idle.push(s);
    }
    let trickle = std::thread::spawn({
        let mut streams: Vec<TcpStream> = idle.iter().skip(1).step_by(2).filter_map(|s| s.try_clone().ok()).collect();
        move || {
            for _ in 0..20 {
                streams.retain_mut(|s| s.write_all(b"h").is_ok());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    // Meanwhile other clients are served, within the connection limit's room as it frees.
    let t = Instant::now();
    let mut served = 0;
    let mut latencies = Vec::new();
    while t.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        if let Some((status, body)) = try_get(addr, "h.localhost", "/") {
            assert_eq!((status, body.as_str()), (200, "Hello, world!\n"));
            served += 1;
            latencies.push(started.elapsed());
        }
    }
    trickle.join().unwrap();
    // The header timeout dropped every idle and trickling connection.
    let mut dropped = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut b = [0u8; 64];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) || b.starts_with(b"HTTP/1.1 408") {
            dropped += 1;
        }
    }
    drop(idle);
    latencies.sort();
    eprintln!(
        "{served} requests served beside 400 idle or trickling connections; p50 {:?}, max {:?}; {dropped} of them dropped",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    assert!(served >= 20, "other clients were served ({served})");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fd_count(d.process.id()) > fds_before + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fd_count(d.process.id()) <= fds_before + 4, "descriptors {} -> {}", fds_before, fd_count(d.process.id()));
    assert_eq!(d.conn().get("h.localhost", "/").status, 200);
}

#[test]
fn hostile_guests_fail_alone_while_honest_tenants_keep_serving() {
    if !kvm_available("hostile_guests_fail_alone_while_honest_tenants_keep_serving") {
        return;
    }
    let dir = TempDir::new("http-hostile-mix");
    // The test guest runs honest components as the real guest does, and misbehaves on request.
    let guest = images::build_dir().join(images::TEST_GUEST);
    let d = Daemon::start(&dir, &["--guest", guest.to_str().unwrap()]);
    let hello = d.upload("http_hello");
    let counter = d.upload_kind("kv-counter", "command");
    let counter_web = d.upload("http_counter");
    assert_eq!(d.put("honest", json!({"component": hello})).0, 201);
    assert_eq!(d.put("honest-kv", json!({"component": counter_web, "grants": ["keyvalue"]})).0, 201);
    assert_eq!(d.put("http-garbage", json!({"component": hello})).0, 201);
    assert_eq!(d.put("http-silent", json!({"component": hello, "timeout_s": 1})).0, 201);
    let addr = d.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let honest = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut n) = (0, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(try_get(addr, "honest.localhost", "/"), Some((200, "Hello, world!\n".to_string())));
                let (status, body) = try_get(addr, "honest-kv.localhost", "/incr?key=n").unwrap();
                assert_eq!(status, 200, "{body}");
                n += 1;
                assert_eq!(body, format!("n = {n}\n"));
                ok += 2;
            }
            ok
        })
    };
    // Meanwhile: a guest attacking its vsock device and the daemon's broker behind it (every
    // attack of the test guest's hostile driver, then an honest round trip), guests answering
    // HTTP with garbage or not at all, a guest that faults, one that spins past its time.
    let (status, v) = d.put("vsock-hostile", json!({"component": counter, "grants": ["keyvalue"], "args": []}));
    assert_eq!(status, 201, "{v}");
    for _ in 0..3 {
        assert_eq!(try_get(addr, "http-garbage.localhost", "/").map(|r| r.0), Some(502));
        assert_eq!(try_get(addr, "http-silent.localhost", "/").map(|r| r.0), Some(504));
    }
    assert_eq!(d.put("fault", json!({"component": counter, "grants": ["keyvalue"], "args": ["ud"]})).0, 201);
    wait_for("the hostile guest to finish", Duration::from_secs(30), || {
        matches!(d.tenant("vsock-hostile")["status"]["state"].as_str(), Some("exited" | "failed"))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = honest.join().unwrap();
    eprintln!("{served} honest requests served meanwhile");
    // Its exit code is the number of attacks the VMM did not refuse (its console names them).
    let v = d.tenant("vsock-hostile");
    assert_eq!((v["status"]["state"].as_str(), v["status"]["exit_code"].as_u64()), (Some("exited"), Some(0)), "{v}");
    wait_for("the faulting guest to fail", Duration::from_secs(30), || {
        d.tenant("fault")["status"]["state"] == "failed"
    });
    let v = d.tenant("fault");
    assert!(v["status"]["reason"].as_str().unwrap().contains("#UD"), "{v}");
    assert!(served > 20, "{served}");
    let (status, health) = api(&d.socket, "GET", "/v1/health", None);
    assert_eq!(status, 200, "{health}");
}

/// The value of the sample `name` (with its labels, as the exposition writes them) in the
/// daemon's `/metrics`; 0 if absent.
fn metric(d: &Daemon, name: &str) -> f64 {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[test]
fn the_pool_pre_boots_refills_after_use_and_replaces_a_child_that_died() {
    if !kvm_available("the_pool_pre_boots_refills_after_use_and_replaces_a_child_that_died") {
        return;
    }
    let dir = TempDir::new("http-pool");
    let d = Daemon::start(&dir, &["--pool-size", "2"]);
    let pre_boots = || metric(&d, r#"wasmvisor_launch_seconds_count{phase="pre_boot"}"#);
    // Pooled children are root's until a launch hands them a tenant's uid.
    let pooled =
        || -> Vec<u32> { common::children_of(d.process.id()).into_iter().filter(|p| uid_of(*p) == Some(0)).collect() };
    wait_for("two pre-booted pooled children", Duration::from_secs(30), || pre_boots() >= 2.0 && pooled().len() == 2);

    // A pooled child killed from outside is replaced, and pre-booted again, before a launch
    // would find it dead.
    let victim = pooled()[0];
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    wait_for("the dead pooled child replaced", Duration::from_secs(15), || {
        let now = pooled();
        now.len() == 2 && !now.contains(&victim) && pre_boots() >= 3.0
    });
    assert_eq!(metric(&d, "wasmvisor_pool_replaced_total"), 1.0);

    // A launch of the default size takes over a pre-booted VM; the pool refills behind it.
    let hello = d.upload("http_hello");
    assert_eq!(d.put("p", json!({"component": hello, "instances": {"min": 0, "max": 1}})).0, 201);
    assert_eq!(d.conn().get("p.localhost", "/").text(), "Hello, world!\n");
    assert_eq!(metric(&d, "wasmvisor_launches_pre_booted_total"), 1.0);
    wait_for("the pool refilled", Duration::from_secs(15), || pooled().len() == 2 && pre_boots() >= 4.0);

    // One that does not fit the pooled VMs (another memory size) boots its own, in a pooled
    // child all the same.
    assert_eq!(d.put("big", json!({"component": hello, "memory_mib": 256, "instances": {"min": 0}})).0, 201);
    assert_eq!(d.conn().get("big.localhost", "/").text(), "Hello, world!\n");
    assert_eq!(metric(&d, "wasmvisor_launches_pre_booted_total"), 1.0);
    assert_eq!(metric(&d, "wasmvisor_launch_failures_total"), 0.0);
}

#[test]
fn restored_vms_answer_with_their_own_seed_and_env_and_a_refused_snapshot_is_made_again() {
    if !kvm_available("restored_vms_answer_with_their_own_seed_and_env_and_a_refused_snapshot_is_made_again") {
        return;
    }
    let dir = TempDir::new("http-snapshots");
    let cache = dir.path().join("cache");
    let d = Daemon::start(&dir, &["--snapshots", "true", "--cache-dir", cache.to_str().unwrap()]);
    let app = d.upload("http_examples");
    let launch = |name: &str| {
        let spec = json!({"component": app, "env": {"WHO": name}, "instances": {"min": 0, "max": 1}});
        assert_eq!(d.put(name, spec).0, 201);
        let host = format!("{name}.localhost");
        let random = d.conn().get(&host, "/random");
        assert_eq!(random.status, 200, "{}", random.text());
        let env = d.conn().get(&host, "/env").text();
        assert!(env.lines().any(|l| l == format!("WHO={name}")), "{name}: {env}");
        random.text()
    };
    // The first launch boots; the snapshot is made behind it.
    let mut seen = vec![launch("a0")];
    wait_for("the snapshot made", Duration::from_secs(30), || metric(&d, "wasmvisor_snapshots_made_total") >= 1.0);
    assert_eq!(metric(&d, "wasmvisor_launches_restored_total"), 0.0);
    // Launches after it start from it: each VM with its tenant's env and a seed of its own.
    for name in ["b1", "b2", "b3"] {
        seen.push(launch(name));
    }
    assert_eq!(metric(&d, "wasmvisor_launches_restored_total"), 3.0);
    let distinct: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "no two VMs share a seed: {seen:?}");

    // A snapshot a VMM child cannot use (here: its header overwritten) is refused; the launch
    // loads the component itself, and the snapshot is made again.
    let snap = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "snap"))
        .expect("the snapshot file");
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&snap).unwrap(),
        &[0; 64],
        0,
    )
    .unwrap();
    launch("c1");
    assert_eq!(metric(&d, "wasmvisor_snapshots_failed_total"), 1.0);
    assert_eq!(metric(&d, "wasmvisor_launches_restored_total"), 3.0);
    wait_for("the snapshot made again", Duration::from_secs(30), || {
        metric(&d, "wasmvisor_snapshots_made_total") >= 2.0
    });
    launch("c2");
    assert_eq!(metric(&d, "wasmvisor_launches_restored_total"), 4.0);
    assert_eq!(metric(&d, "wasmvisor_launch_failures_total"), 0.0);

    // A daemon that restarts (here after a kill -9) restores from the snapshot its earlier
    // life made and verified, making none.
    drop(d);
    let d = Daemon::start(&dir, &["--snapshots", "true", "--cache-dir", cache.to_str().unwrap()]);
    let spec = json!({"component": app, "env": {"WHO": "d1"}, "instances": {"min": 0, "max": 1}});
    assert_eq!(d.put("d1", spec).0, 201);
    let env = d.conn().get("d1.localhost", "/env").text();
    assert!(env.lines().any(|l| l == "WHO=d1"), "{env}");
    assert_eq!(metric(&d, "wasmvisor_launches_restored_total"), 1.0);
    assert_eq!(metric(&d, "wasmvisor_snapshots_made_total"), 0.0);
    assert_eq!(metric(&d, "wasmvisor_launch_failures_total"), 0.0);
}
