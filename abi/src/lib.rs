//! The contract between the wasmvisor VMM and its guest unikernel.
//!
//! Everything that crosses the VM boundary is defined here, once, for both sides: the
//! guest-physical memory layout ([`layout`]), the boot hand-off ([`boot::BootInfo`]), the I/O
//! ports and the hypercall request block ([`hypercall`]), and the frame the exception stubs
//! report ([`exception`]), the guest's CPU feature detection and report ([`cpu`]), the
//! capability wire protocol ([`capability`]), and the HTTP transport ([`http`]). The crate is
//! `no_std` and has no `unsafe`: every structure the VMM reads from guest memory is
//! `#[repr(C)]` and made of plain integers, so any bit pattern is a valid value; capability
//! messages are postcard-encoded and decoded with bounds checks only.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod boot;
pub mod capability;
pub mod cpu;
pub mod exception;
pub mod fs;
pub mod http;
pub mod hypercall;
pub mod layout;
pub mod vsock;
