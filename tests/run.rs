//! Integration tests for `wasmvisor run`: stock wasm32-wasip2 components (built from images/)
//! run in a micro-VM, each through the real binary in its own process.
//!
//! Tests that need KVM skip loudly where `/dev/kvm` is absent, and fail when `CI=true`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmvisor::images;
use wasmvisor::vm::{EXIT_SETUP_FAILED, EXIT_TIMEOUT};

use common::{code, kvm_available, stderr, stdout};

mod common;

/// `wasmtime run`'s exit code for a trap on Unix (128 + SIGABRT).
const EXIT_TRAP: i32 = 134;

fn component(name: &str) -> PathBuf {
    let path = images::component(name);
    assert!(path.is_file(), "component {} is missing: run scripts/build-images.sh", path.display());
    path
}

/// A cache directory private to this test process, so that tests do not share artifacts
/// with the user's cache (they do share them with each other: the second run is a hit).
fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("wasmvisor-test-cache-{}", std::process::id()))
}

fn wasmvisor(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
        .args(args)
        .env("WASMVISOR_CACHE_DIR", cache_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wasmvisor");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait for wasmvisor");
    writer.join().unwrap();
    out
}

fn run(name: &str, args: &[&str]) -> Output {
    let path = component(name);
    let mut all = vec!["run", path.to_str().unwrap()];
    all.extend_from_slice(args);
    wasmvisor(&all, b"")
}

#[test]
fn hello_prints_and_exits_zero() {
    if !kvm_available("hello_prints_and_exits_zero") {
        return;
    }
    let out = run("hello", &[]);
    assert_eq!((code(&out), stdout(&out).as_str(), stderr(&out).as_str()), (0, "Hello, world!\n", ""));
}

#[test]
fn args_and_env_reach_the_component() {
    if !kvm_available("args_and_env_reach_the_component") {
        return;
    }
    let path = component("echo");
    let p = path.to_str().unwrap();
    let out = wasmvisor(&["run", "--env", "B=2", "--env", "A=x=y", p, "one", "two words", "--flag", "-v"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let want = "args: 5\narg: echo.wasm\narg: one\narg: two words\narg: --flag\narg: -v\nenv: A=x=y\nenv: B=2\n";
    assert_eq!(stdout(&out), want);
}

#[test]
fn exit_codes_follow_wasmtime() {
    if !kvm_available("exit_codes_follow_wasmtime") {
        return;
    }
    // Rust's std::process::exit(n) on wasip2 is `exit(err)` for any n != 0: exit code 1.
    let out = run("exit-code", &["7"]);
    assert_eq!(code(&out), 1);
    assert_eq!(stdout(&out), "exiting with 7\n");
    assert_eq!(stderr(&out), "to stderr\n");
    let out = run("exit-code", &["0"]);
    assert_eq!(code(&out), 0);
}

#[test]
fn stdin_is_forwarded_byte_for_byte() {
    if !kvm_available("stdin_is_forwarded_byte_for_byte") {
        return;
    }
    let path = component("cat");
    let out = wasmvisor(&["run", path.to_str().unwrap()], b"hi\n");
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "hi\n"));
    assert_eq!(stderr(&out), "cat: 3 bytes\n");
    // 300 KiB of every byte value: larger than any one buffer on the way.
    let data: Vec<u8> = (0..300 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let out = wasmvisor(&["run", path.to_str().unwrap()], &data);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "stdout differs from stdin");
    assert_eq!(stderr(&out), format!("cat: {} bytes\n", data.len()));
}

#[test]
fn the_compute_kernel_computes_the_right_digest() {
    if !kvm_available("the_compute_kernel_computes_the_right_digest") {
        return;
    }
    let mib = 3;
    // The same generator as images/src/bin/sha256.rs, hashed on the host.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        hasher.update(&chunk);
    }
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let out = run("sha256", &[&mib.to_string()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("sha256 of {mib} MiB: {hex}\n"));
}

#[test]
fn traps_print_the_trap_and_exit_134() {
    if !kvm_available("traps_print_the_trap_and_exit_134") {
        return;
    }
    for (kind, message) in [
        ("unreachable", "wasm trap: wasm `unreachable` instruction executed"),
        ("oob", "wasm trap: out of bounds memory access"),
        ("div", "wasm trap: integer divide by zero"),
        // The Rust shadow stack lives in linear memory; overflowing it leaves the memory.
        ("stack", "wasm trap: out of bounds memory access"),
    ] {
        let out = run("trap", &[kind]);
        assert_eq!(code(&out), EXIT_TRAP, "{kind}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("about to trap: {kind}\n"));
        assert!(
            stderr(&out).ends_with(&format!("wasmvisor: error: the component trapped: {message}\n")),
            "{kind}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn clocks_random_and_denied_capabilities_behave() {
    if !kvm_available("clocks_random_and_denied_capabilities_behave") {
        return;
    }
    let out = run("wasi-probe", &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "monotonic: advanced true\nwall clock: after 2020 true\nsleep: at least 20 ms true\nhashmap: 1\n\
         filesystem: denied (NotFound)\nsockets: denied (PermissionDenied)\nudp: denied (PermissionDenied)\n"
    );
}

#[test]
fn a_runaway_component_times_out() {
    if !kvm_available("a_runaway_component_times_out") {
        return;
    }
    let path = component("spin");
    let t = Instant::now();
    let out = wasmvisor(&["run", "--timeout", "0.5", path.to_str().unwrap()], b"");
    assert_eq!(code(&out), i32::from(EXIT_TIMEOUT), "{}", stderr(&out));
    assert_eq!(stdout(&out), "spinning\n", "output before the timeout is not lost");
    assert!(stderr(&out).contains("timed out after 0.5"), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn memory_is_capped_and_exhaustion_is_reported() {
    if !kvm_available("memory_is_capped_and_exhaustion_is_reported") {
        return;
    }
    let path = component("alloc");
    let p = path.to_str().unwrap();
    let out = wasmvisor(&["run", "--memory", "32", p, "64"], b"");
    assert_eq!(code(&out), EXIT_TRAP, "{}", stderr(&out));
    assert!(stderr(&out).contains("out of memory"), "{}", stderr(&out));
    assert!(stderr(&out).contains("guest's 32 MiB (raise --memory)"), "{}", stderr(&out));
    let out = wasmvisor(&["run", "--memory", "128", p, "64"], b"");
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "allocated 64 MiB\n"), "{}", stderr(&out));
}

#[test]
fn the_second_run_uses_the_cached_artifact() {
    if !kvm_available("the_second_run_uses_the_cached_artifact") {
        return;
    }
    let path = component("hello");
    let first = wasmvisor(&["run", "-v", path.to_str().unwrap()], b"");
    assert_eq!(code(&first), 0);
    let second = wasmvisor(&["run", "-v", path.to_str().unwrap()], b"");
    assert_eq!(code(&second), 0);
    assert!(stderr(&second).contains("wasmvisor: cached artifact"), "{}", stderr(&second));
    assert!(stderr(&second).contains("guest phases (us): engine"), "{}", stderr(&second));
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmvisor-run-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A component whose only content is one import of an instance named `name`.
fn component_importing(name: &str) -> Vec<u8> {
    let mut bytes = b"\0asm\x0d\x00\x01\x00".to_vec();
    // Type section: one empty instance type.
    bytes.extend_from_slice(&[7, 3, 1, 0x42, 0]);
    // Import section: `name` as that instance type.
    let mut import = vec![1, 0, name.len() as u8];
    import.extend_from_slice(name.as_bytes());
    import.extend_from_slice(&[5, 0]);
    bytes.push(10);
    bytes.push(import.len() as u8);
    bytes.extend_from_slice(&import);
    bytes
}

#[test]
fn bad_input_fails_before_a_vm_is_created() {
    let not_wasm = temp_file("notes.txt", b"hello");
    let core = temp_file("core.wasm", b"\0asm\x01\0\0\0");
    let keyvalue = temp_file("kv.wasm", &component_importing("wasi:keyvalue/store@0.2.0-draft"));
    let http = temp_file("http.wasm", &component_importing("wasi:http/outgoing-handler@0.2.0"));
    let reactor = temp_file("reactor.wasm", b"\0asm\x0d\x00\x01\x00");
    let garbage = temp_file("garbage.wasm", b"\0asm\x0d\x00\x01\x00\xff\xff\xff");
    for (path, expect) in [
        (not_wasm.as_path(), "is not a WebAssembly file"),
        (
            core.as_path(),
            "is a core WebAssembly module that wasmvisor cannot run: it is no command, without a `_start` export",
        ),
        (keyvalue.as_path(), "imports `wasi:keyvalue/store@0.2.0-draft`, but tenant `default` was not granted"),
        // wasi:http is provided now; this one exports nothing, so it is still no command.
        (http.as_path(), "does not export `wasi:cli/run@0.2.x`"),
        (reactor.as_path(), "does not export `wasi:cli/run@0.2.x`"),
        (garbage.as_path(), "is not a valid component"),
        (Path::new("/nonexistent/app.wasm"), "cannot read /nonexistent/app.wasm"),
    ] {
        // KVM points nowhere: an error about it would mean a VM was being created.
        let out = Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
            .args(["run", path.to_str().unwrap()])
            .env("WASMVISOR_KVM_DEVICE", "/nonexistent/kvm")
            .env("WASMVISOR_CACHE_DIR", cache_dir())
            .output()
            .unwrap();
        assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED), "{path:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{path:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("KVM") && !stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

#[test]
fn a_component_blocked_on_stdin_still_times_out() {
    if !kvm_available("a_component_blocked_on_stdin_still_times_out") {
        return;
    }
    let path = component("cat");
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
        .args(["run", "--timeout", "0.5", path.to_str().unwrap()])
        .env("WASMVISOR_CACHE_DIR", cache_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep stdin open (and silent) past the timeout.
    let stdin = child.stdin.take().unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(code(&out), i32::from(EXIT_TIMEOUT), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out after 0.5"), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_damaged_cached_artifact_is_recompiled() {
    if !kvm_available("a_damaged_cached_artifact_is_recompiled") {
        return;
    }
    let cache = std::env::temp_dir().join(format!("wasmvisor-damaged-cache-{}", std::process::id()));
    let hello = component("hello");
    let run_hello = || {
        Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
            .args(["run", hello.to_str().unwrap()])
            .env("WASMVISOR_CACHE_DIR", &cache)
            .output()
            .unwrap()
    };
    assert_eq!(code(&run_hello()), 0);
    let artifact = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"));
    let artifact = artifact.expect("the first run cached an artifact");
    let bytes = std::fs::read(&artifact).unwrap();
    std::fs::write(&artifact, &bytes[..bytes.len() / 3]).unwrap();
    let out = run_hello();
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "Hello, world!\n"), "{}", stderr(&out));
    assert!(stderr(&out).contains("rejected the component artifact"), "{}", stderr(&out));
    assert!(stderr(&out).contains("recompiling"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&artifact).unwrap(), bytes, "the cache holds a whole artifact again");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// Runs the real binary with its own cache directory.
fn wasmvisor_with_cache(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmvisor")).args(args).env("WASMVISOR_CACHE_DIR", cache).output().unwrap()
}

#[test]
fn a_cpython_component_from_componentize_py_runs_as_under_wasmtime() {
    if !kvm_available("a_cpython_component_from_componentize_py_runs_as_under_wasmtime") {
        return;
    }
    // images/python-hello, built by componentize-py (pinned in scripts/install-python-tools.sh):
    // an 18 MB component holding CPython and its standard library.
    let py = component("python_hello");
    let py = py.to_str().unwrap();
    let out = wasmvisor(&["run", "--env", "GREETING=hi there", py, "Hello", "World 42"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let sha = Sha256::digest(b"Hello World 42").iter().map(|b| format!("{b:02x}")).collect::<String>();
    let report = format!(
        r#"{{"args": ["Hello", "World 42"], "clock_ok": true, "greeting": "hi there", "python": "3.14", "random_bytes": 16, "sha256": "{sha}", "words": 2}}"#
    );
    assert_eq!(stdout(&out), format!("hello from python\n{report}\n"));
    assert!(stderr(&out).contains("to stderr\n"), "{}", stderr(&out));
    // `sys.exit(3)` leaves `run` with an error: exit code 1, as `wasmtime run` gives.
    let out = wasmvisor(&["run", "--env", "EXIT_CODE=3", py], b"");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("hello from python\n"), "{}", stdout(&out));
}

#[test]
fn wasip1_command_modules_run_as_under_the_preview1_adapter() {
    if !kvm_available("wasip1_command_modules_run_as_under_the_preview1_adapter") {
        return;
    }
    // The same examples, built for wasm32-wasip1: core modules, made components on the fly.
    let module = |name: &str| {
        let path = images::preview1_module(name);
        assert!(path.is_file(), "{} is missing: run scripts/build-images.sh", path.display());
        assert!(!std::fs::read(&path).unwrap().starts_with(b"\0asm\x0d"), "a core module");
        path.to_str().unwrap().to_owned()
    };
    let out = wasmvisor(&["run", &module("hello")], b"");
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "Hello, world!\n"), "{}", stderr(&out));
    let out = wasmvisor(&["run", "--env", "GREETING=hi", &module("echo"), "a", "b c"], b"");
    assert_eq!(stdout(&out), "args: 3\narg: echo.wasm\narg: a\narg: b c\nenv: GREETING=hi\n", "{}", stderr(&out));
    let out = wasmvisor(&["run", &module("cat")], b"stdin reaches it\n");
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "stdin reaches it\n"), "{}", stderr(&out));
    // proc_exit(33): the adapter ends with `exit(err)`, code 1 (wasmtime's own preview 1
    // would give 33).
    let out = wasmvisor(&["run", &module("exit-code"), "33"], b"");
    assert_eq!((code(&out), stdout(&out).as_str()), (1, "exiting with 33\n"), "{}", stderr(&out));
}

#[test]
fn initialised_memory_is_intact_and_grown_memory_reads_zero() {
    if !kvm_available("initialised_memory_is_intact_and_grown_memory_reads_zero") {
        return;
    }
    // images/src/bin/memimage.rs: 3 MiB of data segments (the size of a large component's
    // memory image), checked word by word; its memory then grows by 48 MiB in 1 MiB steps,
    // each checked to read zero before it is written.
    let out = run("memimage", &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "memimage ok: 2 MiB table and 1 MiB buffer intact, grew by 48 MiB\n");
}

#[test]
fn a_changed_file_is_recompiled_even_with_its_size_and_mtime_kept() {
    if !kvm_available("a_changed_file_is_recompiled_even_with_its_size_and_mtime_kept") {
        return;
    }
    let dir = common::TempDir::new("changed-component");
    let cache = dir.path().join("cache");
    let app = dir.path().join("app.wasm");
    let original = std::fs::read(component("hello")).unwrap();
    std::fs::write(&app, &original).unwrap();
    let mtime = std::fs::metadata(&app).unwrap().modified().unwrap();
    // The component index records a file only once its last change has settled.
    std::thread::sleep(wasmvisor::wasm::index::SETTLE + Duration::from_millis(100));
    let run = || {
        let out = wasmvisor_with_cache(&cache, &["run", "-v", app.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        (stdout(&out), stderr(&out))
    };
    let (out, err) = run();
    assert_eq!(out, "Hello, world!\n");
    assert!(err.contains("read, hashed and inspected") && err.contains("compiled artifact"), "{err}");
    let (_, err) = run();
    assert!(err.contains("known to the component index") && err.contains("cached artifact"), "{err}");

    // Same size, one byte of the greeting changed in place, the mtime put back.
    let at = original.windows(13).position(|w| w == b"Hello, world!").expect("hello's greeting");
    let file = std::fs::OpenOptions::new().write(true).open(&app).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"J", at as u64).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    assert_eq!(std::fs::metadata(&app).unwrap().modified().unwrap(), mtime);
    assert_eq!(std::fs::metadata(&app).unwrap().len(), original.len() as u64);
    let (out, err) = run();
    assert_eq!(out, "Jello, world!\n", "a stale artifact ran: {err}");
    assert!(err.contains("read, hashed and inspected") && err.contains("compiled artifact"), "{err}");
}

#[test]
fn compile_warms_the_cache_and_refuses_what_is_not_a_component() {
    if !kvm_available("compile_warms_the_cache_and_refuses_what_is_not_a_component") {
        return;
    }
    let dir = common::TempDir::new("compile-command");
    let cache = dir.path().join("cache");
    let hello = component("hello");
    let http = component("http_hello");
    let (hello, http) = (hello.to_str().unwrap(), http.to_str().unwrap());
    let out = wasmvisor_with_cache(&cache, &["compile", hello, http]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with(&format!("{hello}: compiled in ")) && lines[0].ends_with(".cwasm"), "{lines:?}");
    assert!(lines[1].starts_with(&format!("{http}: compiled in ")), "{lines:?}");
    // Not a terminal: no progress line.
    assert!(!stderr(&out).contains("for the guest..."), "{}", stderr(&out));
    let out = wasmvisor_with_cache(&cache, &["compile", hello]);
    let artifact = lines[0].rsplit(": ").next().unwrap();
    assert_eq!(stdout(&out).trim_end(), format!("{hello}: already compiled: {artifact}"));
    let out = wasmvisor_with_cache(&cache, &["run", "-v", hello]);
    assert_eq!(code(&out), 0);
    assert!(stderr(&out).contains("wasmvisor: cached artifact"), "{}", stderr(&out));

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let out = wasmvisor_with_cache(&cache, &["compile", junk.to_str().unwrap(), hello, core.to_str().unwrap()]);
    assert_eq!(code(&out), i32::from(EXIT_SETUP_FAILED));
    assert!(stderr(&out).contains("is not a WebAssembly file"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "is a core WebAssembly module that wasmvisor cannot run: it is no command, without a `_start` export"
        ),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains(&format!("{hello}: already compiled: ")), "the good one is still done");
}

#[test]
fn a_run_with_snapshot_makes_it_then_starts_from_it_and_rebuilds_a_damaged_or_foreign_one() {
    use wasmvisor::snapshot::{RAM_OFFSET, Snapshot};
    if !kvm_available("a_run_with_snapshot_makes_it_then_starts_from_it_and_rebuilds_a_damaged_or_foreign_one") {
        return;
    }
    let cache = std::env::temp_dir().join(format!("wasmvisor-test-snapshots-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let echo = component("echo");
    let run = |extra: &[&str], arg: &str| {
        let env = format!("RUN={arg}");
        let mut args = vec!["run", "-v", "--snapshot", "--env", &env];
        args.extend_from_slice(extra);
        args.extend([echo.to_str().unwrap(), arg]);
        let out = wasmvisor_with_cache(&cache, &args);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), format!("args: 2\narg: echo.wasm\narg: {arg}\nenv: RUN={arg}\n"), "{}", stderr(&out));
        stderr(&out)
    };
    let snapshots = || -> Vec<PathBuf> {
        let mut all: Vec<PathBuf> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "snap"))
            .collect();
        all.sort();
        all
    };
    // The first run makes it (and goes on); the next ones start from it, each with its own
    // args and env.
    assert!(run(&[], "first").contains("made the snapshot of the component's ready state"));
    let [snap] = &snapshots()[..] else { panic!("one snapshot: {:?}", snapshots()) };
    Snapshot::verify(snap).unwrap();
    for arg in ["second", "third"] {
        assert!(run(&[], arg).contains("started from the snapshot"), "{arg}");
    }
    // Shared RAM: the runs write their pages, the file keeps its own.
    for arg in ["shared1", "shared2"] {
        assert!(run(&["--snapshot-ram", "shared"], arg).contains("started from the snapshot"), "{arg}");
    }
    Snapshot::verify(snap).unwrap();

    // Damaged (one byte of its RAM image) and no longer known good: refused, rebuilt.
    let header = Snapshot::open_unchecked(snap).unwrap();
    let (gpa, _) = header.extents[header.extents.len() / 2];
    let file = std::fs::OpenOptions::new().write(true).open(snap).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xa5], RAM_OFFSET + gpa).unwrap();
    drop(file);
    let said = run(&[], "damaged");
    assert!(said.contains("checksum does not verify") && said.contains("made the snapshot"), "{said}");
    Snapshot::verify(snap).unwrap();
    assert!(run(&[], "after").contains("started from the snapshot"));

    // Another component's snapshot in its place: refused for what it is of, rebuilt.
    let out = wasmvisor_with_cache(&cache, &["run", "--snapshot", component("hello").to_str().unwrap()]);
    assert_eq!(stdout(&out), "Hello, world!\n", "{}", stderr(&out));
    let hello = snapshots().into_iter().find(|p| p != snap).expect("hello's snapshot");
    std::fs::copy(&hello, snap).unwrap();
    let said = run(&[], "foreign");
    assert!(said.contains("its component differs") && said.contains("made the snapshot"), "{said}");
    assert!(run(&[], "again").contains("started from the snapshot"));
    std::fs::remove_dir_all(&cache).unwrap();
}
