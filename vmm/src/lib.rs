//! wasmvisor: a KVM micro-VM hypervisor for WebAssembly components.
//!
//! This crate is the host side: it boots the wasmvisor guest unikernel at CPL 3 in a KVM VM
//! ([`vm::boot`]) and serves its exits. See ARCHITECTURE.md for the map of modules.

pub mod arch;
pub mod bootinfo;
pub mod child;
pub mod console;
pub mod devices;
pub mod floor;
pub mod guest_cpu;
pub mod hypercall;
pub mod images;
pub mod jail;
pub mod kvm;
pub mod launch;
pub mod loader;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod wasm;

pub use vm::{RunReport, VmConfig, VmError, boot};
