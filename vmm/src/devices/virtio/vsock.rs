//! The virtio-vsock device (virtio 1.x section 5.10), emulated in userspace: packet parsing
//! on the guest's queues, stream connections with credit-based flow control, and the host
//! ends those connections reach.
//!
//! A guest connection to `CAPABILITY_PORT` is served by the tenant's capability broker (a
//! `CapabilityService`: the broker in process, or a relay to it in another); one to any other
//! host port is forwarded to the Unix socket `<uds>_<port>` if the VMM has a socket path (Firecracker's hybrid convention) and reset otherwise. Host programs
//! reach guest ports through the same socket path with `CONNECT <port>\n` (see
//! [`super::worker`]); [`VsockDevice::connect_from_host`] starts those.
//!
//! Everything in the queues is guest-controlled. Descriptor chains are parsed by
//! `virtio-queue` and `virtio-vsock`, which check every address and length against guest RAM;
//! a chain that does not parse, an avail index that runs ahead of the ring, or a packet longer
//! than `MAX_PACKET_PAYLOAD` fails the device (`DEVICE_NEEDS_RESET`, with the reason kept in
//! [`VsockDevice::faults`]) until the driver resets it. Protocol misbehaviour on one
//! connection (wrong CIDs, unknown operations, data beyond the credit we gave) resets that
//! connection only. Memory per VM is bounded: at most [`MAX_CONNECTIONS`] connections, each
//! buffering at most [`BUF_ALLOC`] bytes from the guest and a bounded backlog for it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vm_memory::{Bytes, GuestMemoryMmap};
use wasmvisor_abi::capability::{
    CapError, Reply, Request, decode_request, decode_response, encode_response, split_frame,
};
use wasmvisor_abi::vsock::{
    CAPABILITY_PORT, GUEST_CID, HOST_CID, MAX_PACKET_PAYLOAD, QUEUE_SIZE_MAX, RX_QUEUE, TX_QUEUE,
};
use wasmvisor_providers::CapabilityService;

use super::mmio::{DeviceInfo, MmioTransport, VIRTIO_F_VERSION_1, WriteEffect};

/// The guest-readable copy of the register page: a host page KVM maps read-only at the
/// device's address, so register reads cost no exit while writes still exit (as MMIO, or
/// caught by the notify ioeventfd). The device re-renders it after every change of a readable
/// value (`MmioTransport::render`), always under the device lock.
pub struct RegisterPage {
    region: vm_memory::mmap::MmapRegion<()>,
}

impl RegisterPage {
    /// A zeroed anonymous page.
    pub fn new() -> Result<Self, String> {
        let region = vm_memory::mmap::MmapRegion::new(wasmvisor_abi::vsock::VSOCK_MMIO_SIZE as usize)
            .map_err(|e| format!("cannot map the vsock register page: {e}"))?;
        Ok(Self { region })
    }

    /// Host address of the page (for the KVM memory slot).
    pub fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// Bytes in the page.
    pub fn len(&self) -> usize {
        self.region.size()
    }

    /// Never: the page has a fixed, non-zero size.
    pub fn is_empty(&self) -> bool {
        self.region.size() == 0
    }

    /// Copies the rendered registers in with one 32-bit store each, so that a guest reading
    /// concurrently never sees a torn register.
    fn store(&self, bytes: &[u8]) {
        use vm_memory::{Bytes, VolatileMemory};
        let slice = self.region.as_volatile_slice();
        for (i, word) in bytes.chunks_exact(4).enumerate() {
            let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            let _ = slice.store(value, i * 4, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Bytes of the register page that hold values: registers up to 0x100, then the config space.
const REGISTERS_RENDERED: usize = 0x100 + 8;

/// Virtio device id of vsock.
pub const DEVICE_ID_VSOCK: u32 = 19;
/// Connections open at once; more requests are reset.
pub const MAX_CONNECTIONS: usize = 16;
/// Receive buffer the host advertises per connection: room for the largest capability frame.
pub const BUF_ALLOC: u32 = 2 << 20;
/// Bytes waiting for the guest on one connection beyond which the host stops producing more
/// (stops serving requests, stops reading the host socket).
const OUTBOUND_HIGH_WATER: usize = 256 << 10;
/// Control packets (resets to unknown connections) waiting for RX buffers; beyond this the
/// device stops taking packets from the guest until it reads.
const CONTROL_BACKLOG: usize = 256;
/// Passes over the queues per wake-up at most (each moves packets, so they are finite anyway).
const MAX_PASSES: usize = 64;
/// Faults kept for the report.
const MAX_FAULTS: usize = 16;
/// First local port of host-initiated connections.
const HOST_PORT_BASE: u32 = 1 << 30;

/// Packet type: stream.
const TYPE_STREAM: u16 = 1;
/// Operations (5.10.6).
mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// SHUTDOWN flags.
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// A packet header, as this device builds it for the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Header {
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn encode(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&HOST_CID.to_le_bytes());
        b[8..16].copy_from_slice(&GUEST_CID.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Counters, for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Packets taken from the TX queue.
    pub tx_packets: u64,
    /// Packets placed in the RX queue.
    pub rx_packets: u64,
    /// Connections reset by the host for misbehaviour or refusal.
    pub resets_sent: u64,
    /// Capability requests served.
    pub capability_requests: u64,
    /// Device resets by the driver.
    pub device_resets: u64,
    /// Wake-ups of the worker that found the device active.
    pub wakeups: u64,
    /// Time the worker spent in those passes (parsing, providers, filling RX), in nanoseconds.
    pub busy_ns: u64,
}

/// Where a connection's bytes go on the host.
enum Peer {
    /// The capability broker (in process, or a relay to one).
    Broker,
    /// A Unix stream (forwarded port or host-initiated connection).
    Stream(UnixStream),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

struct Conn {
    /// Unique for the device's life; the worker's epoll token.
    token: u64,
    peer: Peer,
    established: bool,
    /// A packet without data to send before any data (RESPONSE, REQUEST, CREDIT_UPDATE, ...).
    pending_op: Option<u16>,
    /// Bytes from the guest not yet consumed (credit accounting: they count against
    /// `BUF_ALLOC` until consumed).
    inbound: Vec<u8>,
    /// Bytes for the guest.
    outbound: VecDeque<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes consumed from the guest.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    credit_requested: bool,
    /// The host end has no more to send: SHUTDOWN once `outbound` drains.
    host_done: bool,
    /// Line to write to a host-initiated stream once the guest accepts (`OK <port>\n`).
    handshake_reply: Option<Vec<u8>>,
}

/// A file read the guest asked to have placed (`FsRead { into: Some(gpa) }`): the bytes the
/// broker answered with go straight into guest RAM at `gpa`, and the reply becomes their count,
/// so bulk data skips the vsock queues (and the guest's copies out of them). The address is
/// the guest's: `write_slice` refuses any range that is not wholly guest RAM (the artifact is
/// not in `mem`), and such a request gets `BadRequest`. Errors and other replies pass through.
fn place_read(mem: &GuestMemoryMmap, request: &[u8], out: &mut Vec<u8>) {
    let Ok(envelope) = decode_request(request) else { return };
    let Request::FsRead { into: Some(gpa), len, .. } = envelope.request else { return };
    let Ok(Some((body, used))) = split_frame(out) else { return };
    if used != out.len() {
        return;
    }
    let Ok(response) = decode_response(body) else { return };
    let placed = match response.result {
        Ok(Reply::Bytes(data)) => {
            let data = data.unwrap_or_default();
            if data.len() > len as usize {
                Err(CapError::BadRequest("the read returned more than was asked"))
            } else {
                match mem.write_slice(data, vm_memory::GuestAddress(gpa)) {
                    Ok(()) => Ok(Reply::U64(data.len() as u64)),
                    Err(_) => Err(CapError::BadRequest("the read's buffer is not guest memory")),
                }
            }
        }
        _ => return,
    };
    let mut replaced = Vec::new();
    if encode_response(response.id, &placed, &mut replaced).is_ok() {
        // Into the same buffer: its capacity serves the next answer.
        out.clear();
        out.extend_from_slice(&replaced);
    }
}

impl Conn {
    fn new(token: u64, peer: Peer) -> Self {
        Self {
            token,
            peer,
            established: false,
            pending_op: None,
            inbound: Vec::new(),
            outbound: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            credit_requested: false,
            host_done: false,
            handshake_reply: None,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// Why a connection is being reset.
type ResetReason = String;

/// What a snapshot keeps of the device (see [`VsockDevice::save`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSnapshot {
    transport: super::mmio::TransportSnapshot,
    rx_capacity: u64,
    rx_notify_enabled: bool,
}

/// The vsock device: transport registers, queues, connections and their host ends.
pub struct VsockDevice {
    /// The virtio-mmio register file and the three queues.
    pub transport: MmioTransport,
    mem: GuestMemoryMmap,
    broker: Box<dyn CapabilityService>,
    uds_path: Option<PathBuf>,
    conns: BTreeMap<ConnKey, Conn>,
    control: VecDeque<Header>,
    next_local_port: u32,
    next_token: u64,
    /// The connection the last RX packet came from (round robin).
    last_served: Option<ConnKey>,
    /// The data capacity of the last RX buffer the guest gave: packets are cut to it, so that
    /// a guest with small buffers (4 KiB) does not make the device cut every packet twice.
    rx_capacity: usize,
    /// The buffer capability answers are written to, reused across requests.
    out_scratch: Vec<u8>,
    /// Reused list of connection keys (a pass must not hold a borrow of `conns`).
    key_scratch: Vec<ConnKey>,
    rx_notify_enabled: bool,
    /// The guest-readable register page, when the VM maps one.
    page: Option<std::sync::Arc<RegisterPage>>,
    /// Why the device failed, in order (bounded).
    pub faults: Vec<String>,
    /// Counters.
    pub stats: VsockStats,
}

/// What a pass over the queues did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Buffers were placed in a used ring: the guest may want to wake.
    pub used: bool,
}

impl VsockDevice {
    /// A device in its reset state, serving the capability port with `broker` and forwarding
    /// other ports to `<uds_path>_<port>` when a path is given.
    pub fn new(mem: GuestMemoryMmap, broker: Box<dyn CapabilityService>, uds_path: Option<PathBuf>) -> Self {
        let info = DeviceInfo {
            device_id: DEVICE_ID_VSOCK,
            features: VIRTIO_F_VERSION_1,
            queue_max_sizes: vec![QUEUE_SIZE_MAX; 3],
            config: GUEST_CID.to_le_bytes().to_vec(),
        };
        Self {
            transport: MmioTransport::new(info),
            mem,
            broker,
            uds_path,
            conns: BTreeMap::new(),
            control: VecDeque::new(),
            next_local_port: HOST_PORT_BASE,
            next_token: 1,
            last_served: None,
            rx_capacity: MAX_PACKET_PAYLOAD as usize,
            out_scratch: Vec::new(),
            key_scratch: Vec::new(),
            page: None,
            rx_notify_enabled: true,
            faults: Vec::new(),
            stats: VsockStats::default(),
        }
    }

    /// Who serves the capability port, and where other ports' host sockets are: for a device
    /// made before its VM's launch (a pre-booted VM), told at the launch.
    pub fn set_backend(&mut self, broker: Box<dyn CapabilityService>, uds_path: Option<PathBuf>) {
        self.broker = broker;
        self.uds_path = uds_path;
    }

    /// The device's state for a snapshot of its VM: taken only where the guest has no
    /// connection and nothing waits to be delivered (its component ready, before any request),
    /// so that the transport and the queue positions are all of it.
    pub fn save(&self) -> Result<DeviceSnapshot, String> {
        if !self.conns.is_empty() || !self.control.is_empty() {
            return Err(format!(
                "the vsock device has {} connections and {} control packets waiting: not a quiet point",
                self.conns.len(),
                self.control.len()
            ));
        }
        Ok(DeviceSnapshot {
            transport: self.transport.save(),
            rx_capacity: self.rx_capacity as u64,
            rx_notify_enabled: self.rx_notify_enabled,
        })
    }

    /// Takes the state a snapshot kept (see [`save`](Self::save)) into this fresh device,
    /// checked against its guest memory; on refusal the device stays in its reset state.
    pub fn restore(&mut self, saved: &DeviceSnapshot) -> Result<(), String> {
        let rx_capacity = usize::try_from(saved.rx_capacity)
            .ok()
            .filter(|c| (1..=MAX_PACKET_PAYLOAD as usize).contains(c))
            .ok_or_else(|| format!("RX buffer capacity {} out of range", saved.rx_capacity))?;
        self.transport.restore(&saved.transport, &self.mem)?;
        self.rx_capacity = rx_capacity;
        self.rx_notify_enabled = saved.rx_notify_enabled;
        self.publish();
        Ok(())
    }

    /// Keeps `page` equal to what register reads return, from now on.
    pub fn with_register_page(mut self, page: std::sync::Arc<RegisterPage>) -> Self {
        self.page = Some(page);
        self.publish();
        self
    }

    /// Re-renders the register page after a change of a readable value: the registers and the
    /// 8-byte configuration space (the rest of the page stays zero).
    fn publish(&self) {
        if let Some(page) = &self.page {
            let mut bytes = [0u8; REGISTERS_RENDERED];
            self.transport.render(&mut bytes);
            page.store(&bytes);
        }
    }

    /// Serves a register read.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data);
    }

    /// Serves a register write; returns a queue notification the caller must pass on to the
    /// worker (one that no ioeventfd caught).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Option<u32> {
        let notify = self.mmio_write_inner(offset, data);
        self.publish();
        notify
    }

    fn mmio_write_inner(&mut self, offset: u64, data: &[u8]) -> Option<u32> {
        match self.transport.write(offset, data, &self.mem) {
            WriteEffect::None => None,
            WriteEffect::Notify(q) => Some(q),
            WriteEffect::Reset => {
                self.stats.device_resets += 1;
                self.conns.clear();
                self.control.clear();
                self.rx_notify_enabled = true;
                None
            }
            WriteEffect::Activated => {
                let ready = [RX_QUEUE, TX_QUEUE].iter().all(|&q| self.transport.queues[usize::from(q)].ready());
                if !ready {
                    self.fail("the driver set DRIVER_OK without the RX and TX queues ready".into());
                    return None;
                }
                // RX buffers need no notification while the device has nothing waiting for them.
                self.set_rx_notify(false);
                None
            }
        }
    }

    /// Whether the driver has the device running, with its RX and TX queues enabled.
    pub fn is_active(&self) -> bool {
        self.transport.is_active()
            && self.transport.queues[usize::from(RX_QUEUE)].ready()
            && self.transport.queues[usize::from(TX_QUEUE)].ready()
    }

    fn fail(&mut self, reason: String) {
        tracing::warn!(%reason, "vsock device failed; it needs a reset by the guest");
        if self.faults.len() < MAX_FAULTS {
            self.faults.push(reason);
        }
        self.transport.set_needs_reset();
        self.conns.clear();
        self.control.clear();
        self.publish();
    }

    fn set_rx_notify(&mut self, enable: bool) {
        if self.rx_notify_enabled == enable {
            return;
        }
        let q = &mut self.transport.queues[usize::from(RX_QUEUE)];
        let result =
            if enable { q.enable_notification(&self.mem).map(|_| ()) } else { q.disable_notification(&self.mem) };
        match result {
            Ok(()) => self.rx_notify_enabled = enable,
            Err(e) => self.fail(format!("cannot write the RX used ring flags: {e}")),
        }
    }

    /// Takes every packet the guest queued on TX, then fills RX with what is waiting for the
    /// guest. Called by the worker on every notification and host event.
    pub fn process(&mut self) -> Progress {
        let mut progress = Progress::default();
        if !self.is_active() {
            return progress;
        }
        let started = std::time::Instant::now();
        // Again while something moved: TX stops at a full control backlog, which RX drains,
        // and the guest may be spinning on that TX buffer without notifying again.
        for _ in 0..MAX_PASSES {
            if !self.is_active() {
                break;
            }
            let before = (self.stats.tx_packets, self.stats.rx_packets);
            self.process_tx(&mut progress);
            self.pump_all();
            self.process_rx(&mut progress);
            if (self.stats.tx_packets, self.stats.rx_packets) == before {
                break;
            }
        }
        self.stats.wakeups += 1;
        self.stats.busy_ns += started.elapsed().as_nanos() as u64;
        progress
    }

    fn process_tx(&mut self, progress: &mut Progress) {
        let mem = self.mem.clone();
        loop {
            if !self.is_active() || self.control.len() >= CONTROL_BACKLOG {
                return;
            }
            let queue = &mut self.transport.queues[usize::from(TX_QUEUE)];
            let mut chain = match queue.iter(&mem) {
                Ok(mut iter) => match iter.next() {
                    Some(chain) => chain,
                    None => return,
                },
                Err(e) => return self.fail(format!("TX queue: {e}")),
            };
            let head = chain.head_index();
            let packet = match VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PACKET_PAYLOAD) {
                Ok(p) => p,
                Err(e) => return self.fail(format!("TX descriptor chain {head}: {e}")),
            };
            self.stats.tx_packets += 1;
            let mut data = Vec::new();
            if let Some(slice) = packet.data_slice() {
                data.resize(slice.len(), 0);
                if let Err(e) = slice.read_slice(&mut data, 0) {
                    return self.fail(format!("TX descriptor chain {head}: {e}"));
                }
            }
            let hdr = GuestHeader {
                src_cid: packet.src_cid(),
                dst_cid: packet.dst_cid(),
                src_port: packet.src_port(),
                dst_port: packet.dst_port(),
                type_: packet.type_(),
                op: packet.op(),
                flags: packet.flags(),
                buf_alloc: packet.buf_alloc(),
                fwd_cnt: packet.fwd_cnt(),
            };
            if let Err(e) = self.transport.queues[usize::from(TX_QUEUE)].add_used(&mem, head, 0) {
                return self.fail(format!("TX used ring: {e}"));
            }
            progress.used = true;
            self.handle_packet(hdr, data);
        }
    }

    fn handle_packet(&mut self, hdr: GuestHeader, data: Vec<u8>) {
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if hdr.src_cid != GUEST_CID || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!(?hdr, "vsock packet with foreign addresses or type");
            if hdr.op != op::RST {
                self.reset_unknown(key);
            }
            return;
        }
        if hdr.op == op::REQUEST {
            return self.open_from_guest(key, &hdr);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != op::RST {
                self.reset_unknown(key);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.credit_requested = false;
        let outcome: Result<(), ResetReason> = match hdr.op {
            op::RESPONSE if !conn.established && conn.handshake_reply.is_some() => {
                conn.established = true;
                let reply = conn.handshake_reply.take().unwrap_or_default();
                match &mut conn.peer {
                    Peer::Stream(s) => match s.write(&reply) {
                        Ok(n) if n == reply.len() => Ok(()),
                        _ => Err("the host client went away before the guest accepted".into()),
                    },
                    Peer::Broker => Ok(()),
                }
            }
            op::RW if conn.established => {
                let unconsumed = conn.inbound.len() + data.len();
                if unconsumed > BUF_ALLOC as usize {
                    Err(format!("guest sent {unconsumed} unconsumed bytes, beyond the {BUF_ALLOC}-byte credit"))
                } else {
                    conn.inbound.extend_from_slice(&data);
                    Ok(())
                }
            }
            op::CREDIT_UPDATE => Ok(()),
            op::CREDIT_REQUEST => {
                conn.pending_op.get_or_insert(op::CREDIT_UPDATE);
                Ok(())
            }
            op::SHUTDOWN => {
                if hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == (SHUTDOWN_RCV | SHUTDOWN_SEND) {
                    // Both directions closed: acknowledge with RST and forget it (5.10.6.6).
                    self.conns.remove(&key);
                    self.control.push_back(Header {
                        src_port: key.local_port,
                        dst_port: key.peer_port,
                        op: op::RST,
                        ..Header::default()
                    });
                    return;
                }
                if hdr.flags & SHUTDOWN_SEND != 0
                    && let Peer::Stream(s) = &conn.peer
                {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
                Ok(())
            }
            op::RST => {
                self.conns.remove(&key);
                return;
            }
            other => Err(format!(
                "unexpected operation {other} in state {}",
                if conn.established { "connected" } else { "connecting" }
            )),
        };
        if let Err(reason) = outcome {
            self.reset_conn(key, &reason);
        }
    }

    fn open_from_guest(&mut self, key: ConnKey, hdr: &GuestHeader) {
        if self.conns.contains_key(&key) {
            return self.reset_conn(key, "connection request for a connection that exists");
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(port = key.local_port, "vsock: refusing a connection beyond {MAX_CONNECTIONS}");
            return self.reset_unknown(key);
        }
        let peer = if key.local_port == CAPABILITY_PORT {
            Peer::Broker
        } else {
            let Some(base) = &self.uds_path else {
                return self.reset_unknown(key);
            };
            let mut path = base.clone().into_os_string();
            path.push(format!("_{}", key.local_port));
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => Peer::Stream(s),
                Err(e) => {
                    tracing::debug!(path = %PathBuf::from(path).display(), error = %e, "vsock: forwarded port unreachable");
                    return self.reset_unknown(key);
                }
            }
        };
        let token = self.token();
        let mut conn = Conn::new(token, peer);
        conn.established = true;
        conn.pending_op = Some(op::RESPONSE);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        self.conns.insert(key, conn);
    }

    /// Starts a host-initiated connection to guest `port` over `stream` (handshake already
    /// read); the guest's answer completes or resets it. False when the device cannot take it.
    pub fn connect_from_host(&mut self, stream: UnixStream, port: u32) -> bool {
        if !self.is_active() || self.conns.len() >= MAX_CONNECTIONS {
            return false;
        }
        let local_port = self.next_local_port;
        self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(HOST_PORT_BASE);
        let key = ConnKey { local_port, peer_port: port };
        if self.conns.contains_key(&key) {
            return false;
        }
        let token = self.token();
        let mut conn = Conn::new(token, Peer::Stream(stream));
        conn.pending_op = Some(op::REQUEST);
        conn.handshake_reply = Some(format!("OK {local_port}\n").into_bytes());
        self.conns.insert(key, conn);
        true
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn reset_unknown(&mut self, key: ConnKey) {
        self.stats.resets_sent += 1;
        self.control.push_back(Header {
            src_port: key.local_port,
            dst_port: key.peer_port,
            op: op::RST,
            ..Header::default()
        });
    }

    fn reset_conn(&mut self, key: ConnKey, reason: &str) {
        tracing::warn!(local_port = key.local_port, peer_port = key.peer_port, %reason, "vsock: resetting connection");
        self.conns.remove(&key);
        self.reset_unknown(key);
    }

    /// Moves bytes between connections and their host ends: serves capability requests, writes
    /// guest data to streams, reads stream data for the guest.
    fn pump_all(&mut self) {
        let keys = self.conn_keys();
        for &key in &keys {
            if let Err(reason) = self.pump(key) {
                self.reset_conn(key, &reason);
            }
        }
        self.key_scratch = keys;
    }

    /// The connections' keys, in a buffer reused across passes (give it back in `key_scratch`).
    fn conn_keys(&mut self) -> Vec<ConnKey> {
        let mut keys = std::mem::take(&mut self.key_scratch);
        keys.clear();
        keys.extend(self.conns.keys().copied());
        keys
    }

    fn pump(&mut self, key: ConnKey) -> Result<(), ResetReason> {
        let Some(conn) = self.conns.get_mut(&key) else { return Ok(()) };
        if !conn.established {
            return Ok(());
        }
        let before = conn.fwd_cnt;
        match &mut conn.peer {
            Peer::Broker => {
                let mut consumed = 0;
                while conn.outbound.len() < OUTBOUND_HIGH_WATER {
                    let (body, len) = match split_frame(&conn.inbound[consumed..]) {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(e) => return Err(format!("capability stream: {e}")),
                    };
                    let mut out = std::mem::take(&mut self.out_scratch);
                    out.clear();
                    self.broker.handle(body, &mut out).map_err(|e| format!("capability stream: {e}"))?;
                    place_read(&self.mem, body, &mut out);
                    self.stats.capability_requests += 1;
                    conn.outbound.extend(&out);
                    self.out_scratch = out;
                    consumed += len;
                }
                conn.inbound.drain(..consumed);
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(consumed as u32);
            }
            Peer::Stream(stream) => {
                if !conn.inbound.is_empty() {
                    match stream.write(&conn.inbound) {
                        Ok(n) => {
                            conn.inbound.drain(..n);
                            conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(format!("host end: {e}")),
                    }
                }
                let mut buf = [0u8; 16 << 10];
                while !conn.host_done && conn.outbound.len() < OUTBOUND_HIGH_WATER {
                    match stream.read(&mut buf) {
                        Ok(0) => conn.host_done = true,
                        Ok(n) => conn.outbound.extend(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("host end: {e}")),
                    }
                }
            }
        }
        // Tell the guest about freed space once a quarter of its window has been consumed
        // and nothing else would carry the news.
        if conn.fwd_cnt != before
            && conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= BUF_ALLOC / 4
            && conn.outbound.is_empty()
        {
            conn.pending_op.get_or_insert(op::CREDIT_UPDATE);
        }
        Ok(())
    }

    /// Fills RX buffers with control packets, then connection packets, round robin.
    fn process_rx(&mut self, progress: &mut Progress) {
        let mem = self.mem.clone();
        loop {
            if !self.is_active() {
                return;
            }
            let Some((hdr, data)) = self.next_rx_packet() else { break };
            let queue = &mut self.transport.queues[usize::from(RX_QUEUE)];
            let chain = match queue.iter(&mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => return self.fail(format!("RX queue: {e}")),
            };
            let Some(mut chain) = chain else {
                // No buffer: keep the packet and ask for a notification when there is one.
                self.unsend(hdr, data);
                if self.rx_notify_enabled {
                    return;
                }
                // Look once more after asking: buffers may have come before the flag was seen.
                self.set_rx_notify(true);
                continue;
            };
            self.set_rx_notify(false);
            let head = chain.head_index();
            let mut packet = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PACKET_PAYLOAD) {
                Ok(p) => p,
                Err(e) => return self.fail(format!("RX descriptor chain {head}: {e}")),
            };
            let capacity = packet.data_slice().map_or(0, |s| s.len());
            if capacity > 0 {
                self.rx_capacity = capacity;
            }
            // The packet was sized by `next_rx_packet` against the largest possible buffer;
            // a smaller buffer takes a prefix and the rest goes back.
            let (hdr, data) = if data.len() > capacity {
                let rest = data[capacity..].to_vec();
                let mut data = data;
                data.truncate(capacity);
                self.unsend_data(&hdr, rest);
                (Header { len: capacity as u32, ..hdr }, data)
            } else {
                (hdr, data)
            };
            let written = packet.set_header_from_raw(&hdr.encode()).is_ok()
                && (data.is_empty() || packet.data_slice().is_some_and(|s| s.write_slice(&data, 0).is_ok()));
            if !written {
                return self.fail(format!("RX descriptor chain {head}: cannot write the packet"));
            }
            self.account_sent(&hdr);
            if let Err(e) =
                self.transport.queues[usize::from(RX_QUEUE)].add_used(&mem, head, (PKT_HEADER_SIZE + data.len()) as u32)
            {
                return self.fail(format!("RX used ring: {e}"));
            }
            self.stats.rx_packets += 1;
            progress.used = true;
        }
    }

    /// The next packet for the guest: a control packet, else a connection's pending operation,
    /// else data within the guest's credit. Data is taken out of the connection; `unsend_data`
    /// puts it back.
    fn next_rx_packet(&mut self) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let mut done = None;
        let mut found = None;
        // Round robin: start after the connection served last, so that a busy one cannot
        // starve the others.
        let keys = self.conn_keys();
        let start = self.last_served.and_then(|last| keys.iter().position(|k| *k > last)).unwrap_or(0);
        for key in keys[start..].iter().chain(&keys[..start]) {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            self.last_served = Some(*key);
            let base = Header {
                src_port: key.local_port,
                dst_port: key.peer_port,
                buf_alloc: BUF_ALLOC,
                fwd_cnt: conn.fwd_cnt,
                ..Header::default()
            };
            if let Some(op) = conn.pending_op.take() {
                found = Some((Header { op, ..base }, Vec::new()));
                break;
            }
            if !conn.established {
                continue;
            }
            if !conn.outbound.is_empty() {
                let credit = conn.peer_credit();
                if credit == 0 {
                    if !conn.credit_requested {
                        conn.credit_requested = true;
                        found = Some((Header { op: op::CREDIT_REQUEST, ..base }, Vec::new()));
                        break;
                    }
                    continue;
                }
                let n = conn.outbound.len().min(credit as usize).min(self.rx_capacity);
                let mut data = Vec::with_capacity(n);
                let (front, back) = conn.outbound.as_slices();
                let from_front = front.len().min(n);
                data.extend_from_slice(&front[..from_front]);
                data.extend_from_slice(&back[..n - from_front]);
                conn.outbound.drain(..n);
                found = Some((Header { op: op::RW, len: n as u32, ..base }, data));
                break;
            }
            if conn.host_done {
                done = Some(*key);
                found = Some((Header { op: op::SHUTDOWN, flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..base }, Vec::new()));
                break;
            }
        }
        self.key_scratch = keys;
        if let Some(key) = done {
            // After our SHUTDOWN the guest answers with RST, which finds nothing: that is fine.
            self.conns.remove(&key);
        }
        found
    }

    /// Puts back a packet that found no RX buffer.
    fn unsend(&mut self, hdr: Header, data: Vec<u8>) {
        let key = ConnKey { local_port: hdr.src_port, peer_port: hdr.dst_port };
        match (hdr.op, self.conns.get_mut(&key)) {
            (op::RW, Some(_)) => self.unsend_data(&hdr, data),
            (op::RST, _) | (op::SHUTDOWN, None) => self.control.push_front(hdr),
            (op::CREDIT_REQUEST, Some(conn)) => conn.credit_requested = false,
            (other, Some(conn)) => conn.pending_op = Some(other),
            _ => {}
        }
    }

    fn unsend_data(&mut self, hdr: &Header, data: Vec<u8>) {
        let key = ConnKey { local_port: hdr.src_port, peer_port: hdr.dst_port };
        if let Some(conn) = self.conns.get_mut(&key) {
            // Back to the front: appended, then rotated (a copy of the shorter part).
            conn.outbound.extend(&data);
            conn.outbound.rotate_right(data.len());
        }
    }

    fn account_sent(&mut self, hdr: &Header) {
        let key = ConnKey { local_port: hdr.src_port, peer_port: hdr.dst_port };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.tx_cnt = conn.tx_cnt.wrapping_add(hdr.len);
            conn.fwd_cnt_sent = hdr.fwd_cnt;
        }
    }

    /// The host sockets of live connections, with their tokens, for the worker's epoll set.
    pub fn stream_fds(&self) -> impl Iterator<Item = (u64, RawFd)> + '_ {
        self.conns.values().filter_map(|c| match &c.peer {
            Peer::Stream(s) => Some((c.token, s.as_raw_fd())),
            Peer::Broker => None,
        })
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

/// A packet header as the guest sent it (copied out of guest memory once).
#[derive(Clone, Copy, Debug)]
struct GuestHeader {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use vm_memory::GuestAddress;
    use wasmvisor_abi::capability::{FRAME_HEADER_LEN, Reply, Request, decode_response, encode_request};
    use wasmvisor_providers::{Broker, TenantSpec};

    use super::*;

    const SIZE: u16 = 16;
    /// Ring bases: RX at 0x1000.., TX at 0x4000..; packet pages from 0x10000.
    const RX_RING: u64 = 0x1000;
    const TX_RING: u64 = 0x4000;

    /// A minimal honest driver over a device, without KVM.
    struct Driver {
        dev: VsockDevice,
        mem: GuestMemoryMmap,
        tx_avail: u16,
        rx_avail: u16,
        rx_seen: u16,
        next_page: u64,
    }

    impl Driver {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let spec = TenantSpec {
                name: "unit".parse().unwrap(),
                grants: BTreeSet::new(),
                config: BTreeMap::new(),
                data_dir: std::env::temp_dir().join("wasmvisor-vsock-unit"),
                echo_log: false,
                http_allow: Vec::new(),
                kv_quota: None,
                dirs: Vec::new(),
            };
            let dev = VsockDevice::new(mem.clone(), Box::new(Broker::open(spec).unwrap()), None);
            let mut d = Self { dev, mem, tx_avail: 0, rx_avail: 0, rx_seen: 0, next_page: 0x10000 };
            for (off, v) in [(0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
                d.reg(off, v);
            }
            for (q, base) in [(0, RX_RING), (1, TX_RING)] {
                d.reg(0x30, q);
                d.reg(0x38, u32::from(SIZE));
                d.reg(0x80, base as u32);
                d.reg(0x90, (base + 0x1000) as u32);
                d.reg(0xa0, (base + 0x2000) as u32);
                d.reg(0x44, 1);
            }
            d.reg(0x70, 15);
            assert!(d.dev.is_active());
            d
        }

        fn reg(&mut self, offset: u64, value: u32) {
            self.dev.mmio_write(offset, &value.to_le_bytes());
        }

        fn page(&mut self) -> u64 {
            self.next_page += 0x1000;
            self.next_page
        }

        fn post(&mut self, ring: u64, avail: u16, addr: u64, len: u32, flags: u16) {
            let slot = avail % SIZE;
            let desc = ring + u64::from(slot) * 16;
            self.mem.write_obj(addr, GuestAddress(desc)).unwrap();
            self.mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            self.mem.write_obj(0u16, GuestAddress(desc + 14)).unwrap();
            self.mem.write_obj(slot, GuestAddress(ring + 0x1000 + 4 + 2 * u64::from(slot))).unwrap();
            self.mem.write_obj(avail.wrapping_add(1), GuestAddress(ring + 0x1000 + 2)).unwrap();
        }

        /// Queues a packet from guest port 50000 on TX.
        fn send(&mut self, op: u16, dst_port: u32, data: &[u8], buf_alloc: u32, fwd_cnt: u32) {
            let page = self.page();
            let mut h = [0u8; PKT_HEADER_SIZE];
            h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
            h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
            h[16..20].copy_from_slice(&50000u32.to_le_bytes());
            h[20..24].copy_from_slice(&dst_port.to_le_bytes());
            h[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
            h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
            h[30..32].copy_from_slice(&op.to_le_bytes());
            h[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
            h[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(page)).unwrap();
            self.mem.write_slice(data, GuestAddress(page + PKT_HEADER_SIZE as u64)).unwrap();
            let (avail, len) = (self.tx_avail, (PKT_HEADER_SIZE + data.len()) as u32);
            self.post(TX_RING, avail, page, len, 0);
            self.tx_avail += 1;
        }

        fn give_rx_buffers(&mut self, n: u16) {
            for _ in 0..n {
                let page = self.page();
                let avail = self.rx_avail;
                self.post(RX_RING, avail, page, 0x1000, 2);
                self.rx_avail += 1;
            }
        }

        /// Packets the device has put in RX since the last call: (op, src_port, data).
        fn received(&mut self) -> Vec<(u16, u32, Vec<u8>)> {
            let used_idx: u16 = self.mem.read_obj(GuestAddress(RX_RING + 0x2000 + 2)).unwrap();
            let mut out = Vec::new();
            while self.rx_seen != used_idx {
                let elem = GuestAddress(RX_RING + 0x2000 + 4 + 8 * u64::from(self.rx_seen % SIZE));
                let id: u32 = self.mem.read_obj(elem).unwrap();
                let addr: u64 = self.mem.read_obj(GuestAddress(RX_RING + 16 * u64::from(id))).unwrap();
                let mut h = [0u8; PKT_HEADER_SIZE];
                self.mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
                let len = u32::from_le_bytes(h[24..28].try_into().unwrap()) as usize;
                let mut data = vec![0; len];
                self.mem.read_slice(&mut data, GuestAddress(addr + PKT_HEADER_SIZE as u64)).unwrap();
                let op = u16::from_le_bytes(h[30..32].try_into().unwrap());
                out.push((op, u32::from_le_bytes(h[16..20].try_into().unwrap()), data));
                self.rx_seen = self.rx_seen.wrapping_add(1);
            }
            out
        }
    }

    #[test]
    fn a_capability_request_is_answered_over_a_connection() {
        let mut d = Driver::new();
        d.give_rx_buffers(4);
        d.send(op::REQUEST, CAPABILITY_PORT, &[], 65536, 0);
        assert!(d.dev.process().used);
        assert_eq!(d.received(), vec![(op::RESPONSE, CAPABILITY_PORT, vec![])]);
        let mut frame = Vec::new();
        encode_request(7, &Request::Noop, &mut frame).unwrap();
        // Split across two packets: the broker sees one frame.
        d.send(op::RW, CAPABILITY_PORT, &frame[..3], 65536, 0);
        d.send(op::RW, CAPABILITY_PORT, &frame[3..], 65536, 0);
        d.dev.process();
        let got = d.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, op::RW);
        let response = decode_response(&got[0].2[FRAME_HEADER_LEN..]).unwrap();
        assert_eq!((response.id, response.result), (7, Ok(Reply::Unit)));
        assert_eq!(d.dev.stats.capability_requests, 1);
    }

    /// Requests split at any byte across two packets are answered in order, once each.
    #[test]
    fn frames_split_at_every_byte_boundary_reassemble() {
        let mut stream = Vec::new();
        for (id, request) in
            [Request::Noop, Request::ConfigGetAll, Request::KvGet { bucket: "b", key: "k" }].iter().enumerate()
        {
            encode_request(id as u32, request, &mut stream).unwrap();
        }
        for cut in 0..=stream.len() {
            let mut d = Driver::new();
            d.give_rx_buffers(8);
            d.send(op::REQUEST, CAPABILITY_PORT, &[], 65536, 0);
            d.send(op::RW, CAPABILITY_PORT, &stream[..cut], 65536, 0);
            d.send(op::RW, CAPABILITY_PORT, &stream[cut..], 65536, 0);
            d.dev.process();
            let mut bytes = Vec::new();
            for (op, _, data) in d.received() {
                if op == op::RW {
                    bytes.extend(data);
                }
            }
            let mut ids = Vec::new();
            let mut rest = &bytes[..];
            while let Some((body, used)) = split_frame(rest).unwrap() {
                ids.push(decode_response(body).unwrap().id);
                rest = &rest[used..];
            }
            assert_eq!((ids, rest.len()), (vec![0, 1, 2], 0), "cut at {cut}");
        }
    }

    #[test]
    fn packets_wait_for_rx_buffers_and_ask_to_be_notified() {
        let mut d = Driver::new();
        d.send(op::REQUEST, CAPABILITY_PORT, &[], 65536, 0);
        d.send(op::REQUEST, 4444, &[], 65536, 0);
        d.dev.process();
        assert!(d.received().is_empty());
        // Notifications for RX were suppressed at activation; with packets waiting they are on.
        let flags: u16 = d.mem.read_obj(GuestAddress(RX_RING + 0x2000)).unwrap();
        assert_eq!(flags & 1, 0, "the device wants to hear about new RX buffers");
        d.give_rx_buffers(1);
        d.dev.process();
        assert_eq!(d.received(), vec![(op::RST, 4444, vec![])]);
        d.give_rx_buffers(1);
        d.dev.process();
        assert_eq!(d.received(), vec![(op::RESPONSE, CAPABILITY_PORT, vec![])]);
        d.give_rx_buffers(1);
        d.dev.process();
        let flags: u16 = d.mem.read_obj(GuestAddress(RX_RING + 0x2000)).unwrap();
        assert_eq!(flags & 1, 1, "nothing waiting: RX notifications suppressed again");
    }

    #[test]
    fn a_full_control_backlog_drains_and_tx_resumes_in_the_same_wake_up() {
        let mut d = Driver::new();
        // Packets for no connection, and no RX buffers: resets pile up to the backlog limit,
        // after which the device leaves TX buffers in the ring.
        let mut port = 7000;
        let tx_used = |d: &Driver| -> u16 { d.mem.read_obj(GuestAddress(TX_RING + 0x2000 + 2)).unwrap() };
        while tx_used(&d) == d.tx_avail {
            for _ in 0..SIZE {
                d.send(op::RW, port, &[], 65536, 0);
                port += 1;
            }
            d.dev.process();
        }
        assert_eq!(d.dev.control.len(), CONTROL_BACKLOG);
        let stalled = tx_used(&d);
        // RX buffers arrive (the guest's notification): the same wake-up drains resets into
        // them and goes back to the TX buffers it had left.
        d.give_rx_buffers(SIZE);
        d.dev.process();
        assert_eq!(d.received().len(), usize::from(SIZE));
        assert!(tx_used(&d) > stalled, "TX resumed after RX drained the backlog");
    }

    #[test]
    fn data_beyond_the_credit_resets_the_connection() {
        let mut d = Driver::new();
        d.give_rx_buffers(8);
        d.send(op::REQUEST, CAPABILITY_PORT, &[], 65536, 0);
        d.dev.process();
        d.received();
        // A frame header announcing a body that never completes holds the bytes unconsumed.
        let mut partial = (1u32 << 20).to_le_bytes().to_vec();
        partial.resize(60_000, 0);
        for _ in 0..35 {
            d.send(op::RW, CAPABILITY_PORT, &partial, 65536, 0);
            d.dev.process();
        }
        let got = d.received();
        assert_eq!(got.last().map(|p| p.0), Some(op::RST), "{:?}", got.iter().map(|p| p.0).collect::<Vec<_>>());
        assert_eq!(d.dev.connections(), 0);
        assert!(d.dev.is_active(), "one connection's misbehaviour does not fail the device");
    }

    #[test]
    fn a_frame_longer_than_the_protocol_allows_resets_the_connection() {
        let mut d = Driver::new();
        d.give_rx_buffers(8);
        d.send(op::REQUEST, CAPABILITY_PORT, &[], 65536, 0);
        d.dev.process();
        d.send(op::RW, CAPABILITY_PORT, &u32::MAX.to_le_bytes(), 65536, 0);
        d.dev.process();
        let ops: Vec<u16> = d.received().into_iter().map(|p| p.0).collect();
        assert_eq!(ops, vec![op::RESPONSE, op::RST]);
        assert_eq!(d.dev.connections(), 0);
        assert!(d.dev.is_active());
    }

    #[test]
    fn responses_respect_the_guest_credit() {
        let mut d = Driver::new();
        d.give_rx_buffers(8);
        // The guest advertises 8 bytes of buffer: a response frame does not fit at once.
        d.send(op::REQUEST, CAPABILITY_PORT, &[], 8, 0);
        let mut frame = Vec::new();
        encode_request(1, &Request::ConfigGetAll, &mut frame).unwrap();
        d.send(op::RW, CAPABILITY_PORT, &frame, 8, 0);
        d.dev.process();
        let got = d.received();
        let sent: usize = got.iter().filter(|p| p.0 == op::RW).map(|p| p.2.len()).sum();
        assert_eq!(sent, 8, "no more than the credit");
        assert_eq!(got.last().map(|p| p.0), Some(op::CREDIT_REQUEST));
        // The guest frees its buffer: the rest follows.
        d.send(op::CREDIT_UPDATE, CAPABILITY_PORT, &[], 1 << 16, 8);
        d.dev.process();
        let rest: usize = d.received().iter().filter(|p| p.0 == op::RW).map(|p| p.2.len()).sum();
        assert!(rest > 0);
    }

    #[test]
    fn a_placed_read_goes_into_guest_ram_and_nowhere_else() {
        use wasmvisor_abi::capability::{encode_request, encode_response};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let frame = |into: u64| {
            let mut f = Vec::new();
            encode_request(7, &Request::FsRead { handle: 1, offset: 0, len: 8, into: Some(into) }, &mut f).unwrap();
            f[4..].to_vec()
        };
        let answer = |bytes: &[u8]| {
            let mut out = Vec::new();
            encode_response(7, &Ok(Reply::Bytes(Some(bytes))), &mut out).unwrap();
            out
        };
        let result = |out: &[u8]| {
            let (body, _) = split_frame(out).unwrap().unwrap();
            format!("{:?}", decode_response(body).unwrap().result)
        };
        // Into RAM: the bytes land there and the reply is their count.
        let mut out = answer(b"abcd");
        place_read(&mem, &frame(0x1000), &mut out);
        assert_eq!(result(&out), "Ok(U64(4))");
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got, b"abcd");
        // Past RAM, or straddling its end: refused, nothing written, no panic.
        for gpa in [1 << 20, (1 << 20) - 2, u64::MAX - 1] {
            let mut out = answer(b"abcd");
            place_read(&mem, &frame(gpa), &mut out);
            assert!(result(&out).contains("not guest memory"), "{gpa:#x}: {}", result(&out));
        }
        // More than was asked for is refused; an error passes through untouched.
        let mut out = answer(b"123456789");
        place_read(&mem, &frame(0x2000), &mut out);
        assert!(result(&out).contains("more than was asked"));
        let mut out = Vec::new();
        encode_response(7, &Err(CapError::Fs(wasmvisor_abi::fs::FsError::BadDescriptor)), &mut out).unwrap();
        let before = out.clone();
        place_read(&mem, &frame(0x2000), &mut out);
        assert_eq!(out, before);
    }
}
