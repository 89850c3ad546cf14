//! Boot benchmark: boot-to-exit of the wasmvisor guest, by phase, against the floor.
//!
//! `cargo bench --bench boot` runs 200 in-process boots interleaved with 200 floor runs
//! (create a VM + 16 MiB + vCPU, run a CPL 3 guest to its first exit, as HOST-KVM.md's probe
//! does, once asking KVM for the CPUID each time as the probe does and once with the
//! process's cached CPUID as `vm::boot` has it), then times the whole `wasmvisor boot`
//! command against process-start floors.
//! Set WASMVISOR_BENCH_N to change the count. Under `cargo test` it runs a 3-boot smoke pass.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmvisor::hypercall::GuestIo;
use wasmvisor::vm::{self, Phases, VmConfig};

mod common;

fn quiet() -> GuestIo {
    GuestIo::captured(Box::new(std::io::sink()), Box::new(std::io::sink()), Box::new(std::io::sink()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Stat {
    name: String,
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stat(name: &str, mut samples: Vec<Duration>) -> Stat {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    Stat { name: name.into(), p50: percentile(&samples, 0.5), p99: percentile(&samples, 0.99), mean }
}

fn print(stats: &[Stat]) {
    println!("{:<44} {:>10} {:>10} {:>10}", "", "p50 us", "p99 us", "mean us");
    for s in stats {
        println!("{:<44} {:>10.0} {:>10.0} {:>10.0}", s.name, us(s.p50), us(s.p99), us(s.mean));
    }
}

fn time_command(program: &str, args: &[&str], n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new(program).args(args).stdin(Stdio::null()).stderr(Stdio::null()).output();
            let took = t.elapsed();
            let out = out.unwrap_or_else(|e| panic!("run {program}: {e}"));
            assert!(out.status.success(), "{program} {args:?} failed: {:?}", out.status);
            took
        })
        .collect()
}

fn main() {
    let (_, n) = common::iterations(200, 3);
    if !std::path::Path::new("/dev/kvm").exists() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true but /dev/kvm is missing");
        eprintln!("SKIPPED boot benchmark: /dev/kvm is missing");
        return;
    }
    let config = VmConfig { count_resident_pages: true, ..VmConfig::default() };
    assert!(config.guest.is_file(), "build the guest first: scripts/build-guest.sh");

    // Warm up: first-use costs (CPUID cache, seccomp compile, page cache) are per process.
    for _ in 0..3 {
        vm::boot(&config, quiet()).expect("boot");
        wasmvisor::floor::floor_boot(&config.kvm_device, true).expect("floor");
    }

    let mut phases: Vec<Phases> = Vec::with_capacity(n);
    let mut floor = Vec::with_capacity(n);
    let mut floor_cached = Vec::with_capacity(n);
    let (mut exits, mut hypercalls, mut pages) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let report = vm::boot(&config, quiet()).expect("boot");
        assert_eq!(report.exit_code, 0);
        phases.push(report.phases);
        exits.push(report.exits.total);
        hypercalls.push(report.exits.hypercall);
        pages.push(report.resident_pages);
        floor.push(wasmvisor::floor::floor_boot(&config.kvm_device, true).expect("floor"));
        floor_cached.push(wasmvisor::floor::floor_boot(&config.kvm_device, false).expect("floor"));
    }

    println!(
        "wasmvisor boot benchmark | KVM: {} | {} CPUs | N = {n} boots interleaved with N floor runs",
        vm::kvm_flavor(),
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let pick = |f: fn(&Phases) -> Duration| phases.iter().map(f).collect::<Vec<_>>();
    let stats = [
        stat("boot/vm_create", pick(|p| p.vm_create)),
        stat("boot/memory", pick(|p| p.memory)),
        stat("boot/image_load", pick(|p| p.image_load)),
        stat("boot/vcpu_setup", pick(|p| p.vcpu_setup)),
        stat("boot/guest_run", pick(|p| p.guest_run)),
        stat("boot/teardown", pick(|p| p.teardown)),
        stat("boot/total (in-process, wall)", pick(Phases::total)),
        stat("floor (VM+16MiB+vCPU, CPL3 to 1st exit)", floor),
        stat("floor, CPUID from the process cache", floor_cached),
    ];
    print(&stats);
    let (total, floor, cached) = (&stats[6], &stats[7], &stats[8]);
    println!(
        "ratio boot/floor: p50 {:.2}x, p99 {:.2}x (goal: p50 <= 1.5x); against the cached-CPUID floor: p50 {:.2}x",
        us(total.p50) / us(floor.p50),
        us(total.p99) / us(floor.p99),
        us(total.p50) / us(cached.p50),
    );
    let range = |v: &[u64]| (v.iter().min().copied().unwrap_or(0), v.iter().max().copied().unwrap_or(0));
    println!(
        "per boot: exits {:?}, hypercalls {:?}, resident guest pages {:?} (min, max)",
        range(&exits),
        range(&hypercalls),
        range(&pages)
    );

    let exe = env!("CARGO_BIN_EXE_wasmvisor");
    let m = n.min(100);
    for _ in 0..3 {
        time_command(exe, &["boot"], 1);
    }
    let mut boot_cmd = Vec::new();
    let mut version_cmd = Vec::new();
    let mut true_cmd = Vec::new();
    for _ in 0..m {
        boot_cmd.extend(time_command(exe, &["boot"], 1));
        version_cmd.extend(time_command(exe, &["--version"], 1));
        true_cmd.extend(time_command("true", &[], 1));
    }
    println!("whole command, N = {m} runs each, interleaved (spawn to exit, stdout piped):");
    let cmd_stats = [
        stat("cmd/wasmvisor boot", boot_cmd),
        stat("cmd/wasmvisor --version (process start)", version_cmd),
        stat("cmd/true (spawn floor)", true_cmd),
    ];
    print(&cmd_stats);
    println!(
        "whole command p50 {:.2} ms (goal < 3 ms); minus process start: {:.2} ms",
        us(cmd_stats[0].p50) / 1e3,
        (us(cmd_stats[0].p50) - us(cmd_stats[1].p50)) / 1e3
    );
}
