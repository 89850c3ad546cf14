//! Emulated devices. Today: the COM1 16550 UART (debug console). Virtio devices join here.

pub mod serial;
pub mod virtio;
