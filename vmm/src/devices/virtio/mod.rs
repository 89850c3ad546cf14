//! Virtio devices emulated in the VMM's userspace (this host has no vhost): the virtio-mmio
//! transport ([`mmio`]), the vsock device ([`vsock`]) and the thread that serves it
//! ([`worker`]).
//!
//! The guest has no interrupts. It notifies the device by writing `QueueNotify`, which an
//! ioeventfd turns into an eventfd signal for the worker thread without a userspace exit on
//! the vCPU thread; it learns of used buffers by polling its used rings, and when it has
//! nothing to do it makes the `WaitDevice` hypercall, which sleeps the vCPU thread on a
//! [`DeviceWake`] until the worker has used buffers for it.

pub mod mmio;
pub mod vsock;
pub mod worker;

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// How the worker wakes a vCPU sleeping in `WaitDevice`: a flag set whenever the device
/// places used buffers, cleared by the wait that consumes it.
#[derive(Debug, Default)]
pub struct DeviceWake {
    pending: Mutex<bool>,
    cond: Condvar,
}

impl DeviceWake {
    /// The device has used buffers the guest may not have seen.
    pub fn notify(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending = true;
        self.cond.notify_all();
    }

    /// Sleeps until `notify` (or one that came since the last wait) or `until`; true when woken
    /// by the device. A stale flag only costs the guest one more look at its rings.
    pub fn wait(&self, until: Instant) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *pending {
                *pending = false;
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            pending = self.cond.wait_timeout(pending, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}
