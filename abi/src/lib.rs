//! The contract between the wasmvisor VMM and its guest unikernel.
//!
//! Everything that crosses the VM boundary is defined here, once, for both sides: the
//! guest-physical memory layout ([`layout`]), the boot hand-off ([`boot::BootInfo`]), the I/O
//! ports and the hypercall request block ([`hypercall`]), and the frame the exception stubs
//! report ([`exception`]). The crate is `no_std`, has no dependencies and no `unsafe`: every
//! structure is `#[repr(C)]` and made of plain integers, so any bit pattern is a valid value and
//! both sides can read it from untrusted memory without undefined behaviour.

#![no_std]
#![forbid(unsafe_code)]

pub mod boot;
pub mod exception;
pub mod hypercall;
pub mod layout;
