//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::Path;
use std::process::Output;

/// Whether KVM tests can run here: they skip loudly where `/dev/kvm` is absent, and fail when
/// `CI=true`.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but /dev/kvm is missing: KVM tests must run in CI");
    }
    eprintln!("SKIPPED {test}: /dev/kvm is missing on this host");
    false
}

/// A process's stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A process's exit code (it must have exited, not been killed).
pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}
