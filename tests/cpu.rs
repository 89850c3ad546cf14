//! Integration tests for the guest's CPU features: what the guest detects on this host is what
//! the host compiles for, and a setting the guest refuses anyway is dropped, not fatal.
//!
//! These hold on any x86-64 KVM host: nothing here assumes the host process's CPUID is the
//! guest's. Tests that need KVM skip loudly where `/dev/kvm` is absent, and fail when `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;

use wasmvisor::console::SharedBuffer;
use wasmvisor::guest_cpu::{self, GuestCpu};
use wasmvisor::hypercall::GuestIo;
use wasmvisor::launch::{self, Component, Event};
use wasmvisor::vm::{self, EXIT_SETUP_FAILED, VmConfig};
use wasmvisor::wasm::{aot, inspect};
use wasmvisor_abi::cpu::{Feature, FeatureSet, detect};
use wasmvisor_engine::ISA_FEATURES;

use common::{TempDir, code, kvm_available, stderr, stdout};

mod common;

fn hello() -> PathBuf {
    let path = wasmvisor::images::component("hello");
    assert!(path.is_file(), "component {} is missing: run scripts/build-images.sh", path.display());
    path
}

/// The Cranelift flags of `ISA_FEATURES` whose feature is in `set`, computed here on its own.
fn flags_for(set: FeatureSet) -> Vec<&'static str> {
    ISA_FEATURES.iter().filter(|(_, f)| set.contains(Feature::from_name(f).unwrap())).map(|(flag, _)| *flag).collect()
}

/// The `.cwasm` files in `dir`.
fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    v.sort();
    v
}

#[test]
fn the_host_compiles_for_exactly_what_the_guest_detects() {
    if !kvm_available("the_host_compiles_for_exactly_what_the_guest_detects") {
        return;
    }
    // What the guest says, from a fresh feature-report boot.
    let report = guest_cpu::probe(&VmConfig::default()).expect("feature-report boot");
    // The detection the host can run over the guest's table is the guest's own answer.
    assert_eq!(detect(&report.table), report.detected, "host and guest run the same detection");
    assert_ne!(report.detected, FeatureSet::EMPTY, "every x86-64 KVM guest has at least CMPXCHG16B or SSE3");

    // `wasmvisor run` compiles hello.wasm with exactly those features' flags: the artifact's
    // cache key names them.
    let cache = TempDir::new("cpu-agree");
    let out = Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
        .args(["run", "-v", hello().to_str().unwrap()])
        .env("WASMVISOR_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "Hello, world!\n"), "{}", stderr(&out));
    assert!(stderr(&out).contains("(asked the guest in"), "the first run probes: {}", stderr(&out));
    let expected = flags_for(report.detected);
    let bytes = std::fs::read(hello()).unwrap();
    let want = cache.path().join(aot::cache_key(&bytes, &expected));
    assert_eq!(artifacts(cache.path()), [want], "compiled with {expected:?}");
    assert!(!stderr(&out).contains("again without"), "nothing was refused: {}", stderr(&out));

    // The second run takes the report from the cache: no second probe.
    let out = Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
        .args(["run", "-v", hello().to_str().unwrap()])
        .env("WASMVISOR_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("(cached report in"), "{}", stderr(&out));
    assert!(stderr(&out).contains("cached artifact"), "{}", stderr(&out));

    // `wasmvisor cpu` shows the same set, leaf by leaf.
    let out = Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
        .arg("cpu")
        .env("WASMVISOR_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    println!("{text}");
    assert!(text.contains(&format!("compile flags:  {}", expected.join(" "))), "{text}");
}

#[test]
fn a_masked_feature_is_refused_by_the_guest_and_never_compiled_for() {
    if !kvm_available("a_masked_feature_is_refused_by_the_guest_and_never_compiled_for") {
        return;
    }
    let full = guest_cpu::probe(&VmConfig::default()).expect("feature-report boot");
    let flags = flags_for(full.detected);
    let (flag, feature) = *ISA_FEATURES.iter().find(|(f, _)| flags.contains(f)).expect("the guest has an ISA feature");
    let masked = FeatureSet::EMPTY.with(Feature::from_name(feature).unwrap());
    let config = VmConfig { cpu_features_masked: masked, ..VmConfig::default() };

    // The masked guest reports the feature absent ...
    let report = guest_cpu::probe(&config).expect("feature-report boot");
    assert_eq!(report.detected, full.detected.without(masked));

    // ... and its wasmtime refuses an artifact compiled for it, naming the setting.
    let engine = aot::engine(&flags).unwrap();
    let artifact = engine.precompile_component(&std::fs::read(hello()).unwrap()).unwrap();
    let dir = TempDir::new("cpu-masked");
    let path = dir.path().join("hello.cwasm");
    std::fs::write(&path, artifact).unwrap();
    let io = GuestIo::captured(Box::new(std::io::sink()), Box::new(std::io::sink()), Box::new(std::io::sink()));
    let run = VmConfig { memory_mib: 128, args: vec!["hello.wasm".into()], component: Some(path), ..config };
    let err = vm::boot(&run, io).unwrap_err();
    assert_eq!(err.exit_code(), EXIT_SETUP_FAILED);
    let text = err.to_string();
    assert!(text.starts_with("guest failed: rejected the component artifact: compilation settings"), "{text}");
    assert!(text.contains(&format!("\"{flag}\" is enabled, but not available")), "names the setting: {text}");
}

#[test]
fn a_setting_the_guest_refuses_is_dropped_and_the_run_goes_on() {
    if !kvm_available("a_setting_the_guest_refuses_is_dropped_and_the_run_goes_on") {
        return;
    }
    // A guest that lacks a feature (masked) and a cached report that wrongly claims it, as a
    // stale or mistaken report would.
    let cache = TempDir::new("cpu-fallback");
    let full = guest_cpu::probe(&VmConfig::default()).expect("feature-report boot");
    let (flag, feature) =
        *ISA_FEATURES.iter().find(|(_, f)| full.detected.contains(Feature::from_name(f).unwrap())).expect("a feature");
    let config = VmConfig {
        memory_mib: 128,
        args: vec!["hello.wasm".into()],
        cpu_features_masked: FeatureSet::EMPTY.with(Feature::from_name(feature).unwrap()),
        ..VmConfig::default()
    };
    let honest = GuestCpu::for_vm(cache.path(), &config).unwrap();
    assert!(!honest.isa_flags().contains(&flag));
    let text = std::fs::read_to_string(&honest.path).unwrap();
    let detected = text.lines().find(|l| l.starts_with("detected")).unwrap();
    std::fs::write(&honest.path, text.replace(detected, &format!("{detected} {feature}"))).unwrap();
    let poisoned = GuestCpu::for_vm(cache.path(), &config).unwrap();
    assert!(poisoned.isa_flags().contains(&flag), "the planted report is used");
    assert!(!poisoned.probed);

    let granted = Default::default();
    let grants = inspect::Grants { tenant: "default", granted: &granted };
    let component = Component::open(&hello(), &grants, cache.path()).unwrap();
    let launch = |events: &mut Vec<String>| {
        let stdout = SharedBuffer::default();
        let out = stdout.clone();
        let io = move || GuestIo::captured(Box::new(std::io::sink()), Box::new(out.clone()), Box::new(std::io::sink()));
        let report = launch::run(&component, cache.path(), config.clone(), None, io, |e| match e {
            Event::Recompiling { refused_setting, reason } => {
                events.push(format!("recompile {refused_setting:?} {reason}"))
            }
            Event::Compiling { .. } => events.push("compiling".to_string()),
            Event::Artifact { artifact, .. } => events.push(format!("artifact hit={}", artifact.cache_hit)),
            Event::GuestCpu(_) => {}
            Event::SnapshotDiscarded { why } => events.push(format!("snapshot discarded: {why}")),
        })
        .expect("the run goes on without the setting");
        assert_eq!((report.exit_code, stdout.text().as_str()), (0, "Hello, world!\n"));
    };
    let mut events = Vec::new();
    launch(&mut events);
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(events[..2], ["compiling", "artifact hit=false"]);
    assert!(
        events[2].starts_with(&format!("recompile Some(\"{flag}\") rejected the component artifact")),
        "{events:?}"
    );
    assert_eq!(events[3..], ["compiling", "artifact hit=false"]);

    // The refused artifact is gone; the one in the cache is compiled without the setting.
    let without: Vec<&str> = poisoned.isa_flags().into_iter().filter(|f| *f != flag).collect();
    let want = cache.path().join(aot::key_for(&component.digest, &without));
    assert_eq!(artifacts(cache.path()), [want]);
    // The refusal is recorded for this host: the next run goes straight to the good artifact.
    let after = GuestCpu::for_vm(cache.path(), &config).unwrap();
    assert!(after.refused.contains(flag) && !after.isa_flags().contains(&flag), "{:?}", after.refused);
    let mut events = Vec::new();
    launch(&mut events);
    assert_eq!(events, ["artifact hit=true"]);
}

#[test]
fn bad_vm_arguments_are_refused_before_the_feature_report_boot() {
    // No KVM and an empty cache: a probe would fail on the device, not on the argument.
    let cache = TempDir::new("cpu-badargs");
    let hello = hello();
    for (args, expect) in [
        (&["--memory", "3"][..], "must be a multiple of 2 MiB"),
        (&["--env", "NOEQUALS"][..], "is not of the form KEY=VALUE"),
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.push(hello.to_str().unwrap());
        let out = Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
            .args(&all)
            .env("WASMVISOR_CACHE_DIR", cache.path())
            .env("WASMVISOR_KVM_DEVICE", "/nonexistent/kvm")
            .output()
            .unwrap();
        assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("KVM") && !stderr(&out).contains("CPU"), "{args:?}: {}", stderr(&out));
    }
    assert!(std::fs::read_dir(cache.path()).unwrap().next().is_none(), "nothing was cached");
}
