//! Integration tests: boot real micro-VMs, through the `wasmvisor` binary (each run its own
//! process) and through the library where a test needs a knob the CLI does not have.
//!
//! Tests that need KVM skip loudly where `/dev/kvm` is absent, and fail when `CI=true`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use wasmvisor::console::SharedBuffer;
use wasmvisor::hypercall::GuestIo;
use wasmvisor::images::{self, TEST_GUEST};
use wasmvisor::vcpu::FailureReason;
use wasmvisor::vm::{self, EXIT_GUEST_CRASHED, EXIT_SETUP_FAILED, EXIT_TIMEOUT, VmConfig, VmError};

use common::{code, kvm_available, stderr, stdout};

mod common;

fn image(name: &str) -> PathBuf {
    let path = images::guest_image(name);
    assert!(path.is_file(), "guest image {} is missing: run scripts/build-guest.sh", path.display());
    path
}

fn wasmvisor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmvisor"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run wasmvisor")
}

/// `wasmvisor boot --guest test-guest -- ARGS`.
fn test_guest(args: &[&str]) -> Output {
    let guest = image(TEST_GUEST);
    let mut all = vec!["boot", "--guest", guest.to_str().unwrap(), "--"];
    all.extend_from_slice(args);
    wasmvisor(&all, &[])
}

#[test]
fn boots_and_greets_with_what_it_read_from_boot_info() {
    if !kvm_available("boots_and_greets") {
        return;
    }
    let guest = image(images::GUEST);
    let out = wasmvisor(
        &[
            "boot",
            "--guest",
            guest.to_str().unwrap(),
            "--memory",
            "128",
            "--env",
            "A=1",
            "--env",
            "B=2",
            "--",
            "hello",
            "wörld",
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let tsc_khz: u64 = text
        .split("TSC ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no TSC frequency in {text:?}"));
    assert!(tsc_khz > 100_000, "TSC {tsc_khz} kHz");
    assert_eq!(
        text,
        format!("wasmvisor guest: 128 MiB RAM, TSC {tsc_khz} kHz, 2 env vars, args [\"hello\", \"wörld\"]\n")
    );
}

#[test]
fn the_default_guest_is_found_without_flags() {
    if !kvm_available("the_default_guest_is_found_without_flags") {
        return;
    }
    image(images::GUEST);
    let out = wasmvisor(&["boot"], &[]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(stdout(&out).starts_with("wasmvisor guest: 64 MiB RAM"), "{}", stdout(&out));
}

#[test]
fn verbose_reports_kvm_flavor_phases_and_exits() {
    if !kvm_available("verbose_reports") {
        return;
    }
    let guest = image(images::GUEST);
    let out = wasmvisor(&["boot", "-v", "--guest", guest.to_str().unwrap()], &[]);
    assert_eq!(code(&out), 0);
    let err = stderr(&out);
    assert!(err.contains("kvm_"), "{err}");
    assert!(err.contains("vm_create") && err.contains("guest_run") && err.contains("resident pages"), "{err}");
    // Greeting plus exit: two hypercalls.
    assert!(err.contains("(2 hypercalls)"), "{err}");
}

#[test]
fn env_reaches_the_guest() {
    if !kvm_available("env_reaches_the_guest") {
        return;
    }
    let guest = image(TEST_GUEST);
    let out =
        wasmvisor(&["boot", "--guest", guest.to_str().unwrap(), "--env", "K=v=w", "--env", "EMPTY=", "--", "env"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "K=v=w\nEMPTY=\n");
}

#[test]
fn exit_codes_pass_through() {
    if !kvm_available("exit_codes_pass_through") {
        return;
    }
    for n in ["0", "7", "255"] {
        let out = test_guest(&["exit", n]);
        assert_eq!(code(&out).to_string(), n, "{}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    }
}

#[test]
fn a_panic_is_reported_and_exits_101() {
    if !kvm_available("a_panic_is_reported") {
        return;
    }
    let out = test_guest(&["panic"]);
    assert_eq!(code(&out), 101);
    assert!(stdout(&out).contains("guest panicked: panicked at src/bin/test-guest.rs"), "{}", stdout(&out));
    assert!(stdout(&out).contains("the test guest panics on request"));
}

#[test]
fn cpu_exceptions_are_reported_with_vector_rip_error_code_and_cr2() {
    if !kvm_available("cpu_exceptions_are_reported") {
        return;
    }
    for (kind, expect) in [
        ("ud", "CPU exception #UD (invalid opcode, vector 6), error code 0x0; RIP 0x"),
        ("de", "CPU exception #DE (divide error, vector 0), error code 0x0; RIP 0x"),
        ("gp", "CPU exception #GP (general protection fault, vector 13), error code 0x0; RIP 0x"),
        ("bp", "CPU exception #BP (breakpoint, vector 3), error code 0x0; RIP 0x"),
        // Read, user mode, not present: error code 4.
        ("pf", "CPU exception #PF (page fault, vector 14), error code 0x4, CR2 0x555500000000; RIP 0x"),
    ] {
        let out = test_guest(&["fault", kind]);
        assert_eq!(code(&out), i32::from(EXIT_GUEST_CRASHED), "{kind}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with(&format!("wasmvisor: error: guest failed: {expect}")), "{kind}: {err}");
        assert!(err.contains(" in test_guest::"), "the RIP is named: {err}");
    }
}

#[test]
fn stack_overflow_hits_the_guard_page() {
    if !kvm_available("stack_overflow_hits_the_guard_page") {
        return;
    }
    let out = test_guest(&["stack-overflow"]);
    assert_eq!(code(&out), i32::from(EXIT_GUEST_CRASHED));
    let err = stderr(&out);
    assert!(err.contains("#PF (page fault, vector 14), error code 0x6, CR2 0xff"), "{err}");
    assert!(err.contains("in test_guest::recurse"), "{err}");
}

#[test]
fn a_failure_report_shows_the_last_console_lines() {
    if !kvm_available("a_failure_report_shows_the_last_console_lines") {
        return;
    }
    let out = test_guest(&["print-then-fault", "14"]);
    assert_eq!(code(&out), i32::from(EXIT_GUEST_CRASHED));
    let err = stderr(&out);
    let tail: Vec<&str> = err.lines().filter_map(|l| l.strip_prefix("  | ")).collect();
    let want: Vec<String> = (4..14).map(|i| format!("line {i}")).collect();
    assert_eq!(tail, want, "{err}");
    assert_eq!(stdout(&out).lines().count(), 14);
}

#[test]
fn a_triple_fault_is_reported_as_shutdown() {
    if !kvm_available("a_triple_fault_is_reported_as_shutdown") {
        return;
    }
    // Without the IDT, the guest's #UD cannot be delivered: #UD -> #GP -> #DF -> shutdown.
    let console = SharedBuffer::default();
    let config = VmConfig {
        guest: image(TEST_GUEST),
        args: vec!["print-then-fault".into(), "1".into()],
        exception_handlers: false,
        ..VmConfig::default()
    };
    let err = vm::boot(
        &config,
        GuestIo::captured(Box::new(console.clone()), Box::new(std::io::sink()), Box::new(std::io::sink())),
    )
    .unwrap_err();
    let VmError::Guest(failure) = &err else { panic!("not a guest failure: {err}") };
    assert_eq!(failure.reason, FailureReason::TripleFault);
    assert!(failure.rip.is_some());
    let text = err.to_string();
    assert!(text.starts_with("guest failed: triple fault (KVM_EXIT_SHUTDOWN)"), "{text}");
    assert!(text.contains("  | line 0"), "{text}");
    assert_eq!(err.exit_code(), EXIT_GUEST_CRASHED);
    assert_eq!(console.text(), "line 0\n");
}

#[test]
fn a_spinning_guest_times_out() {
    if !kvm_available("a_spinning_guest_times_out") {
        return;
    }
    let guest = image(TEST_GUEST);
    let t = Instant::now();
    let out = wasmvisor(&["boot", "--timeout", "0.3", "--guest", guest.to_str().unwrap(), "--", "spin"], &[]);
    let took = t.elapsed();
    assert_eq!(code(&out), i32::from(EXIT_TIMEOUT), "{}", stderr(&out));
    assert!(stderr(&out).contains("guest failed: timed out after 0.3"), "{}", stderr(&out));
    assert!(stderr(&out).contains("in test_guest::main"), "the RIP is in the spin loop: {}", stderr(&out));
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_waiting_guest_sleeps_and_a_long_wait_times_out() {
    if !kvm_available("a_waiting_guest_sleeps") {
        return;
    }
    let t = Instant::now();
    let out = test_guest(&["wait", "150"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "waited\n");
    assert!(t.elapsed() >= Duration::from_millis(150));

    let guest = image(TEST_GUEST);
    let t = Instant::now();
    let out = wasmvisor(&["boot", "--timeout", "0.2", "--guest", guest.to_str().unwrap(), "--", "wait", "60000"], &[]);
    assert_eq!(code(&out), i32::from(EXIT_TIMEOUT), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_request_block_outside_guest_memory_is_refused() {
    if !kvm_available("a_request_block_outside_guest_memory_is_refused") {
        return;
    }
    let out = test_guest(&["bad-block"]);
    assert_eq!(code(&out), i32::from(EXIT_GUEST_CRASHED), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("guest failed: sent a hypercall block at GPA 0x4001000 that lies outside guest memory"),
        "{err}"
    );
    assert!(!stdout(&out).contains("resumed"), "the guest must not be resumed");
}

#[test]
fn buffers_outside_guest_memory_and_unknown_ops_get_errors() {
    if !kvm_available("buffers_outside_guest_memory") {
        return;
    }
    let out = test_guest(&["bad-buffer"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).matches("Err(BadAddress)").count(), 2, "{}", stdout(&out));
    let out = test_guest(&["bad-op"]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_eq!(stdout(&out), "unknown op -> Some(UnknownOp)\n");
}

#[test]
fn mmio_to_no_device_stops_the_guest() {
    if !kvm_available("mmio_to_no_device_stops_the_guest") {
        return;
    }
    let out = test_guest(&["mmio"]);
    assert_eq!(code(&out), i32::from(EXIT_GUEST_CRASHED));
    assert!(stderr(&out).contains("MMIO write to 0xc0000000, which no device serves"), "{}", stderr(&out));
}

#[test]
fn the_uart_is_a_debug_console() {
    if !kvm_available("the_uart_is_a_debug_console") {
        return;
    }
    let out = test_guest(&["uart", "hello from COM1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from COM1\n");
}

#[test]
fn much_console_output_arrives_whole() {
    if !kvm_available("much_console_output_arrives_whole") {
        return;
    }
    let out = test_guest(&["print-many", "3000"]);
    assert_eq!(code(&out), 0);
    let lines: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(lines.len(), 3000);
    assert!(lines.iter().enumerate().all(|(i, l)| *l == format!("line {i}")));
}

#[test]
fn vms_booted_at_once_stay_apart() {
    if !kvm_available("vms_booted_at_once_stay_apart") {
        return;
    }
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let console = SharedBuffer::default();
                let config = VmConfig {
                    guest: image(TEST_GUEST),
                    args: vec!["print-many".into(), (10 + i).to_string()],
                    ..VmConfig::default()
                };
                let report = vm::boot(
                    &config,
                    GuestIo::captured(Box::new(console.clone()), Box::new(std::io::sink()), Box::new(std::io::sink())),
                )
                .unwrap();
                (report.exit_code, console.text().lines().count())
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), (0, 10 + i));
    }
}

#[test]
fn bad_images_fail_before_any_vm_is_created() {
    // The KVM device points nowhere: an error about it would mean a VM was being created.
    let no_kvm = [("WASMVISOR_KVM_DEVICE", "/nonexistent/kvm")];
    let dir = std::env::temp_dir().join(format!("wasmvisor-bad-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let mut arm = std::fs::read(image(TEST_GUEST)).unwrap();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let arm_path = dir.join("arm.elf");
    std::fs::write(&arm_path, arm).unwrap();

    let test_guest = image(TEST_GUEST);
    let cases: [(&[&str], &str); 5] = [
        (&["--guest", script.to_str().unwrap()], "is not an x86-64 ELF executable: no ELF magic number"),
        (&["--guest", arm_path.to_str().unwrap()], "is not an x86-64 ELF executable: machine type 183"),
        (&["--guest", "/nonexistent/guest"], "cannot read guest image /nonexistent/guest: No such file"),
        (&["--guest", test_guest.to_str().unwrap(), "--memory", "2"], "does not fit in 2 MiB"),
        (&["--memory", "3"], "must be a multiple of 2 MiB"),
    ];
    for (args, expect) in cases {
        let mut all = vec!["boot"];
        all.extend_from_slice(args);
        let out = wasmvisor(&all, &no_kvm);
        assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("KVM"), "{args:?}: no VM may be created: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_or_bogus_kvm_device_says_what_to_do() {
    let guest = image(images::GUEST);
    let out = wasmvisor(&["boot", "--guest", guest.to_str().unwrap()], &[("WASMVISOR_KVM_DEVICE", "/nonexistent/kvm")]);
    assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED));
    let err = stderr(&out);
    assert!(err.contains("/nonexistent/kvm does not exist: this host has no KVM"), "{err}");
    assert!(err.contains("modprobe"), "{err}");
    assert_eq!(err.lines().count(), 1, "one message: {err}");

    let out = wasmvisor(&["boot", "--guest", guest.to_str().unwrap()], &[("WASMVISOR_KVM_DEVICE", "/dev/null")]);
    assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED));
    assert!(stderr(&out).contains("cannot use /dev/null as the KVM device: not a KVM device"), "{}", stderr(&out));
}

#[test]
fn bad_arguments_are_refused_clearly() {
    for (args, expect) in [
        (&["boot", "--timeout", "0"][..], "not a positive number of seconds"),
        (&["boot", "--timeout=-1"][..], "not a positive number of seconds"),
        (&["boot", "--timeout", "nan"][..], "not a positive number of seconds"),
        (&["boot", "--memory", "lots"][..], "invalid value 'lots' for '--memory <MiB>'"),
        (&["boot", "--bogus"][..], "unexpected argument '--bogus'"),
        (&["frobnicate"][..], "unrecognized subcommand 'frobnicate'"),
        (&["launch"][..], "the following required arguments were not provided"),
        (&["launch", "--restart"][..], "a value is required for '--restart <POLICY>'"),
        (&["rm"][..], "the following required arguments were not provided"),
        (&["logs", "a/b"][..], "invalid tenant name"),
        (&["serve", "--api-listen", "localhost"][..], "invalid value 'localhost' for '--api-listen <ADDR>'"),
    ] {
        let out = wasmvisor(args, &[]);
        assert_eq!(code(&out), 2, "{args:?}");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    let out = wasmvisor(&["boot", "--env", "NOEQUALS"], &[("WASMVISOR_KVM_DEVICE", "/nonexistent/kvm")]);
    assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED));
    assert!(
        stderr(&out).contains("environment variable \"NOEQUALS\" is not of the form KEY=VALUE"),
        "{}",
        stderr(&out)
    );
    let big = "x".repeat(70_000);
    let out = wasmvisor(&["boot", "--", &big], &[("WASMVISOR_KVM_DEVICE", "/nonexistent/kvm")]);
    assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED));
    assert!(stderr(&out).contains("arguments and environment take 70001 bytes; at most 61440 fit"), "{}", stderr(&out));
}
