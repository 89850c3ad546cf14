//! Integration tests for preopened directories (`wasmvisor run --dir`, `--dir-ro`): a probe
//! component (images/src/bin/fs-probe.rs) exercises `wasi:filesystem` through Rust's std and
//! prints one line per check; its output must be `wasmtime run --dir`'s, recorded in
//! `tests/data/fs-probe*.wasmtime.txt` with wasmtime 48.0.8 (the README says how to re-record).
//! Real directories, real KVM; the host side checks what the guest could and could not touch.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{TempDir, code, kvm_available, read_edge_files, stderr, stdout};
use wasmvisor::images;

mod common;

fn wasmvisor(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmvisor"))
        .args(args)
        .current_dir(dir)
        .env("WASMVISOR_CACHE_DIR", std::env::temp_dir().join(format!("wasmvisor-test-cache-{}", std::process::id())))
        .output()
        .expect("run wasmvisor")
}

fn probe() -> String {
    let path = images::component("fs-probe");
    assert!(path.is_file(), "{} is missing: run scripts/build-images.sh", path.display());
    path.to_str().unwrap().to_owned()
}

fn expected(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `<tmp>/data` (empty), `<tmp>/ro/file` and `<tmp>/outside/secret`.
fn setup(name: &str) -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new(name);
    for d in ["data", "ro", "outside"] {
        std::fs::create_dir(tmp.path().join(d)).unwrap();
    }
    std::fs::write(tmp.path().join("ro/file"), "read-only\n").unwrap();
    std::fs::write(tmp.path().join("outside/secret"), "outside\n").unwrap();
    let (data, ro) = (tmp.path().join("data"), tmp.path().join("ro"));
    (tmp, data, ro)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn the_probe_sees_its_preopens_exactly_as_under_wasmtime() {
    if !kvm_available("the_probe_sees_its_preopens_exactly_as_under_wasmtime") {
        return;
    }
    let (tmp, data, ro) = setup("fs-probe");
    let dirs = [format!("{}::/data", data.display()), format!("{}::/ro", ro.display())];
    let out = wasmvisor(tmp.path(), &["run", "--dir", &dirs[0], "--dir", &dirs[1], &probe(), "/data", "/ro"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), expected("fs-probe.wasmtime.txt"), "stderr: {}", stderr(&out));
    // What the guest says it left is what the host finds.
    assert_eq!(listing(&data), ["a.txt", "big", "dangling", "sub", "up"]);
    assert_eq!(std::fs::read_link(data.join("up")).unwrap(), Path::new("../.."));
    assert_eq!(std::fs::metadata(data.join("big")).unwrap().len(), 3_000_000);
    assert_eq!(std::fs::read_to_string(tmp.path().join("outside/secret")).unwrap(), "outside\n");
    assert_eq!(listing(tmp.path()), ["data", "outside", "ro"], "nothing escaped beside the preopens");
}

#[test]
fn a_wasip1_module_uses_preopens_through_the_adapter() {
    if !kvm_available("a_wasip1_module_uses_preopens_through_the_adapter") {
        return;
    }
    let module = images::preview1_module("fs-probe");
    assert!(module.is_file(), "{} is missing: run scripts/build-images.sh", module.display());
    let (tmp, data, ro) = setup("fs-probe-p1");
    let dirs = [format!("{}::/data", data.display()), format!("{}::/ro", ro.display())];
    let out =
        wasmvisor(tmp.path(), &["run", "--dir", &dirs[0], "--dir", &dirs[1], module.to_str().unwrap(), "/data", "/ro"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Exactly `wasmtime run` of the module itself (its own preview 1, no adapter): where the
    // wasip2 build sees EIO (wasi-libc's answer to a failed stream), the adapter passes on
    // the stream's error code, EBADF, as wasmtime's preview 1 does.
    assert_eq!(stdout(&out), expected("fs-probe-p1.wasmtime.txt"), "stderr: {}", stderr(&out));
}

#[test]
fn files_of_every_edge_size_read_back_whole() {
    if !kvm_available("files_of_every_edge_size_read_back_whole") {
        return;
    }
    // Reads here are placed by the broker in `run`'s own process, in chunks up to
    // FS_PLACED_CHUNK; the daemon's test reads the same files with the bytes answered.
    let (tmp, data, _) = setup("fs-edges");
    let (paths, lines) = read_edge_files(&data, "/data");
    let dir = format!("{}::/data", data.display());
    let probe = probe();
    let mut args = vec!["run", "--dir", &dir, &probe, "sum"];
    args.extend(paths.iter().map(String::as_str));
    let out = wasmvisor(tmp.path(), &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), lines, "stderr: {}", stderr(&out));
}

#[test]
fn without_a_dir_nothing_is_reachable() {
    if !kvm_available("without_a_dir_nothing_is_reachable") {
        return;
    }
    let (tmp, data, _) = setup("fs-nodir");
    let out = wasmvisor(tmp.path(), &["run", &probe(), "/data"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), expected("fs-probe-nodir.wasmtime.txt"), "stderr: {}", stderr(&out));
    assert!(listing(&data).is_empty());
}

#[test]
fn a_read_only_dir_refuses_every_change_and_is_left_as_it_was() {
    if !kvm_available("a_read_only_dir_refuses_every_change_and_is_left_as_it_was") {
        return;
    }
    let (tmp, data, ro) = setup("fs-ro");
    let before = std::fs::metadata(ro.join("file")).unwrap().modified().unwrap();
    let dirs = [format!("{}::/data", data.display()), format!("{}::/ro", ro.display())];
    let out = wasmvisor(tmp.path(), &["run", "--dir", &dirs[0], "--dir-ro", &dirs[1], &probe(), "/data", "/ro"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let ro_lines: Vec<String> = text.lines().filter(|l| l.starts_with("ro ")).map(str::to_owned).collect();
    let denied = "err Some(63) PermissionDenied";
    assert_eq!(
        ro_lines,
        [
            "ro read: ok \"read-only\\n\"".to_string(),
            format!("ro write: {denied}"),
            format!("ro create: {denied}"),
            format!("ro mkdir: {denied}"),
            format!("ro unlink: {denied}"),
            format!("ro rename: {denied}"),
            format!("ro append: {denied}"),
            "ro still: ok \"read-only\\n\"".to_string(),
        ]
    );
    assert_eq!(listing(&ro), ["file"]);
    assert_eq!(std::fs::read_to_string(ro.join("file")).unwrap(), "read-only\n");
    assert_eq!(std::fs::metadata(ro.join("file")).unwrap().modified().unwrap(), before);
}

#[test]
fn links_the_host_left_pointing_out_are_not_followed_out() {
    if !kvm_available("links_the_host_left_pointing_out_are_not_followed_out") {
        return;
    }
    let (tmp, data, _) = setup("fs-escape");
    let outside = tmp.path().join("outside");
    std::os::unix::fs::symlink(&outside, data.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside", data.join("rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.join("passwd")).unwrap();
    std::fs::create_dir(data.join("sub")).unwrap();
    std::os::unix::fs::symlink("../../outside/secret", data.join("sub/climb")).unwrap();
    std::fs::write(data.join("inside"), "inside\n").unwrap();
    std::os::unix::fs::symlink("inside", data.join("ok")).unwrap();
    let dir = format!("{}::/data", data.display());
    let paths = [
        "/data/inside",
        "/data/ok",
        "/data/abs/secret",
        "/data/rel/secret",
        "/data/passwd",
        "/data/sub/climb",
        "/data/../outside/secret",
        "/data/sub/../../outside/secret",
        "/outside/secret",
        "/etc/passwd",
    ];
    let mut args = vec!["run", "--dir", &dir, &probe(), "read"].into_iter().map(String::from).collect::<Vec<_>>();
    args.extend(paths.iter().map(|p| p.to_string()));
    let out = wasmvisor(tmp.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), paths.len(), "{text}");
    assert_eq!(lines[0], "/data/inside: ok \"inside\\n\"");
    assert_eq!(lines[1], "/data/ok: ok \"inside\\n\"");
    for line in &lines[2..] {
        assert!(line.contains(": err "), "{line}");
        assert!(!line.contains("outside\\n") && !line.contains("root:"), "{line}");
    }
}

#[test]
fn bad_dir_arguments_are_refused_before_boot() {
    let tmp = TempDir::new("fs-bad-args");
    for (arg, says) in
        [("/no/such/dir::/data", "/no/such/dir"), ("::/data", "neither part empty"), ("/tmp::", "neither part empty")]
    {
        let out = wasmvisor(tmp.path(), &["run", "--dir", arg, &probe(), "/data"]);
        assert_eq!(code(&out), 2, "{arg}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{arg}: {}", stderr(&out));
    }
    std::fs::write(tmp.path().join("file"), "").unwrap();
    let out = wasmvisor(tmp.path(), &["run", "--dir-ro", "file::/f", &probe(), "/f"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
}
