//! Component benchmark: `wasmvisor run` with a warm artifact cache, by phase, and against
//! `wasmtime run` on the host.
//!
//! `cargo bench --bench run` measures:
//! (a) hello.wasm in-process (N boots, default 100): VMM phases plus the guest's own phases
//!     (engine, deserialize, link, instantiate, run), exits and resident pages; then the whole
//!     `wasmvisor run hello.wasm` process;
//! (b) the SHA-256 kernel (64 MiB) inside the VM against the same component under
//!     `wasmtime run` on the host, interleaved, as a ratio;
//! (c) `wasmvisor run hello.wasm` against `wasmtime run --allow-precompiled hello.cwasm`,
//!     interleaved, as a ratio;
//! (d) learning the guest's CPU features: a feature-report boot (first run on a host) and the
//!     cached lookup every later run pays;
//! (e) large components: python_hello.wasm (18 MB, CPython by componentize-py) and any named in
//!     `$WASMVISOR_BENCH_EXTRA` (paths joined by `:`): the first compile (`wasmvisor compile`
//!     on an empty cache against `wasmtime compile`), in-process phases with exits (KVM's
//!     count) and resident pages beside wasmtime's own phases (tools/wasmtime-phases, the same
//!     wasmtime release embedded, timing what `wasmtime run` does), and the whole `wasmvisor
//!     run` process against `wasmtime run --allow-precompiled`, interleaved. Bench mode only
//!     (`cargo bench`): a debug build compiles it for a minute; tests/run.rs checks it runs.
//! (b), (c) and (e) need the wasmtime CLI of the same version: `$WASMTIME`, `wasmtime` on PATH,
//! or target/wasmtime-cli/bin/wasmtime, with wasmtime-phases beside it
//! (scripts/install-wasmtime-cli.sh installs both). Under `cargo test`
//! it runs a 2-iteration smoke pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmvisor::console::SharedBuffer;
use wasmvisor::hypercall::GuestIo;
use wasmvisor::images;
use wasmvisor::vm::{self, Phases, VmConfig};
use wasmvisor::wasm::aot;

mod common;

fn row(name: &str, us: Vec<f64>) -> f64 {
    common::row(46, name, us)
}

fn header() {
    common::header(46);
}

fn time_cmd(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> f64 {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let status = cmd.status().unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let us = t.elapsed().as_secs_f64() * 1e6;
    assert!(status.success(), "{} {args:?} failed: {status}", program.display());
    us
}

fn wasmtime_cli() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("WASMTIME").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasmtime-cli/bin/wasmtime")),
        std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join("wasmtime")).find(|p| p.is_file())),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file())?;
    let version = Command::new(&found).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    if !version.contains(wasmvisor_engine::WASMTIME_VERSION) {
        println!(
            "note: {} is {}, not {}; comparing anyway",
            found.display(),
            version.trim(),
            wasmvisor_engine::WASMTIME_VERSION
        );
    }
    Some(found)
}

/// Parses the guest's `guest phases (us): name value ...` console line.
fn guest_phases(console: &str) -> Vec<(String, f64)> {
    phase_pairs(console, "guest phases (us):")
}

fn main() {
    let (bench, n) = common::iterations(100, 2);
    if !Path::new("/dev/kvm").exists() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true but /dev/kvm is missing");
        eprintln!("SKIPPED run benchmark: /dev/kvm is missing");
        return;
    }
    let cache = std::env::temp_dir().join(format!("wasmvisor-bench-cache-{}", std::process::id()));
    let hello = images::component("hello");
    let sha = images::component("sha256");
    assert!(hello.is_file() && sha.is_file(), "build the components first: scripts/build-images.sh");
    let flags = wasmvisor::guest_cpu::GuestCpu::for_vm(&cache, &VmConfig::default()).expect("guest CPU").isa_flags();
    let artifact = |p: &Path| aot::compile_cached(p, &std::fs::read(p).unwrap(), &cache, &flags).expect("compile").path;
    let hello_artifact = artifact(&hello);
    let sha_artifact = artifact(&sha);
    println!(
        "wasmvisor run benchmark | KVM: {} | {} CPUs | wasmtime {}",
        vm::kvm_flavor(),
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        wasmvisor_engine::WASMTIME_VERSION
    );

    // (a) hello.wasm in-process, warm cache.
    let config = VmConfig {
        memory_mib: 128,
        args: vec!["hello.wasm".into()],
        component: Some(hello_artifact.clone()),
        report_guest_phases: true,
        count_resident_pages: true,
        ..VmConfig::default()
    };
    let boot = || {
        let console = SharedBuffer::default();
        let stdout = SharedBuffer::default();
        let io = GuestIo::captured(Box::new(console.clone()), Box::new(stdout.clone()), Box::new(std::io::sink()));
        let report = vm::boot(&config, io).expect("run hello");
        assert_eq!(report.exit_code, 0);
        assert_eq!(stdout.contents(), b"Hello, world!\n");
        (report, guest_phases(&console.text()))
    };
    for _ in 0..3 {
        boot();
    }
    let mut phases: Vec<Phases> = Vec::new();
    let mut guest: Vec<Vec<(String, f64)>> = Vec::new();
    let (mut exits, mut pages) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (report, g) = boot();
        phases.push(report.phases);
        exits.push(report.exits.total);
        pages.push(report.resident_pages);
        guest.push(g);
    }
    println!("(a) hello.wasm, in-process, warm artifact cache, N = {n}");
    header();
    let us = |f: fn(&Phases) -> Duration| phases.iter().map(|p| f(p).as_secs_f64() * 1e6).collect::<Vec<_>>();
    row("run/vm_create", us(|p| p.vm_create));
    row("run/memory (vCPU thread, overlapped)", us(|p| p.memory));
    row("run/artifact+image load", us(|p| p.image_load));
    row("run/vcpu_setup", us(|p| p.vcpu_setup));
    row("run/guest_run (all guest phases below)", us(|p| p.guest_run));
    for name in ["engine", "deserialize", "link", "instantiate", "run"] {
        let samples = samples(&guest, name);
        if !samples.is_empty() {
            row(&format!("run/guest/{name}"), samples);
        }
    }
    row("run/teardown", us(|p| p.teardown));
    row("run/total (in-process, wall)", us(|p| p.wall));
    let range = |v: &[u64]| (v.iter().min().copied().unwrap_or(0), v.iter().max().copied().unwrap_or(0));
    println!("per run: exits {:?}, resident guest RAM pages {:?} (min, max)", range(&exits), range(&pages));

    let exe = Path::new(env!("CARGO_BIN_EXE_wasmvisor"));
    let hello_s = hello.to_str().unwrap();
    let env: [(&str, &Path); 1] = [("WASMVISOR_CACHE_DIR", &cache)];
    let m = n.min(50);
    for _ in 0..3 {
        time_cmd(exe, &["run", hello_s], &env);
    }
    let wasmtime = wasmtime_cli();
    let (mut ours, mut theirs, mut spawn) = (Vec::new(), Vec::new(), Vec::new());
    let cwasm = cache.join("hello.cwasm");
    if let Some(wt) = &wasmtime {
        let status = Command::new(wt).args(["compile", hello_s, "-o", cwasm.to_str().unwrap()]).status().unwrap();
        assert!(status.success(), "wasmtime compile failed");
    }
    for _ in 0..m {
        ours.push(time_cmd(exe, &["run", hello_s], &env));
        spawn.push(time_cmd(Path::new("/bin/true"), &[], &[]));
        if let Some(wt) = &wasmtime {
            theirs.push(time_cmd(wt, &["run", "--allow-precompiled", cwasm.to_str().unwrap()], &[]));
        }
    }
    println!("(a/c) whole process, N = {m}, interleaved");
    header();
    let ours_p50 = row("cmd/wasmvisor run hello.wasm (warm cache)", ours);
    row("cmd/true (process spawn floor)", spawn);
    if let Some(_wt) = &wasmtime {
        let theirs_p50 = row("cmd/wasmtime run --allow-precompiled hello.cwasm", theirs);
        println!("(c) ratio wasmvisor/wasmtime p50: {:.2}x (goal < 0.6x)", ours_p50 / theirs_p50);
    } else {
        println!("(c) skipped: no wasmtime CLI (scripts/install-wasmtime-cli.sh)");
    }
    println!("(a) whole-process p50 {:.2} ms (goal <= 10 ms)", ours_p50 / 1e3);

    // (d) the guest's CPU features.
    let (mut probes, mut lookups) = (Vec::new(), Vec::new());
    for _ in 0..m {
        let t = Instant::now();
        wasmvisor::guest_cpu::probe(&VmConfig::default()).expect("feature-report boot");
        probes.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let cpu = wasmvisor::guest_cpu::GuestCpu::for_vm(&cache, &VmConfig::default()).expect("cached report");
        lookups.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(!cpu.probed, "the report is cached");
    }
    println!("(d) guest CPU features, N = {m}, interleaved");
    header();
    row("cpu/feature-report boot (once per host)", probes);
    let lookup_p50 = row("cpu/cached report lookup (every run)", lookups);
    println!("(d) lookup / whole `wasmvisor run` p50: {:.1}%", lookup_p50 / ours_p50 * 100.0);

    // (b) compute kernel.
    let mib = if bench { "64" } else { "4" };
    let sha_s = sha.to_str().unwrap();
    let k = if bench { 5 } else { 1 };
    let sha_config = VmConfig {
        memory_mib: 128,
        args: vec!["sha256.wasm".into(), mib.into()],
        component: Some(sha_artifact),
        ..VmConfig::default()
    };
    let (mut in_vm, mut on_host) = (Vec::new(), Vec::new());
    for _ in 0..k {
        let t = Instant::now();
        let io = GuestIo::captured(Box::new(std::io::sink()), Box::new(std::io::sink()), Box::new(std::io::sink()));
        let report = vm::boot(&sha_config, io).expect("run sha256");
        assert_eq!(report.exit_code, 0);
        in_vm.push(t.elapsed().as_secs_f64() * 1e6);
        if let Some(wt) = &wasmtime {
            on_host.push(time_cmd(wt, &["run", sha_s, mib], &[]));
        }
    }
    println!("(b) SHA-256 over {mib} MiB, {k} runs each, interleaved");
    header();
    let vm_p50 = row("kernel/wasmvisor (in-process, whole VM)", in_vm);
    if wasmtime.is_some() {
        let host_p50 = row("kernel/wasmtime run (host, whole process)", on_host);
        println!("(b) ratio wasmvisor/wasmtime p50: {:.2}x (goal <= 1.3x)", vm_p50 / host_p50);
    } else {
        println!("(b) skipped the host side: no wasmtime CLI");
    }
    if bench {
        large_components(&cache, &flags, exe, wasmtime.as_deref());
    } else {
        println!("(e) the large component: measured by `cargo bench --bench run` only");
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// (e): python_hello.wasm and the components named in `$WASMVISOR_BENCH_EXTRA`.
fn large_components(cache: &Path, flags: &[&str], exe: &Path, wasmtime: Option<&Path>) {
    let py = images::component("python_hello");
    assert!(py.is_file(), "build the components first: scripts/build-images.sh");
    // Others built by other toolchains, by hand (a 12 MB componentize-js command, say):
    // `WASMVISOR_BENCH_EXTRA=a.wasm:b.wasm`.
    let extra = std::env::var_os("WASMVISOR_BENCH_EXTRA").unwrap_or_default();
    let mut components = vec![py];
    components.extend(std::env::split_paths(&extra).filter(|p| !p.as_os_str().is_empty()));
    let phases_tool = wasmtime.and_then(|wt| Some(wt.parent()?.join("wasmtime-phases"))).filter(|p| p.is_file());
    if phases_tool.is_none() {
        println!("(e) no wasmtime-phases beside the wasmtime CLI: wasmtime's own phases are not shown");
    }
    for component in &components {
        large_component(cache, flags, exe, wasmtime, phases_tool.as_deref(), component);
    }
}

/// The first line of `stderr` that starts with `prefix`, as `name value` pairs.
fn phase_pairs(stderr: &str, prefix: &str) -> Vec<(String, f64)> {
    let Some(line) = stderr.lines().find_map(|l| l.strip_prefix(prefix)) else { return Vec::new() };
    let words: Vec<&str> = line.split_whitespace().collect();
    words.chunks(2).filter_map(|c| Some((c.first()?.to_string(), c.get(1)?.parse().ok()?))).collect()
}

/// The samples of phase `name` across runs.
fn samples(runs: &[Vec<(String, f64)>], name: &str) -> Vec<f64> {
    runs.iter().filter_map(|g| g.iter().find(|(k, _)| k == name).map(|(_, v)| *v)).collect()
}

fn large_component(
    cache: &Path,
    flags: &[&str],
    exe: &Path,
    wasmtime: Option<&Path>,
    phases_tool: Option<&Path>,
    path: &Path,
) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let path_s = path.to_str().unwrap();
    let n = std::env::var("WASMVISOR_BENCH_LARGE_N").map_or(30, |v| v.parse().expect("a count"));
    let k = std::env::var("WASMVISOR_BENCH_COMPILES").map_or(3, |v| v.parse().expect("a count"));
    let short = name.trim_end_matches(".wasm");

    // First compile, interleaved: `wasmvisor compile` into an empty cache (the guest's CPU
    // report copied in, as any host after its first run has it) against `wasmtime compile`.
    let cpu_report = wasmvisor::guest_cpu::GuestCpu::for_vm(cache, &VmConfig::default()).expect("guest CPU").path;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let cwasm = cache.join(format!("{short}.cwasm"));
    for i in 0..k {
        let empty = cache.join(format!("empty-{i}"));
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::copy(&cpu_report, empty.join(cpu_report.file_name().unwrap())).unwrap();
        ours.push(time_cmd(exe, &["compile", path_s], &[("WASMVISOR_CACHE_DIR", &empty)]));
        let _ = std::fs::remove_dir_all(&empty);
        if let Some(wt) = wasmtime {
            theirs.push(time_cmd(wt, &["compile", path_s, "-o", cwasm.to_str().unwrap()], &[]));
        }
    }
    println!("(e) first compile of {name} ({:.1} MB), {k} each, interleaved", file_mb(path));
    header();
    let ours_p50 = row("compile/wasmvisor compile (empty cache)", ours);
    if wasmtime.is_some() {
        let theirs_p50 = row("compile/wasmtime compile", theirs);
        println!("(e) compile ratio wasmvisor/wasmtime p50: {:.2}x (goal <= 1.2x)", ours_p50 / theirs_p50);
    }

    // In-process phases, warm cache, beside wasmtime's own (the same phases, timed by a small
    // embedding of the same wasmtime release: tools/wasmtime-phases), interleaved.
    let artifact = aot::compile_cached(path, &std::fs::read(path).unwrap(), cache, flags).expect("compile");
    println!(
        "(e) {name}: artifact {:.1} MB here, {:.1} MB from `wasmtime compile`",
        file_mb(&artifact.path),
        file_mb(&cwasm)
    );
    let config = VmConfig {
        memory_mib: 128,
        args: vec![name.clone()],
        component: Some(artifact.path),
        report_guest_phases: true,
        count_resident_pages: true,
        kvm_exit_stats: true,
        ..VmConfig::default()
    };
    let boot = || {
        let console = SharedBuffer::default();
        let io = GuestIo::captured(Box::new(console.clone()), Box::new(std::io::sink()), Box::new(std::io::sink()));
        let report = vm::boot(&config, io).unwrap_or_else(|e| panic!("run {name}: {e}"));
        assert_eq!(report.exit_code, 0, "{name} failed");
        (report, guest_phases(&console.text()))
    };
    let peer = |tool: &Path| -> Vec<(String, f64)> {
        let out = Command::new(tool).arg(&cwasm).stdin(Stdio::null()).stdout(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "wasmtime-phases {}: {}", cwasm.display(), String::from_utf8_lossy(&out.stderr));
        phase_pairs(&String::from_utf8_lossy(&out.stderr), "wasmtime phases (us):")
    };
    for _ in 0..3 {
        boot();
    }
    let (mut phases, mut guest, mut exits, mut pages, mut peers) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let (report, g) = boot();
        phases.push(report.phases);
        exits.push(report.kvm_exits.map_or(0, |k| k.exits));
        pages.push(report.resident_pages);
        guest.push(g);
        if let Some(tool) = phases_tool {
            peers.push(peer(tool));
        }
    }
    println!("(e) {name}, in-process, warm artifact cache, N = {n}");
    header();
    let us = |f: fn(&Phases) -> Duration| phases.iter().map(|p| f(p).as_secs_f64() * 1e6).collect::<Vec<_>>();
    row(&format!("{short}/vm_create"), us(|p| p.vm_create));
    row(&format!("{short}/memory (vCPU thread, overlapped)"), us(|p| p.memory));
    row(&format!("{short}/artifact+image load"), us(|p| p.image_load));
    row(&format!("{short}/vcpu_setup"), us(|p| p.vcpu_setup));
    row(&format!("{short}/guest_run (guest phases below)"), us(|p| p.guest_run));
    let names = ["engine", "deserialize", "link", "instantiate", "run"];
    let mut ours_by_phase = Vec::new();
    for phase in names {
        ours_by_phase.push(row(&format!("{short}/guest/{phase}"), samples(&guest, phase)));
    }
    row(&format!("{short}/teardown"), us(|p| p.teardown));
    row(&format!("{short}/total (in-process, wall)"), us(|p| p.wall));
    if !peers.is_empty() {
        let mut total = vec![0.0; peers.len()];
        for (phase, ours) in names.iter().zip(&ours_by_phase) {
            let theirs = samples(&peers, phase);
            for (t, v) in total.iter_mut().zip(&theirs) {
                *t += v;
            }
            let theirs_p50 = row(&format!("{short}/wasmtime/{phase}"), theirs);
            println!("{:<46} {:>10.2}x", format!("  ratio {phase} wasmvisor/wasmtime p50"), ours / theirs_p50);
        }
        row(&format!("{short}/wasmtime/all five phases"), total);
    }
    let range = |v: &[u64]| (v.iter().min().copied().unwrap_or(0), v.iter().max().copied().unwrap_or(0));
    println!("per run: KVM exits {:?}, resident guest RAM pages {:?} (min, max)", range(&exits), range(&pages));

    // Whole process, interleaved.
    let env: [(&str, &Path); 1] = [("WASMVISOR_CACHE_DIR", cache)];
    for _ in 0..3 {
        time_cmd(exe, &["run", path_s], &env);
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..n {
        ours.push(time_cmd(exe, &["run", path_s], &env));
        if let Some(wt) = wasmtime {
            theirs.push(time_cmd(wt, &["run", "--allow-precompiled", cwasm.to_str().unwrap()], &[]));
        }
    }
    println!("(e) whole process, N = {n}, interleaved");
    header();
    let ours_p50 = row(&format!("cmd/wasmvisor run {name} (warm)"), ours);
    if wasmtime.is_some() {
        let theirs_p50 = row(&format!("cmd/wasmtime run --allow-precompiled {short}.cwasm"), theirs);
        println!("(e) {name} warm run ratio wasmvisor/wasmtime p50: {:.2}x (goal <= 1.5x)", ours_p50 / theirs_p50);
    }
}

fn file_mb(path: &Path) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / 1e6)
}
