//! The device worker: one thread per VM that serves the vsock device off the vCPU thread.
//!
//! It sleeps in `epoll_wait` on: the notify eventfd (the ioeventfds KVM signals when the guest
//! writes `QueueNotify`, and the vCPU thread's fallback for notifications KVM did not catch),
//! a stop eventfd, the host Unix listener for host-initiated connections, their handshakes,
//! and the host ends of open connections. After every wake it runs one device pass and, if
//! the pass used buffers, wakes a vCPU sleeping in `WaitDevice`. An idle tenant therefore
//! costs no CPU: both threads sleep in the kernel.
//!
//! Host-initiated connections follow Firecracker's hybrid vsock: a host program connects to
//! the VM's Unix socket, writes `CONNECT <port>\n`, and reads `OK <local port>\n` once the
//! guest accepts; the socket then carries the stream. A bad handshake line closes the socket.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use wasmvisor_abi::vsock::{MMIO_QUEUE_NOTIFY, RX_QUEUE, TX_QUEUE, VSOCK_MMIO_GPA};

use super::DeviceWake;
use super::vsock::{VsockDevice, VsockStats};
use crate::seccomp::{self, ThreadRole};

const TOKEN_NOTIFY: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_LISTENER: u64 = 2;
/// Handshake tokens are `HANDSHAKE_BASE + n`; connection tokens are the device's, above
/// `CONN_BASE`.
const HANDSHAKE_BASE: u64 = 1 << 16;
const CONN_BASE: u64 = 1 << 32;
/// Host-initiated connections waiting for their `CONNECT` line.
const MAX_HANDSHAKES: usize = 16;
/// Longest handshake line.
const MAX_HANDSHAKE_LINE: usize = 64;

/// What the device did over the VM's life.
#[derive(Clone, Debug, Default)]
pub struct VsockReport {
    /// Counters.
    pub stats: VsockStats,
    /// Why the device failed, if it did (each time).
    pub faults: Vec<String>,
    /// Register accesses the transport refused.
    pub refused_accesses: u64,
}

/// A running worker and what the vCPU thread needs to reach the device.
pub struct VsockWorker {
    device: Arc<Mutex<VsockDevice>>,
    wake: Arc<DeviceWake>,
    notify: EventFd,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// The epoll set, until [`run`](Self::run) hands it to the thread.
    epoll: Option<Epoll>,
}

/// Locks the device; a worker that panicked leaves it usable (every pass leaves the device in
/// a consistent state before it can panic).
fn lock(device: &Mutex<VsockDevice>) -> MutexGuard<'_, VsockDevice> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors starting the worker.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the vsock device: {what}: {source}")]
pub struct WorkerError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

fn werr(what: &'static str) -> impl Fn(std::io::Error) -> WorkerError {
    move |source| WorkerError { what, source }
}

impl VsockWorker {
    /// Registers the notify ioeventfds with `vm` and starts the worker thread.
    pub fn start(vm: &VmFd, device: VsockDevice, listener: Option<UnixListener>) -> Result<Self, WorkerError> {
        let mut worker = Self::prepare(vm, device)?;
        worker.run(listener)?;
        Ok(worker)
    }

    /// The device registered with the VM (its queue notifications caught by the ioeventfd) and
    /// ready for the vCPU's register accesses, without its thread: a pre-booted guest brings
    /// the device up before the launch, whose [`run`](Self::run) starts the thread, which then
    /// finds the notifications the guest left.
    pub fn prepare(vm: &VmFd, device: VsockDevice) -> Result<Self, WorkerError> {
        let notify = EventFd::new(EFD_NONBLOCK).map_err(werr("create the notify eventfd"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(werr("create the stop eventfd"))?;
        for queue in [RX_QUEUE, TX_QUEUE] {
            vm.register_ioevent(&notify, &IoEventAddress::Mmio(VSOCK_MMIO_GPA + MMIO_QUEUE_NOTIFY), u32::from(queue))
                .map_err(|e| WorkerError { what: "register the QueueNotify ioeventfd", source: e.into() })?;
        }
        let device = Arc::new(Mutex::new(device));
        let wake = Arc::new(DeviceWake::default());
        let epoll = Epoll::new().map_err(werr("create the worker's epoll"))?;
        let add = |fd: RawFd, token: u64, events: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add(notify.as_raw_fd(), TOKEN_NOTIFY, EventSet::IN).map_err(werr("watch the notify eventfd"))?;
        add(stop.as_raw_fd(), TOKEN_STOP, EventSet::IN).map_err(werr("watch the stop eventfd"))?;
        Ok(Self { device, wake, notify, stop, thread: None, epoll: Some(epoll) })
    }

    /// Starts the worker thread of a [`prepare`](Self::prepare)d device, with the listener for
    /// host-initiated connections (if any). Once only.
    pub fn run(&mut self, listener: Option<UnixListener>) -> Result<(), WorkerError> {
        let epoll = self.epoll.take().ok_or_else(|| WorkerError {
            what: "start the worker thread",
            source: std::io::Error::other("it was started already"),
        })?;
        let add = |fd: RawFd, token: u64, events: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        if let Some(l) = &listener {
            l.set_nonblocking(true).map_err(werr("make the vsock listener non-blocking"))?;
            add(l.as_raw_fd(), TOKEN_LISTENER, EventSet::IN).map_err(werr("watch the vsock listener"))?;
        }
        let mut state = Loop {
            device: self.device.clone(),
            wake: self.wake.clone(),
            notify: self.notify.try_clone().map_err(werr("share the notify eventfd"))?,
            epoll,
            listener,
            handshakes: HashMap::new(),
            next_handshake: 0,
            registered: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || match seccomp::apply(ThreadRole::Device) {
                Ok(()) => state.run(),
                Err(e) => tracing::error!(error = %e, "vsock worker not started"),
            })
            .map_err(werr("spawn the worker thread"))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// The device, for the vCPU thread's register accesses.
    pub fn device(&self) -> &Arc<Mutex<VsockDevice>> {
        &self.device
    }

    /// What `WaitDevice` sleeps on.
    pub fn wake(&self) -> &Arc<DeviceWake> {
        &self.wake
    }

    /// What the vCPU thread needs: device, wake-up and the notify fallback.
    pub fn vcpu_handle(&self) -> Result<VsockVcpuHandle, WorkerError> {
        Ok(VsockVcpuHandle {
            device: self.device.clone(),
            wake: self.wake.clone(),
            notify: self.notify.try_clone().map_err(werr("share the notify eventfd"))?,
        })
    }

    /// Stops the worker and reports what the device did.
    pub fn stop(mut self) -> VsockReport {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let d = lock(&self.device);
        VsockReport { stats: d.stats, faults: d.faults.clone(), refused_accesses: d.transport.refused_accesses }
    }
}

impl Drop for VsockWorker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

/// The vCPU thread's view of the device.
pub struct VsockVcpuHandle {
    device: Arc<Mutex<VsockDevice>>,
    /// What `WaitDevice` sleeps on.
    pub wake: Arc<DeviceWake>,
    notify: EventFd,
}

impl VsockVcpuHandle {
    /// Serves an MMIO read at `offset` in the register page.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.device).mmio_read(offset, data);
    }

    /// The device's state, for a snapshot of the VM at a quiet point.
    pub fn save(&self) -> Result<super::vsock::DeviceSnapshot, String> {
        lock(&self.device).save()
    }

    /// Serves an MMIO write; a queue notification no ioeventfd caught goes to the worker.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let notified = lock(&self.device).mmio_write(offset, data);
        if notified.is_some() {
            let _ = self.notify.write(1);
        }
    }
}

struct Loop {
    device: Arc<Mutex<VsockDevice>>,
    wake: Arc<DeviceWake>,
    notify: EventFd,
    epoll: Epoll,
    listener: Option<UnixListener>,
    handshakes: HashMap<u64, (UnixStream, Vec<u8>)>,
    next_handshake: u64,
    /// Connection tokens whose host socket is in the epoll set.
    registered: HashMap<u64, RawFd>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock worker: epoll_wait failed; stopping");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_NOTIFY => {
                        let _ = self.notify.read();
                    }
                    TOKEN_STOP => return,
                    TOKEN_LISTENER => self.accept(),
                    t if (HANDSHAKE_BASE..CONN_BASE).contains(&t) => self.handshake(t),
                    _ => {}
                }
            }
            let device = self.device.clone();
            let used = {
                let mut device = lock(&device);
                let progress = device.process();
                self.sync_fds(&device);
                progress.used
            };
            if used {
                self.wake.notify();
            }
        }
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else { return };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES || stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.next_handshake += 1;
                    let token = HANDSHAKE_BASE + self.next_handshake % (CONN_BASE - HANDSHAKE_BASE);
                    let ev = EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token);
                    if self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), ev).is_ok() {
                        self.handshakes.insert(token, (stream, Vec::new()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line of a host-initiated connection.
    fn handshake(&mut self, token: u64) {
        let Some((stream, line)) = self.handshakes.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        // Byte by byte: whatever follows the line belongs to the guest.
        let port = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Err("closed before the CONNECT line"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(line),
                Ok(_) if line.len() >= MAX_HANDSHAKE_LINE => break Err("handshake line too long"),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err("read failed"),
            }
        };
        let Some((stream, _)) = self.handshakes.remove(&token) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, stream.as_raw_fd(), EpollEvent::default());
        match port {
            Ok(port) => {
                if !lock(&self.device).connect_from_host(stream, port) {
                    tracing::debug!(port, "vsock: host connection refused (device not ready or full)");
                }
            }
            Err(why) => tracing::debug!(why, "vsock: bad host handshake"),
        }
    }

    /// Keeps the epoll set equal to the device's open host sockets.
    fn sync_fds(&mut self, device: &VsockDevice) {
        let live: HashMap<u64, RawFd> = device.stream_fds().map(|(t, fd)| (CONN_BASE + t, fd)).collect();
        // Closed sockets left the epoll set when they were closed.
        self.registered.retain(|t, _| live.contains_key(t));
        for (token, fd) in live {
            if self.registered.contains_key(&token) {
                continue;
            }
            let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
            if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)).is_ok() {
                self.registered.insert(token, fd);
            }
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "handshake is not text")?;
    let port = line.strip_prefix("CONNECT ").ok_or("handshake is not CONNECT <port>")?;
    port.trim_end_matches('\r').parse().map_err(|_| "bad port in CONNECT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Ok(1234));
        assert_eq!(parse_connect(b"CONNECT 1234\r"), Ok(1234));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT -1").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert!(parse_connect(b"HELLO 1").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }
}
