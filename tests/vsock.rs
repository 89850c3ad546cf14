//! Integration tests for capabilities over virtio-vsock: components granted key-value, logging
//! and config reach their providers; ungranted ones are refused before boot; tenants are kept
//! apart and their data survives the host process; a hostile guest cannot take the VMM down;
//! host-initiated and forwarded connections work, and an idle guest costs no CPU.
//!
//! Every test runs the real binary in its own process with its own data directory. Tests that
//! need KVM skip loudly where `/dev/kvm` is absent, and fail when `CI=true`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use wasmvisor::images::{self, TEST_GUEST};
use wasmvisor::vm::EXIT_SETUP_FAILED;

use common::{TempDir, code, kvm_available, stderr, stdout};

mod common;

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("wasmvisor-test-cache-{}", std::process::id()))
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wasmvisor"));
    c.args(args).env("WASMVISOR_CACHE_DIR", cache_dir()).env_remove("WASMVISOR_DATA_DIR");
    c
}

fn wasmvisor(args: &[&str]) -> Output {
    command(args).stdin(Stdio::null()).output().expect("run wasmvisor")
}

/// `wasmvisor run --data-dir DATA FLAGS... COMPONENT ARGS...`.
fn run(data: &TempDir, flags: &[&str], name: &str, args: &[&str]) -> Output {
    let path = images::component(name);
    assert!(path.is_file(), "component {} is missing: run scripts/build-images.sh", path.display());
    let mut all = vec!["run", "--data-dir", data.path().to_str().unwrap()];
    all.extend_from_slice(flags);
    all.push(path.to_str().unwrap());
    all.extend_from_slice(args);
    wasmvisor(&all)
}

fn test_guest_args<'a>(data: &'a TempDir, flags: &[&'a str], args: &[&'a str], guest: &'a str) -> Vec<&'a str> {
    let mut all = vec!["boot", "--guest", guest, "--data-dir", data.path().to_str().unwrap(), "--timeout", "30"];
    all.extend_from_slice(flags);
    all.push("--");
    all.extend_from_slice(args);
    all
}

fn test_guest() -> String {
    let p = images::guest_image(TEST_GUEST);
    assert!(p.is_file(), "{} is missing: run scripts/build-guest.sh", p.display());
    p.to_string_lossy().into_owned()
}

#[test]
fn the_counter_persists_across_runs_of_the_host_process() {
    if !kvm_available("the_counter_persists_across_runs_of_the_host_process") {
        return;
    }
    let data = TempDir::new("vsock-counter");
    // Each run is a fresh wasmvisor process: the value lives only in the tenant's store.
    for expected in 1..=3 {
        let out = run(&data, &["--grant", "keyvalue"], "kv-counter", &[]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), format!("counter = {expected}\n"));
    }
    let out = run(&data, &["--grant", "keyvalue"], "kv-counter", &["visits"]);
    assert_eq!(stdout(&out), "visits = 1\n", "{}", stderr(&out));
    assert!(data.path().join("tenants/default/keyvalue.redb").is_file());
}

#[test]
fn tenants_with_the_same_keys_see_only_their_own_values() {
    if !kvm_available("tenants_with_the_same_keys_see_only_their_own_values") {
        return;
    }
    let data = TempDir::new("vsock-tenants");
    let count = |tenant: &str| {
        let out = run(&data, &["--grant", "keyvalue", "--tenant", tenant], "kv-counter", &[]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(count("alice"), "counter = 1\n");
    assert_eq!(count("alice"), "counter = 2\n");
    assert_eq!(count("bob"), "counter = 1\n");
    assert_eq!(count("alice"), "counter = 3\n");
    assert_eq!(count("bob"), "counter = 2\n");
    // A name that would leave the data directory is refused.
    let out = run(&data, &["--grant", "keyvalue", "--tenant", "../alice"], "kv-counter", &[]);
    assert_eq!(code(&out), 2, "clap usage error: {}", stderr(&out));
    assert!(stderr(&out).contains("invalid tenant name"), "{}", stderr(&out));
}

#[test]
fn an_ungranted_capability_is_refused_before_boot() {
    let data = TempDir::new("vsock-ungranted");
    for (name, flags, import, grant) in [
        ("kv-counter", &[][..], "wasi:keyvalue/store@0.2.0-draft", "keyvalue"),
        ("kv-counter", &["--grant", "logging", "--grant", "config"][..], "wasi:keyvalue/store@0.2.0-draft", "keyvalue"),
        ("logger", &["--grant", "keyvalue"][..], "wasi:logging/logging@0.1.0-draft", "logging"),
        ("config-reader", &["--config", "a=1"][..], "wasi:config/store@0.2.0-rc.1", "config"),
    ] {
        let t = Instant::now();
        let out = run(&data, flags, name, &[]);
        assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("imports `{import}`")), "{err}");
        assert!(err.contains(&format!("pass `--grant {grant}` to grant it")), "{err}");
        assert!(stdout(&out).is_empty());
        // Refused by inspection: no VM, so no compile and no boot (generous bound for CI).
        assert!(t.elapsed() < Duration::from_secs(5), "{name} took {:?}", t.elapsed());
    }
    // Nothing was written for the tenant.
    assert!(!data.path().join("tenants").exists());
    let out = wasmvisor(&["run", "--grant", "network", "x.wasm"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("expected one of logging, config, keyvalue, http-outgoing"), "{}", stderr(&out));
}

#[test]
fn log_records_reach_the_tenant_log_with_level_and_context() {
    if !kvm_available("log_records_reach_the_tenant_log_with_level_and_context") {
        return;
    }
    let data = TempDir::new("vsock-logging");
    let out = run(&data, &["--grant", "logging", "--tenant", "t1"], "logger", &["hello", "forged\n2020 ERROR [x] y"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "logged 8 records\n");
    let log = std::fs::read_to_string(data.path().join("tenants/t1/tenant.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 8, "{log}");
    for (line, level) in lines.iter().zip(["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"]) {
        assert!(line.ends_with(&format!("Z {level} [logger] record at {}", level.to_lowercase())), "{line}");
    }
    assert!(lines[6].ends_with("INFO [args] hello"), "{}", lines[6]);
    // A newline in a message cannot start a forged record.
    assert!(lines[7].ends_with("INFO [args] forged\\n2020 ERROR [x] y"), "{}", lines[7]);
    // The user at the terminal sees the same records on stderr, one escaped line each.
    let shown: Vec<&str> = lines.iter().map(|l| l.split_once(' ').unwrap().1).collect();
    let err = stderr(&out);
    let echoed: Vec<&str> = err.lines().filter(|l| shown.contains(l)).collect();
    assert_eq!(echoed, shown, "stderr:\n{err}");
}

#[test]
fn config_values_come_from_the_launch_configuration() {
    if !kvm_available("config_values_come_from_the_launch_configuration") {
        return;
    }
    let data = TempDir::new("vsock-config");
    let flags = ["--grant", "config", "--config", "greeting=hello world", "--config", "url=http://x/?a=b"];
    let out = run(&data, &flags, "config-reader", &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "greeting=hello world\nurl=http://x/?a=b\n");
    let out = run(&data, &flags, "config-reader", &["url", "missing"]);
    assert_eq!(stdout(&out), "url=http://x/?a=b\nmissing is not set\n", "{}", stderr(&out));
    let out = run(&data, &["--grant", "config", "--config", "a=1", "--config", "a=2"], "config-reader", &[]);
    assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED));
    assert!(stderr(&out).contains("--config a is given more than once"), "{}", stderr(&out));
    let out = run(&data, &["--grant", "config", "--config", "novalue"], "config-reader", &[]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn the_key_value_store_atomics_and_batch_interfaces_work() {
    if !kvm_available("the_key_value_store_atomics_and_batch_interfaces_work") {
        return;
    }
    let data = TempDir::new("vsock-probe");
    let out = run(&data, &["--grant", "keyvalue"], "kv-probe", &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "open probe: ok\nset a=1: ok\nget a: 1\nexists a: true\nexists missing: false\nget missing: none\n\
         set-many b=2 c=3: ok\nget-many a b missing: a=1 b=2 none\nlist-keys: a b c\nincrement n 5: 5\n\
         increment n 5: 10\ndelete a: ok\nexists a: false\ndelete-many b c: ok\nlist-keys: n\n"
    );
}

#[test]
fn a_hostile_guest_fails_the_device_not_the_vmm() {
    if !kvm_available("a_hostile_guest_fails_the_device_not_the_vmm") {
        return;
    }
    let data = TempDir::new("vsock-hostile");
    let guest = test_guest();
    let out = wasmvisor(&test_guest_args(&data, &["--grant", "keyvalue"], &["vsock-hostile"], &guest));
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(code(&out), 0, "stdout:\n{o}\nstderr:\n{e}");
    assert!(o.ends_with("an honest driver after a reset: no-op round trip: ok\nhostile: 0 failures\n"), "{o}");
    assert!(!o.contains("FAILED"), "{o}");
    // Each fault is reported with its reason.
    for reason in [
        "invalid guest address",
        "smaller length than expected",
        "Unexpected write-only descriptor",
        "not enough descriptors in the chain",
        "Invalid header `len` field value: 1048576",
        "more descriptors to process than queue size",
        "RX descriptor chain 0: Unexpected read-only descriptor",
    ] {
        assert!(e.contains("the guest broke its vsock device: ") && e.contains(reason), "{reason}:\n{e}");
    }
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn without_grants_or_socket_a_vm_has_no_vsock_device() {
    if !kvm_available("without_grants_or_socket_a_vm_has_no_vsock_device") {
        return;
    }
    let data = TempDir::new("vsock-nodevice");
    let guest = test_guest();
    let out = wasmvisor(&test_guest_args(&data, &[], &["vsock-noop", "1"], &guest));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stdout(&out).contains("this VM has no vsock device"), "{}", stdout(&out));
}

/// Waits for `path` to appear (the VMM binds it before the VM starts).
fn wait_for(path: &Path) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < give_up, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn host_initiated_connections_use_the_connect_handshake() {
    if !kvm_available("host_initiated_connections_use_the_connect_handshake") {
        return;
    }
    let data = TempDir::new("vsock-connect");
    let sock = data.path().join("vm.sock");
    let guest = test_guest();
    let args = test_guest_args(&data, &["--vsock-socket", sock.to_str().unwrap()], &["vsock-echo", "5000"], &guest);
    let child = command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(&sock);
    // The guest may not listen yet: it answers a request to a closed port with RST, which
    // closes our socket without "OK" (or before our request is written); try again.
    let give_up = Instant::now() + Duration::from_secs(20);
    let (mut stream, ok) = loop {
        let mut s = UnixStream::connect(&sock).unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        // The refusal may close the socket before the request is even written (EPIPE).
        if s.write_all(b"CONNECT 5000\n").is_ok() && reader.read_line(&mut line).unwrap_or(0) > 0 {
            break (s, line);
        }
        assert!(Instant::now() < give_up, "the guest never accepted");
        std::thread::sleep(Duration::from_millis(20));
    };
    let port: u32 = ok.strip_prefix("OK ").and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| panic!("{ok:?}"));
    assert!(port >= 1 << 30, "local port {port}");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut s = stream.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || s.write_all(&payload).unwrap())
    };
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).unwrap();
    writer.join().unwrap();
    assert!(echoed == payload, "the echo differs");
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("echoed 200000 bytes"), "{}", stdout(&out));
    assert!(!sock.exists(), "the socket is removed when the VM ends");
    // A bad handshake line just closes the socket (the VM is gone now: no socket at all).
    let bad = wasmvisor(&test_guest_args(&data, &["--vsock-socket", "/proc/nope/x.sock"], &["exit", "0"], &guest));
    assert_eq!(code(&bad), i32::from(EXIT_SETUP_FAILED));
    assert!(stderr(&bad).contains("cannot listen on the vsock socket /proc/nope/x.sock"), "{}", stderr(&bad));
}

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_guest_waiting_on_a_forwarded_port_uses_no_cpu() {
    if !kvm_available("a_guest_waiting_on_a_forwarded_port_uses_no_cpu") {
        return;
    }
    let data = TempDir::new("vsock-idle");
    let sock = data.path().join("vm.sock");
    // The guest connects to host port 6000: forwarded to `<socket>_6000`.
    let listener = UnixListener::bind(data.path().join("vm.sock_6000")).unwrap();
    let guest = test_guest();
    let args = test_guest_args(&data, &["--vsock-socket", sock.to_str().unwrap()], &["vsock-idle", "6000"], &guest);
    let child = command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    // Connected: the guest now waits for a line. Measure what the whole VMM process burns.
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(child.id());
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu_ticks(child.id()) - before;
    let elapsed = t.elapsed();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let cpu = Duration::from_millis(ticks * 1000 / hz.max(1));
    eprintln!("idle guest: {cpu:?} of CPU in {elapsed:?}");
    assert!(cpu <= Duration::from_millis(20), "an idle guest used {cpu:?} of CPU in {elapsed:?}");
    conn.write_all(b"wake up\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).ends_with("got: wake up\n"), "{}", stdout(&out));
}

#[test]
fn a_port_nobody_serves_is_refused() {
    if !kvm_available("a_port_nobody_serves_is_refused") {
        return;
    }
    let data = TempDir::new("vsock-refused");
    let sock = data.path().join("vm.sock");
    let guest = test_guest();
    // With a socket path but nothing at `<path>_7000`, and with no socket path at all.
    for flags in [vec!["--vsock-socket", sock.to_str().unwrap()], vec!["--grant", "logging"]] {
        let out = wasmvisor(&test_guest_args(&data, &flags, &["vsock-idle", "7000"], &guest));
        assert_eq!(code(&out), 1, "{}", stderr(&out));
        assert!(stdout(&out).contains("connect to host port 7000: the host refused"), "{}", stdout(&out));
    }
}
