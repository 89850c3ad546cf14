//! The one definition of the wasmtime engine configuration that the host and the guest share.
//!
//! The host compiles components ahead of time with Cranelift for `x86_64-unknown-none`; the
//! guest deserializes and runs them with wasmtime's `no_std` runtime. wasmtime refuses an
//! artifact whose settings differ from the loading engine's, so both sides start from
//! [`config`] and add only what is theirs: the host the compilation target and the Cranelift
//! ISA flags ([`ISA_FEATURES`]) of the features the guest reported, the guest its CPU feature
//! probe and code-memory hooks.
//!
//! The guest has no virtual memory management and no signal handlers, so linear memories
//! live in the heap with explicit bounds checks, and every trap is an explicit check.
//! `memory_init_cow` is on for what it does at compile time: each memory's data segments
//! become one page-aligned image, which the guest copies in one go (it has no virtual memory
//! to map it copy-on-write; its wasmtime carries a patch that lets a heap memory take such an
//! image, see guest/Cargo.toml).

#![no_std]

pub use wasmtime;
use wasmtime::{Config, WasmBacktraceDetails};

/// The wasmtime release both sides are built with (artifacts are tied to it).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// The target the host compiles for.
pub const TARGET: &str = "x86_64-unknown-none";

/// Most Wasm stack a call may use. The guest stack is 1 MiB; the rest is for the runtime and
/// WASI host functions.
pub const MAX_WASM_STACK: usize = 512 * 1024;

/// Cranelift ISA flags the host may enable, with the CPU feature each needs (the name that
/// wasmtime passes to the guest's feature probe, `wasmvisor_abi::cpu::Feature::name`). The
/// host enables those whose feature the guest reported (never the host process's own view);
/// the guest's wasmtime checks each at load with the same detection.
pub const ISA_FEATURES: &[(&str, &str)] = &[
    ("has_sse3", "sse3"),
    ("has_ssse3", "ssse3"),
    ("has_sse41", "sse4.1"),
    ("has_sse42", "sse4.2"),
    ("has_popcnt", "popcnt"),
    ("has_avx", "avx"),
    ("has_avx2", "avx2"),
    ("has_fma", "fma"),
    ("has_bmi1", "bmi1"),
    ("has_bmi2", "bmi2"),
    ("has_lzcnt", "lzcnt"),
];

/// The settings that host and guest must agree on.
pub fn config() -> Config {
    let mut config = Config::new();
    config
        .signals_based_traps(false)
        .memory_reservation(0)
        .memory_guard_size(0)
        .memory_reservation_for_growth(0)
        .memory_init_cow(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .wasm_backtrace_details(WasmBacktraceDetails::Disable);
    config
}

/// A short description of [`config`] and the version, for the host's artifact cache key.
/// Change it whenever `config` changes.
pub const CONFIG_FINGERPRINT: &str =
    "wasmtime-48.0.8;no-signals;reservation-0;guard-0;growth-0;static-init;stack-524288;no-backtrace-details;v2";
