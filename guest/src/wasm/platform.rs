//! What wasmtime's `no_std` runtime needs from the platform: thread-local slots, a way to make
//! code executable, and the CPU features for checking an artifact's ISA flags.
//!
//! The guest is single-threaded and identity-mapped; the component artifact sits in a
//! read-only, executable window that the VMM maps, so "publishing" code is a no-op.

use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

/// wasmtime's TLS slots (slot 0 is always used; slot 1 only by async components).
static TLS: [AtomicPtr<u8>; 2] = [AtomicPtr::new(ptr::null_mut()), AtomicPtr::new(ptr::null_mut())];

/// wasmtime platform hook: read a thread-local slot.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    TLS.get(slot).map_or(ptr::null_mut(), |s| s.load(Ordering::Relaxed))
}

/// wasmtime platform hook: write a thread-local slot.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_set(slot: usize, value: *mut u8) {
    if let Some(s) = TLS.get(slot) {
        s.store(value, Ordering::Relaxed);
    }
}

/// Code memory for an identity-mapped guest whose RAM and artifact window are executable.
pub struct IdentityCodeMemory;

impl wasmtime::CustomCodeMemory for IdentityCodeMemory {
    fn required_alignment(&self) -> usize {
        4096
    }

    fn publish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }

    fn unpublish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// wasmtime's CPU feature probe: whether this guest may use `feature` (names as wasmtime
/// asks, e.g. "sse4.1"), or `None` for a name we do not know. The answer is
/// [`crate::cpu::features`], the set the host compiled for.
pub fn detect_feature(feature: &str) -> Option<bool> {
    wasmvisor_abi::cpu::Feature::from_name(feature).map(|f| crate::cpu::features().contains(f))
}
