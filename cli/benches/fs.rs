//! Preopened-directory benchmark: the fs-bench component (images/src/bin/fs-bench.rs) under
//! `wasmvisor run --dir` and `wasmtime run --dir`, interleaved, each timing its workload from
//! inside the component (so process start and compile are out of the figures):
//!
//! - `meta`: open + stat + close of one file, per operation (1,000 per run);
//! - `write`: 64 MiB in 64 KiB writes, then `sync_all` (MB/s);
//! - `read`: that file read back in 64 KiB reads (MB/s);
//! - `readdir`: a directory of 10,000 entries listed (per listing).
//!
//! It also reports the capability round trips each workload costs (the vsock device's count,
//! from `run -v`). Last, the same 64 MiB read by a tenant of a daemon (`serve --dirs-root`),
//! whose broker is in the daemon and answers the bytes (at most 960 KiB a read), which the
//! VMM child places in guest RAM: the daemon's path, beside `run`'s. `cargo bench --bench fs` runs N = 10 rounds (`$WASMVISOR_BENCH_N`); under
//! `cargo test` it is a 1-round smoke pass. The wasmtime CLI is found as in `benches/run.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use wasmvisor::images;

mod common;

fn wasmtime_cli() -> Option<PathBuf> {
    [
        std::env::var_os("WASMTIME").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasmtime-cli/bin/wasmtime")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
}

/// Runs one workload; returns the component's own figure (µs) and, for wasmvisor, the
/// capability requests the device served.
fn workload(program: &Path, runtime_args: &[&str], dir: &Path, args: &[&str]) -> (f64, Option<u64>) {
    let component = images::component("fs-bench");
    let host = format!("{}::/d", dir.display());
    let out = Command::new(program)
        .args(runtime_args)
        .args(["--dir", &host])
        .arg(&component)
        .args(args)
        .env("WASMVISOR_CACHE_DIR", std::env::temp_dir().join("wasmvisor-bench-fs-cache"))
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} {args:?}: {stdout}{stderr}", program.display());
    let us: f64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no figure in {stdout:?}"));
    let requests = stderr
        .split("capability_requests: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok());
    (us, requests)
}

fn main() {
    let (_, n) = common::iterations(10, 1);
    let wasmvisor = PathBuf::from(env!("CARGO_BIN_EXE_wasmvisor"));
    let Some(wasmtime) = wasmtime_cli() else {
        println!("fs: skipped: no wasmtime CLI (scripts/install-wasmtime-cli.sh)");
        return;
    };
    let root = std::env::temp_dir().join(format!("wasmvisor-bench-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (ours, theirs) = (root.join("wasmvisor"), root.join("wasmtime"));
    for d in [&ours, &theirs] {
        std::fs::create_dir_all(d.join("many")).unwrap();
        for i in 0..10_000 {
            std::fs::write(d.join("many").join(i.to_string()), "").unwrap();
        }
    }
    const META_OPS: f64 = 1000.0;
    const MIB: f64 = 64.0;
    let cases: [(&str, Vec<&str>); 4] = [
        ("open+stat+close (us/op)", vec!["meta", "/d", "1000"]),
        ("write 64 MiB (MB/s)", vec!["write", "/d", "64"]),
        ("read 64 MiB (MB/s)", vec!["read", "/d"]),
        ("readdir 10,000 entries (ms)", vec!["readdir", "/d/many"]),
    ];
    // Warm both artifact caches first.
    workload(&wasmvisor, &["run"], &ours, &["meta", "/d", "1"]);
    workload(&wasmtime, &["run"], &theirs, &["meta", "/d", "1"]);
    println!("preopened directories, {n} rounds, interleaved; figures from inside the component");
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>12} {:>8} {:>10}",
        "", "ours p50", "ours p99", "wasmtime p50", "wt p99", "ratio", "round trips"
    );
    // wasmtime's read figures, for the daemon's row.
    let mut read_rates = Vec::new();
    for (name, args) in &cases {
        let (mut a, mut b, mut trips) = (Vec::new(), Vec::new(), None);
        for _ in 0..n {
            let (us, requests) = workload(&wasmvisor, &["run", "-v"], &ours, args);
            a.push(us);
            trips = requests;
            b.push(workload(&wasmtime, &["run"], &theirs, args).0);
        }
        // Figures as the row names them; the ratio is always "how many times wasmtime's
        // speed" (above 1: faster than wasmtime).
        let (conv, higher_is_better): (fn(f64) -> f64, bool) = match args[0] {
            "meta" => (|us| us / META_OPS, false),
            "write" | "read" => (|us| MIB * 1.048_576 / (us / 1e6), true),
            _ => (|us| us / 1000.0, false),
        };
        let mut a: Vec<f64> = a.into_iter().map(conv).collect();
        let mut b: Vec<f64> = b.into_iter().map(conv).collect();
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        // p99 is the worse end: the low throughput, the high time.
        let worst = |v: &[f64]| if higher_is_better { v[0] } else { common::percentile(v, 0.99) };
        let (pa, pb) = (common::percentile(&a, 0.5), common::percentile(&b, 0.5));
        let ratio = if higher_is_better { pa / pb } else { pb / pa };
        let per_op = match (trips, args[0]) {
            (Some(t), "meta") => format!("{:.1}/op", t as f64 / 1001.0),
            (Some(t), _) => t.to_string(),
            (None, _) => "-".into(),
        };
        println!("{name:<30} {pa:>12.1} {:>12.1} {pb:>12.1} {:>12.1} {ratio:>7.3}x {per_op:>10}", worst(&a), worst(&b));
        if args[0] == "read" {
            read_rates.extend(b);
        }
    }
    {
        let d = daemon_reads(&wasmvisor, &root, n);
        let mut rates: Vec<f64> = d.into_iter().map(|us| MIB * 1.048_576 / (us / 1e6)).collect();
        rates.sort_by(f64::total_cmp);
        read_rates.sort_by(f64::total_cmp);
        let (pa, pb) = (common::percentile(&rates, 0.5), common::percentile(&read_rates, 0.5));
        println!(
            "{:<30} {pa:>12.1} {:>12.1} {pb:>12.1} {:>12.1} {:>7.3}x {:>10}",
            "read 64 MiB, daemon tenant",
            rates[0],
            read_rates[0],
            pa / pb,
            "-"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// The `read` workload `n` times as a command tenant of a daemon serving `root/wasmvisor` as
/// its dirs root: the component's own figures (µs), from the tenant's log.
fn daemon_reads(exe: &Path, root: &Path, n: usize) -> Vec<f64> {
    // The daemon's own files beside the dirs root, not in it.
    let own = root.with_extension("daemon");
    let _ = std::fs::remove_dir_all(&own);
    std::fs::create_dir_all(&own).unwrap();
    let socket = own.join("api.sock");
    let mut daemon = Command::new(exe)
        .arg("serve")
        .arg("--data-dir")
        .arg(own.join("data"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--dirs-root")
        .arg(root)
        .args(["--http-listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(root.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not start: see {}",
            root.join("daemon.log").display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let bytes = std::fs::read(images::component("fs-bench")).unwrap();
    let (status, body) = common::api(&socket, "POST", "/v1/components", &bytes, "application/wasm");
    assert_eq!(status, 201, "{body}");
    let digest = body.split("\"digest\":\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let spec = format!(
        r#"{{"component":"{digest}","args":["read","/d"],"grants":["filesystem"],"dirs":[{{"host":"wasmvisor","guest":"/d"}}]}}"#
    );
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("r{i}");
        let (status, body) =
            common::api(&socket, "PUT", &format!("/v1/tenants/{name}"), spec.as_bytes(), "application/json");
        assert_eq!(status, 201, "{body}");
        let (_, state) = common::api(&socket, "GET", &format!("/v1/tenants/{name}?wait=true"), b"", "application/json");
        let (_, log) = common::api(&socket, "GET", &format!("/v1/tenants/{name}/logs"), b"", "text/plain");
        let us = log
            .lines()
            .find_map(|l| l.split_once(" stdout read ")?.1.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no figure from the daemon tenant: {state}\n{log}"));
        out.push(us);
        common::api(&socket, "DELETE", &format!("/v1/tenants/{name}"), b"", "application/json");
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&own);
    out
}
