//! Integration tests for the VMM child mode: one VM per process, configured over its socket,
//! reporting back; a crash or a dead parent takes down only that child.
//!
//! Tests that need KVM skip loudly where `/dev/kvm` is absent, and fail when `CI=true`.

use std::path::Path;
use std::time::{Duration, Instant};

use wasmvisor::child::{ChildEvent, Stream, VmmChild};
use wasmvisor::guest_cpu::GuestCpu;
use wasmvisor::images;
use wasmvisor::jail::{JailDirs, RunAs};
use wasmvisor::vm::{EXIT_GUEST_CRASHED, VmConfig};
use wasmvisor::wasm::aot;

use common::{TempDir, kvm_available};

mod common;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wasmvisor"))
}

fn test_guest_config(args: &[&str], timeout: Duration) -> VmConfig {
    VmConfig {
        guest: images::guest_image(images::TEST_GUEST),
        args: args.iter().map(|s| s.to_string()).collect(),
        timeout,
        ..VmConfig::default()
    }
}

/// Every event of `child` until it closes its socket.
fn events(child: &mut VmmChild) -> Vec<ChildEvent> {
    let mut all = Vec::new();
    while let Some(e) = child.next_event().expect("well-formed events") {
        all.push(e);
    }
    all
}

fn output(events: &[ChildEvent], which: Stream) -> String {
    let bytes: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            ChildEvent::Output { stream, bytes } if *stream == which => Some(bytes.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `component` compiled for this host's guest into `cache`: the artifact's path.
fn artifact(component: &str, cache: &Path) -> std::path::PathBuf {
    let wasm = images::component(component);
    let flags = GuestCpu::for_vm(cache, &VmConfig::default()).unwrap().isa_flags();
    aot::compile_cached(&wasm, &std::fs::read(&wasm).unwrap(), cache, &flags).unwrap().path
}

fn alive(pid: u32) -> bool {
    // Not a zombie either: /proc/PID/stat's state is not 'Z'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn a_vmm_child_runs_a_component_and_reports_output_and_exit() {
    if !kvm_available("a_vmm_child_runs_a_component_and_reports_output_and_exit") {
        return;
    }
    let cache = TempDir::new("child-hello");
    let config = VmConfig {
        memory_mib: 128,
        args: vec!["hello.wasm".into()],
        component: Some(artifact("hello", cache.path())),
        ..VmConfig::default()
    };
    let mut child = VmmChild::spawn(exe(), &config).unwrap();
    let pid = child.pid();
    let all = events(&mut child);
    assert_eq!(all.first(), Some(&ChildEvent::Started { pid, pre_booted: false, restored: false }), "{all:?}");
    assert_eq!(output(&all, Stream::Stdout), "Hello, world!\n", "{all:?}");
    // The end is told before the teardown, then the report.
    assert_eq!(all.get(all.len() - 2), Some(&ChildEvent::GuestExited { code: 0, out_of_memory: None }), "{all:?}");
    match all.last() {
        Some(ChildEvent::Exited { code: 0, phases, exits }) => {
            assert!(phases.wall > Duration::ZERO && exits.hypercall >= 2, "{phases:?} {exits:?}");
        }
        other => panic!("expected a clean exit, got {other:?}"),
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn a_crashing_guest_takes_down_only_its_own_child() {
    if !kvm_available("a_crashing_guest_takes_down_only_its_own_child") {
        return;
    }
    let mut healthy = VmmChild::spawn(exe(), &test_guest_config(&["wait", "300"], Duration::from_secs(20))).unwrap();
    let mut crashing = VmmChild::spawn(exe(), &test_guest_config(&["fault", "ud"], Duration::from_secs(20))).unwrap();
    let crashed = events(&mut crashing);
    match crashed.last() {
        Some(ChildEvent::Failed { exit_code, message }) => {
            assert_eq!(*exit_code, EXIT_GUEST_CRASHED);
            assert!(message.contains("CPU exception #UD"), "{message}");
        }
        other => panic!("expected a failure report, got {other:?}"),
    }
    assert_eq!(crashing.wait().unwrap().code(), Some(i32::from(EXIT_GUEST_CRASHED)));
    assert!(alive(healthy.pid()), "the neighbour still runs");
    let fine = events(&mut healthy);
    assert!(matches!(fine.last(), Some(ChildEvent::Exited { code: 0, .. })), "{fine:?}");
}

#[test]
fn a_child_sent_garbage_refuses_it_clearly() {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;

    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fresh descriptors into the array.
    assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
    // SAFETY: both were just created and belong to nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let theirs_fd = fds[1];
    let mut cmd = std::process::Command::new(exe());
    cmd.arg(wasmvisor::child::CHILD_SUBCOMMAND);
    // SAFETY: dup2 is async-signal-safe and touches no parent memory.
    unsafe {
        cmd.pre_exec(move || if libc::dup2(theirs_fd, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut process = cmd.spawn().unwrap();
    drop(theirs);
    let mut socket = UnixStream::from(ours);
    socket.write_all(&[0xff; 40]).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = socket.read(&mut buf).unwrap();
    let event: ChildEvent = postcard::from_bytes(&buf[..n]).unwrap();
    match event {
        ChildEvent::Failed { exit_code: 125, message } => {
            assert!(message.starts_with("malformed VM config from the parent"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(process.wait().unwrap().code(), Some(125));
}

/// Set in the helper process of `a_child_dies_with_its_parent`.
const HELPER_ENV: &str = "WASMVISOR_TEST_CHILD_PARENT";

#[test]
fn helper_parent_of_a_spinning_child() {
    // Only does something when the next test runs this binary as the parent to kill.
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let child = VmmChild::spawn(exe(), &test_guest_config(&["spin"], Duration::from_secs(60))).unwrap();
    println!("child pid {}", child.pid());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_child_dies_with_its_parent() {
    if !kvm_available("a_child_dies_with_its_parent") {
        return;
    }
    let me = std::env::current_exe().unwrap();
    let mut parent = std::process::Command::new(me)
        .args(["--exact", "helper_parent_of_a_spinning_child", "--nocapture", "--test-threads", "1"])
        .env(HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = std::io::BufReader::new(parent.stdout.take().unwrap());
    let pid: u32 = loop {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "the helper printed no child pid");
        // The harness prints "test NAME ... " before it on the same line.
        if let Some((_, p)) = line.trim().split_once("child pid ") {
            break p.parse().unwrap();
        }
    };
    assert!(alive(pid));
    parent.kill().unwrap();
    parent.wait().unwrap();
    let give_up = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < give_up, "VMM child {pid} outlived its parent");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_childs_capabilities_are_relayed_to_its_supervisors_broker() {
    use std::sync::{Arc, Mutex};

    use wasmvisor::vm::{Capabilities, VsockConfig};
    use wasmvisor_providers::{Broker, Capability, TenantSpec};

    if !kvm_available("a_childs_capabilities_are_relayed_to_its_supervisors_broker") {
        return;
    }
    // The supervisor (this process) owns the tenant's store; the children only relay to it.
    let dir = TempDir::new("child-relay");
    let data = dir.path().join("data");
    let spec = TenantSpec {
        name: "relayed".parse().unwrap(),
        grants: [Capability::KeyValue].into_iter().collect(),
        config: Default::default(),
        data_dir: data.clone(),
        echo_log: false,
        http_allow: Vec::new(),
        kv_quota: None,
        dirs: Vec::new(),
    };
    let broker = Arc::new(Mutex::new(Broker::open(spec).unwrap()));
    let sock = dir.path().join("broker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || wasmvisor_providers::serve_listener(broker, listener));

    let config = VmConfig {
        memory_mib: 128,
        args: vec!["kv-counter.wasm".into()],
        component: Some(artifact("kv-counter", &dir.path().join("cache"))),
        vsock: Some(VsockConfig {
            capabilities: Capabilities::Relay(sock.clone()),
            uds_path: None,
            relay_preopens: false,
        }),
        ..VmConfig::default()
    };
    // Two VMs of the tenant at once share its counter; a third after them sees both.
    let mut a = VmmChild::spawn(exe(), &config).unwrap();
    let mut b = VmmChild::spawn(exe(), &config).unwrap();
    let (ea, eb) = (events(&mut a), events(&mut b));
    let mut seen = vec![output(&ea, Stream::Stdout), output(&eb, Stream::Stdout)];
    seen.sort();
    assert_eq!(seen, ["counter = 1\n", "counter = 2\n"], "{ea:?} {eb:?}");
    // A third in a pre-booted VM, whose guest brought its device up before the launch gave the
    // device its broker.
    let mut c = VmmChild::spawn_idle(exe()).unwrap();
    c.pre_boot(&VmConfig { args: Vec::new(), component: None, vsock: None, ..config.clone() }).unwrap();
    c.configure(&config).unwrap();
    let third = events(&mut c);
    assert!(matches!(third.first(), Some(ChildEvent::Started { pre_booted: true, .. })), "{third:?}");
    assert_eq!(output(&third, Stream::Stdout), "counter = 3\n", "{third:?}");
    assert!(data.join("tenants/relayed/keyvalue.redb").is_file(), "the store is the supervisor's");

    // No broker behind the socket: the launch fails, naming it.
    let gone = VmConfig {
        vsock: Some(VsockConfig {
            capabilities: Capabilities::Relay(dir.path().join("nobody.sock")),
            uds_path: None,
            relay_preopens: false,
        }),
        ..config
    };
    let mut d = VmmChild::spawn(exe(), &gone).unwrap();
    match events(&mut d).last() {
        Some(ChildEvent::Failed { exit_code: 125, message }) => {
            assert!(message.contains("cannot reach the capability broker at"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// The `Name:\tvalue` line of `/proc/PID/status`.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or_default().trim().to_owned()
}

/// For a test of jailed children: a fresh jail's directories (in the returned temporary
/// directory), or `None` where KVM or root is missing (a failure when `CI=true`).
fn jail_dirs(test: &str) -> Option<(TempDir, JailDirs)> {
    if !kvm_available(test) {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true but the tests do not run as root");
        eprintln!("SKIPPED {test}: not root");
        return None;
    }
    let dir = TempDir::new(test);
    let dirs = JailDirs { root: dir.path().join("root"), run: dir.path().join("run") };
    std::fs::create_dir(&dirs.root).unwrap();
    std::fs::create_dir(&dirs.run).unwrap();
    Some((dir, dirs))
}

#[test]
fn a_jailed_child_runs_in_its_own_namespaces_and_root_as_an_unprivileged_user() {
    let Some((_dir, dirs)) = jail_dirs("a_jailed_child_runs_in_its_own_namespaces_and_root_as_an_unprivileged_user")
    else {
        return;
    };
    std::fs::write(dirs.run.join("marker"), b"the run directory").unwrap();
    let run_as = RunAs { uid: 201_234, gid: 201_234 };
    let config = VmConfig { run_as: Some(run_as), ..test_guest_config(&["wait", "300"], Duration::from_secs(20)) };
    let mut child = VmmChild::spawn_in(exe(), &config, Some(&dirs)).unwrap();
    let pid = child.pid();
    // Started, then the guest waits: the VMM is up, its threads confined.
    assert!(matches!(child.next_event().unwrap(), Some(ChildEvent::Started { .. })));
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid));
    assert_eq!(status_field(pid, "Uid"), "201234\t201234\t201234\t201234");
    assert_eq!(status_field(pid, "Gid"), "201234\t201234\t201234\t201234");
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    // Its own PID (it is 1 there), mount, network, IPC and UTS namespaces.
    assert_eq!(status_field(pid, "NSpid").split_whitespace().last(), Some("1"));
    for ns in ["pid", "mnt", "net", "ipc", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace");
    }
    // Its root holds its run directory and nothing else of the host.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let entries: Vec<String> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, ["run"]);
    assert_eq!(std::fs::read(root.join("run/marker")).unwrap(), b"the run directory");
    // Only its own descriptors: stdio, its socket, KVM's and the VM's.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    // (/dev/null was opened before the root changed: the kernel names it from the new root.)
    let expected = |f: &String| {
        ["/null", "/dev/null", "/dev/kvm"].contains(&f.as_str())
            || f.starts_with("socket:")
            || f.starts_with("anon_inode:kvm-")
            || f.ends_with(images::TEST_GUEST)
    };
    assert!(fds.iter().all(expected), "{fds:?}");
    child.kill();
    assert!(!alive(pid));
    // The host saw no mount of the jail's.
    assert!(std::fs::read_dir(&dirs.root).unwrap().next().is_none());

    // Without an identity to take, a jailed child refuses to run.
    let mut child =
        VmmChild::spawn_in(exe(), &test_guest_config(&["wait", "1"], Duration::from_secs(20)), Some(&dirs)).unwrap();
    let all = events(&mut child);
    assert!(
        all.iter().any(|e| matches!(e, ChildEvent::Failed { message, .. } if message.contains("needs a uid and gid"))),
        "{all:?}"
    );
}

/// The `/proc/PID/task/*/status` field `name` of every thread of `pid`, by thread name.
fn thread_fields(pid: u32, name: &str) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
            let field =
                |n: &str| status.lines().find_map(|l| l.strip_prefix(&format!("{n}:")).map(|v| v.trim().to_string()));
            Some((field("Name")?, field(name)?))
        })
        .collect()
}

#[test]
fn a_pre_booted_child_launches_a_component_that_fits_and_boots_afresh_one_that_does_not() {
    if !kvm_available("a_pre_booted_child_launches_a_component_that_fits_and_boots_afresh_one_that_does_not") {
        return;
    }
    let cache = TempDir::new("child-preboot");
    let hello = artifact("hello", cache.path());
    let launch = |memory_mib| VmConfig {
        memory_mib,
        args: vec!["hello.wasm".into()],
        component: Some(hello.clone()),
        ..VmConfig::default()
    };
    let template = VmConfig { memory_mib: 128, timeout: Duration::from_secs(20), ..VmConfig::default() };
    for memory_mib in [128, 64] {
        let mut child = VmmChild::spawn_idle(exe()).unwrap();
        let phases = child.pre_boot(&template).unwrap();
        assert!(phases.guest_run > Duration::ZERO && phases.vm_create > Duration::ZERO, "{phases:?}");
        // The guest waits: the VM is up and nothing has run yet.
        std::thread::sleep(Duration::from_millis(50));
        assert!(alive(child.pid()));
        child.configure(&launch(memory_mib)).unwrap();
        let all = events(&mut child);
        let pid = child.pid();
        let pre_booted = memory_mib == 128;
        assert_eq!(all.first(), Some(&ChildEvent::Started { pid, pre_booted, restored: false }), "{all:?}");
        assert_eq!(output(&all, Stream::Stdout), "Hello, world!\n", "{memory_mib} MiB: {all:?}");
        match all.last() {
            // A launch into the pre-booted VM creates none: its phases are the launch's only.
            Some(ChildEvent::Exited { code: 0, phases, .. }) => {
                let fresh = phases.vm_create > Duration::ZERO;
                assert_eq!(fresh, memory_mib != 128, "{memory_mib} MiB: {phases:?}");
            }
            other => panic!("{memory_mib} MiB: expected a clean exit, got {other:?}"),
        }
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
    // A second pre-boot order is refused, and the child still launches.
    let mut child = VmmChild::spawn_idle(exe()).unwrap();
    child.pre_boot(&template).unwrap();
    let err = child.pre_boot(&template).unwrap_err();
    assert!(err.to_string().contains("pre-booted already"), "{err}");
    child.configure(&launch(128)).unwrap();
    assert_eq!(output(&events(&mut child), Stream::Stdout), "Hello, world!\n");
}

#[test]
fn a_guest_may_wait_for_its_launch_only_while_pre_booted() {
    if !kvm_available("a_guest_may_wait_for_its_launch_only_while_pre_booted") {
        return;
    }
    // Launched in a pre-booted VM (its one wait behind it), and booted afresh: refused both times.
    let config = test_guest_config(&["await-launch"], Duration::from_secs(20));
    for pre_boot in [true, false] {
        let mut child = VmmChild::spawn_idle(exe()).unwrap();
        if pre_boot {
            child.pre_boot(&config).unwrap();
        }
        child.configure(&config).unwrap();
        let all = events(&mut child);
        assert!(matches!(all.last(), Some(ChildEvent::Exited { code: 0, .. })), "pre-booted {pre_boot}: {all:?}");
        assert!(output(&all, Stream::Console).contains("BadArgument"), "{all:?}");
    }
    // A pre-boot that fails is reported, and the child still boots its launch afresh.
    let mut child = VmmChild::spawn_idle(exe()).unwrap();
    let bad = VmConfig { memory_mib: 1, ..config.clone() };
    let err = child.pre_boot(&bad).unwrap_err();
    assert!(err.to_string().contains("could not pre-boot"), "{err}");
    child.configure(&config).unwrap();
    assert!(matches!(events(&mut child).last(), Some(ChildEvent::Exited { code: 0, .. })));
}

#[test]
fn a_pre_booted_jailed_child_confines_every_thread_at_its_launch() {
    let Some((_dir, dirs)) = jail_dirs("a_pre_booted_jailed_child_confines_every_thread_at_its_launch") else {
        return;
    };
    let template = test_guest_config(&[], Duration::from_secs(20));
    let mut child = VmmChild::spawn_idle_in(exe(), Some(&dirs)).unwrap();
    let pid = child.pid();
    child.pre_boot(&template).unwrap();
    let run_as = RunAs { uid: 201_235, gid: 201_235 };
    let config = VmConfig { run_as: Some(run_as), ..test_guest_config(&["wait", "3000"], Duration::from_secs(20)) };
    child.configure(&config).unwrap();
    assert!(matches!(child.next_event().unwrap(), Some(ChildEvent::Started { .. })));
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid));
    // Every thread, the pre-booted vCPU's included, took the tenant's identity and is confined
    // (but KVM's own worker, `kvm-nx-lpage-recovery`: a kernel task that runs no user code).
    let threads = thread_fields(pid, "Uid");
    assert!(threads.iter().any(|(name, _)| name == "vcpu0"), "{threads:?}");
    for (field, want) in [
        ("Uid", "201235\t201235\t201235\t201235"),
        ("Gid", "201235\t201235\t201235\t201235"),
        ("CapPrm", "0000000000000000"),
        ("CapEff", "0000000000000000"),
        ("CapBnd", "0000000000000000"),
        ("NoNewPrivs", "1"),
        ("Seccomp", "2"),
    ] {
        for (name, value) in thread_fields(pid, field).into_iter().filter(|(n, _)| !n.starts_with("kvm-")) {
            assert_eq!(value, want, "{field} of thread {name}");
        }
    }
    let all = events(&mut child);
    assert_eq!(output(&all, Stream::Stdout), "", "{all:?}");
    assert!(output(&all, Stream::Console).contains("waited"), "{all:?}");
    assert!(matches!(all.last(), Some(ChildEvent::Exited { code: 0, .. })), "{all:?}");
}

/// A snapshot plan of `mode` for `path`, keyed to the artifact.
fn snapshot_plan(
    mode: wasmvisor::snapshot::SnapshotMode,
    path: &Path,
    artifact: &Path,
    verified: bool,
) -> wasmvisor::snapshot::SnapshotPlan {
    use wasmvisor::snapshot::{RamRestore, SnapshotKey, SnapshotPlan};
    let component = artifact.file_name().unwrap().to_string_lossy().into_owned();
    let key = SnapshotKey { component, cpu_features: 0 };
    SnapshotPlan { mode, path: path.to_owned(), key, verified, ram: RamRestore::Copied }
}

#[test]
fn a_snapshot_made_in_a_pre_booted_vm_restores_with_the_launchs_own_args_and_a_bad_one_is_refused() {
    use wasmvisor::snapshot::{RAM_OFFSET, Snapshot, SnapshotMode};
    if !kvm_available("a_snapshot_made_in_a_pre_booted_vm_restores_with_the_launchs_own_args_and_a_bad_one_is_refused")
    {
        return;
    }
    let dir = TempDir::new("child-snapshot");
    let echo = artifact("echo", &dir.path().join("cache"));
    let snap = dir.path().join("echo.snap");
    let config = |args: &[&str], plan| VmConfig {
        memory_mib: 128,
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![format!("RUN={}", args.join("-"))],
        component: Some(echo.clone()),
        snapshot: plan,
        ..VmConfig::default()
    };
    let echoed = |arg: &str| format!("args: 2\narg: echo.wasm\narg: {arg}\nenv: RUN=echo.wasm-{arg}\n");
    let template = VmConfig { component: None, ..config(&[], None) };
    let pre_booted = || {
        let mut c = VmmChild::spawn_idle(exe()).unwrap();
        c.pre_boot(&template).unwrap();
        c
    };
    // Made in a pre-booted VM that stops at the component's readiness: no output, exit 0.
    let mut maker = pre_booted();
    maker
        .configure(&config(&["echo.wasm", "secret"], Some(snapshot_plan(SnapshotMode::MakeOnly, &snap, &echo, false))))
        .unwrap();
    let made = events(&mut maker);
    assert!(matches!(made.last(), Some(ChildEvent::Exited { code: 0, .. })), "{made:?}");
    assert_eq!(output(&made, Stream::Stdout), "", "the maker stops before the component runs");
    Snapshot::verify(&snap).unwrap();
    let restore = || Some(snapshot_plan(SnapshotMode::Restore, &snap, &echo, true));

    // Restored into a pre-booted VM and into a fresh one: each with its own args.
    for (n, pre) in [(1, true), (2, false), (3, true)] {
        let arg = format!("restored{n}");
        let mut c = if pre { pre_booted() } else { VmmChild::spawn_idle(exe()).unwrap() };
        let t = Instant::now();
        c.configure(&config(&["echo.wasm", &arg], restore())).unwrap();
        let all = events(&mut c);
        let took = t.elapsed();
        assert!(
            matches!(all.first(), Some(ChildEvent::Started { pre_booted, restored: true, .. }) if *pre_booted == pre),
            "{all:?}"
        );
        assert_eq!(output(&all, Stream::Stdout), echoed(&arg), "{all:?}");
        if let Some(ChildEvent::Exited { phases, .. }) = all.last() {
            eprintln!("restored (pre-booted {pre}) in {took:?}: {phases:?}");
        }
    }
    // The same launch in a pre-booted VM without the snapshot, for comparison.
    let mut c = pre_booted();
    let t = Instant::now();
    c.configure(&config(&["echo.wasm", "plain"], None)).unwrap();
    let all = events(&mut c);
    if let Some(ChildEvent::Exited { phases, .. }) = all.last() {
        eprintln!("pre-booted, no snapshot, in {:?}: {phases:?}", t.elapsed());
    }

    // Damaged: one byte of its RAM image changed. Refused (the checksum), and the launch loads
    // the component itself.
    let file = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
    let header = Snapshot::open_unchecked(&snap).unwrap();
    let (gpa, _) = header.extents[header.extents.len() / 2];
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a], RAM_OFFSET + gpa).unwrap();
    let mut c = pre_booted();
    c.configure(&config(
        &["echo.wasm", "after-damage"],
        Some(snapshot_plan(SnapshotMode::Restore, &snap, &echo, false)),
    ))
    .unwrap();
    let all = events(&mut c);
    match &all[..] {
        [ChildEvent::SnapshotRefused { message }, ChildEvent::Started { restored: false, .. }, ..] => {
            assert!(message.contains("checksum does not verify"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(output(&all, Stream::Stdout), echoed("after-damage"), "{all:?}");
    // Of another shape (a different memory size): refused too, naming what differs.
    let mut c = VmmChild::spawn_idle(exe()).unwrap();
    c.configure(&VmConfig {
        memory_mib: 64,
        ..config(&["echo.wasm", "other"], Some(snapshot_plan(SnapshotMode::Restore, &snap, &echo, true)))
    })
    .unwrap();
    let all = events(&mut c);
    match &all[..] {
        [ChildEvent::SnapshotRefused { message }, ChildEvent::Started { restored: false, .. }, ..] => {
            assert!(message.contains("its memory size differs"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(output(&all, Stream::Stdout), echoed("other"), "{all:?}");
}
