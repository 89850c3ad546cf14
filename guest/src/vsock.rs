//! The guest's vsock: `virtio-drivers`' vsock driver on the virtio-mmio transport, at CPL 3,
//! and a blocking request/response client for the host's capability broker.
//!
//! A command component's VM initialises the device on first use, not at boot: its register
//! accesses cost an exit each, and a component that imports no capability never pays them. An
//! HTTP guest brings it up at boot, before it is needed, and shares it ([`SharedVsock`])
//! between its request connection and the broker's. There are no
//! interrupts. After a send the driver spins until the device has taken the packet (the
//! device thread does that in microseconds); a receive polls the RX used ring for a short
//! budget and then sleeps in the `WaitDevice` hypercall until the device places used
//! buffers, so an idle guest costs the host no CPU.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::RefCell;
use core::ptr::NonNull;

use crate::rdtsc;
use crate::virtio_mmio::{LeanMmio, PREEMPTED_US};
use virtio_drivers::device::socket::{VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent, VsockEventType};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use wasmvisor_abi::boot::BOOT_FLAG_VSOCK;
use wasmvisor_abi::capability::{
    self, CapError, DecodeError, FRAME_HEADER_LEN, Reply, Request, decode_response, encode_request, split_frame,
};
use wasmvisor_abi::hypercall::Hypercall;
use wasmvisor_abi::layout::PAGE_SIZE;
use wasmvisor_abi::vsock::{CAPABILITY_PORT, GUEST_EPHEMERAL_PORT_BASE, HOST_CID, VSOCK_MMIO_GPA, VSOCK_MMIO_SIZE};

use crate::boot::Boot;
use crate::hypercall;

/// Whether the VMM gave this VM a vsock device.
pub fn present(boot: &Boot) -> bool {
    boot.info().flags & BOOT_FLAG_VSOCK != 0
}

/// The device as a pre-booted guest brought it up before its launch, for the launch's first
/// [`Vsock::init`].
struct BeforeLaunch(RefCell<Option<Vsock>>);

// SAFETY: the guest runs on one vCPU, with no interrupts and no threads: nothing touches this
// from two places at once.
unsafe impl Sync for BeforeLaunch {}

static BEFORE_LAUNCH: BeforeLaunch = BeforeLaunch(RefCell::new(None));

/// Drops the device brought up before the launch, for code that drives the device's registers
/// itself (the test guest's hostile driver): a reset behind the kept driver's back would leave
/// it with rings the device no longer has.
pub fn forget_before_launch() {
    BEFORE_LAUNCH.0.borrow_mut().take();
}

/// Brings the device up while a pre-booted guest waits for its launch (if the VMM gave it
/// one): its register exits are then behind the launch. A failure is left for the launch's own
/// [`Vsock::init`], which starts from a reset again.
pub fn bring_up_before_launch(boot: &Boot) {
    if let Ok(vsock) = Vsock::init(present(boot), boot.tsc_khz()) {
        *BEFORE_LAUNCH.0.borrow_mut() = Some(vsock);
    }
}

/// Bytes per RX buffer (the driver keeps a queue of them).
const RX_BUFFER_SIZE: usize = 16384;
/// Receive buffer per connection, advertised to the host as our credit.
const CONNECTION_BUFFER: u32 = 262144;
/// How long to poll the used ring before sleeping in `WaitDevice`, in TSC ticks per kHz
/// (i.e. microseconds): a device round trip usually completes within it.
const SPIN_US: u64 = 200;
/// Spins are judged in windows of this many (see [`Spin`]).
const SPIN_WINDOW: u32 = 128;
/// A window with this many spins that did not catch their event (descheduled, or out of
/// time) means the host's cores are all wanted, or that events come too late to catch.
const SPIN_MISSED_MAX: u32 = 16;
/// The first pause in spinning after a contended window, in milliseconds; each further
/// contended window doubles it, up to [`SPIN_PAUSE_MAX_MS`], and each calm one halves it.
const SPIN_PAUSE_MIN_MS: u64 = 50;
/// The longest pause in spinning.
const SPIN_PAUSE_MAX_MS: u64 = 1600;
/// A spin that ran out of time missed its event if the event came within this many
/// milliseconds after it (later, the guest was idle: not a judgement of the host).
const SPIN_NEAR_MS: u64 = 1;
/// Longest single `WaitDevice`; the loop goes round again after it. The device's wake-up is
/// never lost (a flag, not an edge), and the host ends the wait at the VM's deadline anyway, so
/// this is only a safety net: an idle VM (an HTTP tenant waiting for requests) costs a wake-up,
/// an exit and a host thread switch each time it passes. At 1 s, 1,000 idle VMs kept 7.4% of
/// this 2-core host busy.
const WAIT_NS: u64 = 60_000_000_000;
/// Deferred bytes past this size are sent at once (one packet's worth).
const DEFER_MAX: usize = wasmvisor_abi::vsock::MAX_PACKET_PAYLOAD as usize;
/// Deferred bytes older than this (microseconds) are sent with the next `send_soon`.
const DEFER_MAX_US: u64 = 1000;

/// DMA for the driver: the guest is identity-mapped and the device reads guest-physical
/// memory directly, so a heap allocation is its own physical address.
pub struct GuestHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, exclusively owned heap memory whose
// physical address equals its virtual address (identity map); `dma_dealloc` frees exactly what
// `dma_alloc` returned; `share` returns the buffer's own (identity-mapped) address.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = dma_layout(pages);
        // SAFETY: the layout has a non-zero size (at least one page).
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else { alloc::alloc::handle_alloc_error(layout) };
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the driver returns what `dma_alloc` gave it, with the same page count.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), dma_layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO is never at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

fn dma_layout(pages: usize) -> Layout {
    Layout::from_size_align(pages.max(1) * PAGE_SIZE as usize, PAGE_SIZE as usize).expect("page-aligned layout")
}

/// Why a vsock operation failed.
#[derive(Clone, Copy, Debug)]
pub enum VsockError {
    /// The VM has no vsock device (the host gave the tenant no capabilities).
    NoDevice,
    /// The device or driver failed.
    Device(virtio_drivers::Error),
    /// The host refused or reset the connection.
    Refused,
    /// The stream ended.
    Closed,
}

impl core::fmt::Display for VsockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoDevice => f.write_str("this VM has no vsock device"),
            Self::Device(e) => write!(f, "vsock device: {e}"),
            Self::Refused => f.write_str("the host refused the vsock connection"),
            Self::Closed => f.write_str("the host closed the vsock connection"),
        }
    }
}

impl From<virtio_drivers::Error> for VsockError {
    fn from(e: virtio_drivers::Error) -> Self {
        Self::Device(e)
    }
}

type Manager = VsockConnectionManager<GuestHal, LeanMmio, RX_BUFFER_SIZE>;

/// The vsock device, driven from this (single) guest thread.
pub struct Vsock {
    manager: Manager,
    next_port: u32,
    spin_ticks: u64,
    preempted_ticks: u64,
    spin: Spin,
    tsc_khz: u64,
    /// Bytes [`Vsock::send_soon`] queued for `deferred_conn`: they leave (as few packets as
    /// fit) before the guest next waits for the device, or when their connection sends
    /// again, so that a response's head, body and end cost one notify, not three.
    deferred: Vec<u8>,
    deferred_conn: Option<Connection>,
    /// When the first deferred byte was queued (TSC).
    deferred_since: u64,
    /// A deferred send that failed while the guest was waiting for something else: the
    /// connection's next send reports it.
    deferred_failure: Option<(Connection, VsockError)>,
}

/// One device used by several connections of this (single-threaded) guest.
pub type SharedVsock = Rc<RefCell<Vsock>>;

/// A connection: the peer and our local port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    peer: VsockAddr,
    local_port: u32,
}

impl Vsock {
    /// Initialises the device (the one time its registers are touched; a pre-booted guest's
    /// first call takes the device it brought up before its launch, see
    /// [`bring_up_before_launch`]); `present` says whether the VMM gave the VM one
    /// (`BOOT_FLAG_VSOCK`, see [`present`]).
    pub fn init(present: bool, tsc_khz: u64) -> Result<Self, VsockError> {
        if !present {
            return Err(VsockError::NoDevice);
        }
        if let Some(ready) = BEFORE_LAUNCH.0.borrow_mut().take() {
            return Ok(ready);
        }
        let base = NonNull::new(VSOCK_MMIO_GPA as *mut u8).expect("non-zero MMIO address");
        // SAFETY: the VMM maps a virtio-mmio register page of VSOCK_MMIO_SIZE bytes at this
        // address (user, uncached) when BOOT_FLAG_VSOCK is set, freshly reset, and nothing
        // else uses it.
        let mut transport = unsafe { LeanMmio::new(base, VSOCK_MMIO_SIZE as usize) }
            .map_err(|_| VsockError::Device(virtio_drivers::Error::IoError))?;
        let tsc_khz = tsc_khz.max(1);
        transport.set_tsc_khz(tsc_khz);
        let driver = VirtIOSocket::<GuestHal, _, RX_BUFFER_SIZE>::new(transport)?;
        let manager = VsockConnectionManager::new_with_capacity(driver, CONNECTION_BUFFER);
        Ok(Self {
            manager,
            next_port: GUEST_EPHEMERAL_PORT_BASE,
            spin_ticks: SPIN_US * tsc_khz / 1000,
            preempted_ticks: PREEMPTED_US * tsc_khz / 1000,
            spin: Spin::new(tsc_khz),
            tsc_khz,
            deferred: Vec::new(),
            deferred_conn: None,
            deferred_since: 0,
            deferred_failure: None,
        })
    }

    /// Connects to `port` on the host and waits for the answer.
    pub fn connect(&mut self, port: u32) -> Result<Connection, VsockError> {
        let peer = VsockAddr { cid: HOST_CID, port };
        let local_port = self.next_port;
        self.next_port = self.next_port.checked_add(1).unwrap_or(GUEST_EPHEMERAL_PORT_BASE);
        self.manager.connect(peer, local_port)?;
        let conn = Connection { peer, local_port };
        loop {
            let event = self.next_event()?;
            if !conn.matches(&event) {
                continue;
            }
            match event.event_type {
                VsockEventType::Connected => return Ok(conn),
                VsockEventType::Disconnected { .. } => return Err(VsockError::Refused),
                _ => {}
            }
        }
    }

    /// Accepts host-initiated connections to `port` from now on.
    pub fn listen(&mut self, port: u32) {
        self.manager.listen(port);
    }

    /// Waits for a host-initiated connection to a port given to [`Vsock::listen`].
    pub fn accept(&mut self) -> Result<Connection, VsockError> {
        loop {
            let event = self.next_event()?;
            if let VsockEventType::ConnectionRequest = event.event_type {
                return Ok(Connection { peer: event.source, local_port: event.destination.port });
            }
        }
    }

    /// Sends all of `bytes` now (after whatever `conn` deferred, in the same packets).
    pub fn send(&mut self, conn: Connection, bytes: &[u8]) -> Result<(), VsockError> {
        self.send_soon(conn, bytes)?;
        self.send_deferred(conn)
    }

    /// Queues `bytes` for `conn`: they are sent before the guest next waits for the device,
    /// with `conn`'s next [`Vsock::send`] or [`Vsock::send_deferred`], or at once when a
    /// packet's worth is queued or the oldest queued byte is a millisecond old. A failure of a
    /// send made while waiting for another connection is reported by `conn`'s next call.
    pub fn send_soon(&mut self, conn: Connection, bytes: &[u8]) -> Result<(), VsockError> {
        self.take_failure(conn)?;
        if self.deferred_conn.is_some_and(|c| c != conn) {
            self.push_deferred();
        }
        if self.deferred.is_empty() {
            self.deferred_since = rdtsc();
        }
        self.deferred_conn = Some(conn);
        self.deferred.extend_from_slice(bytes);
        let age_us = rdtsc().saturating_sub(self.deferred_since) * 1000 / self.tsc_khz;
        if self.deferred.len() >= DEFER_MAX || age_us >= DEFER_MAX_US { self.send_deferred(conn) } else { Ok(()) }
    }

    /// Sends what `conn` deferred, now.
    pub fn send_deferred(&mut self, conn: Connection) -> Result<(), VsockError> {
        self.take_failure(conn)?;
        if self.deferred_conn != Some(conn) {
            return Ok(());
        }
        self.deferred_conn = None;
        let bytes = core::mem::take(&mut self.deferred);
        let sent = self.send_all(conn, &bytes);
        self.deferred = bytes;
        self.deferred.clear();
        sent
    }

    /// Sends whatever any connection deferred (before the guest waits); a failure is kept
    /// for that connection's next call.
    pub fn push_deferred(&mut self) {
        if let Some(conn) = self.deferred_conn
            && let Err(e) = self.send_deferred(conn)
        {
            self.deferred_failure = Some((conn, e));
        }
    }

    fn take_failure(&mut self, conn: Connection) -> Result<(), VsockError> {
        match self.deferred_failure {
            Some((failed, e)) if failed == conn => {
                self.deferred_failure = None;
                Err(e)
            }
            _ => Ok(()),
        }
    }

    fn send_all(&mut self, conn: Connection, bytes: &[u8]) -> Result<(), VsockError> {
        for chunk in bytes.chunks(wasmvisor_abi::vsock::MAX_PACKET_PAYLOAD as usize) {
            loop {
                match self.manager.send(conn.peer, conn.local_port, chunk) {
                    Ok(()) => break,
                    // No credit: wait for the host to free some.
                    Err(virtio_drivers::Error::SocketDeviceError(
                        virtio_drivers::device::socket::SocketError::InsufficientBufferSpaceInPeer,
                    )) => {
                        self.next_event()?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Appends whatever has arrived on `conn` to `out`, waiting for at least one byte.
    pub fn recv_some(&mut self, conn: Connection, out: &mut Vec<u8>) -> Result<(), VsockError> {
        loop {
            let start = out.len();
            let available = self.manager.recv_buffer_available_bytes(conn.peer, conn.local_port)?;
            if available > 0 {
                out.resize(start + available, 0);
                let n = self.manager.recv(conn.peer, conn.local_port, &mut out[start..])?;
                out.truncate(start + n);
                if n > 0 {
                    return Ok(());
                }
            }
            let event = self.next_event()?;
            if conn.matches(&event) && matches!(event.event_type, VsockEventType::Disconnected { .. }) {
                return Err(VsockError::Closed);
            }
        }
    }

    /// The next event from the device: polls the used ring for a while (if [`Spin`] says
    /// so), then sleeps in the `WaitDevice` hypercall until the device has used buffers.
    ///
    /// A spin that finds itself descheduled (two polls further apart than
    /// [`PREEMPTED_US`]) sleeps at once: the host's core is wanted by others, likely by the
    /// very threads that would bring the event, and spinning on would only delay them.
    fn next_event(&mut self) -> Result<VsockEvent, VsockError> {
        self.push_deferred();
        let mut last = rdtsc();
        let mut spin_until = if self.spin.allowed(last) { last + self.spin_ticks } else { 0 };
        // When a spin ran out of time undisturbed: judged once the event comes.
        let mut ran_out = None;
        loop {
            if let Some(event) = self.manager.poll()? {
                if spin_until != 0 {
                    self.spin.ended(true, last);
                } else if let Some(at) = ran_out {
                    self.spin.ran_out(at, rdtsc());
                }
                return Ok(event);
            }
            let now = rdtsc();
            let preempted = now.saturating_sub(last) > self.preempted_ticks;
            last = now;
            if now < spin_until && !preempted {
                core::hint::spin_loop();
                continue;
            }
            if spin_until != 0 && preempted {
                self.spin.ended(false, now);
            } else if spin_until != 0 {
                ran_out = Some(now);
            }
            let _ = hypercall::call(Hypercall::WaitDevice { timeout_ns: WAIT_NS });
            spin_until = 0;
            last = rdtsc();
        }
    }
}

/// Whether a wait for the device spins first. A spin that catches its event saves a sleep
/// and a wake-up (an exit and two host thread switches), but only while the host has a core
/// to spare. When it has not, the spinning vCPU is one more thread wanting a core, and the
/// threads that would bring its event (the VMM's device thread, the daemon) wait for it or
/// preempt it, where a sleeping vCPU would have left them the core. Beside a neighbour
/// spinning on this 2-core host a fixed 200 us spin doubled an HTTP tenant's p99; no spin
/// at all kept it at 1.2x, but cost 40% more at p50 unloaded.
///
/// So spins are judged in windows of [`SPIN_WINDOW`]. A spin misses when it is descheduled
/// or runs out of time with its event [`SPIN_NEAR_MS`] away; unloaded here ~5% of spins
/// missed, beside the spinner ~25% (11% descheduled, 14% out of time). A window with
/// [`SPIN_MISSED_MAX`] misses pauses spinning for [`SPIN_PAUSE_MIN_MS`], doubled by each
/// contended window after a pause (up to [`SPIN_PAUSE_MAX_MS`]) and halved by each calm
/// one. Beside the spinner the HTTP tenant's p99 is then 1.3-1.8x its unloaded figure, and
/// unloaded it spins as before. The clock is the TSC.
#[derive(Debug)]
struct Spin {
    /// Spins in this window, and how many of them missed their event.
    spins: u32,
    missed: u32,
    /// The current pause, in TSC ticks (0: none).
    pause: u64,
    /// No spinning before this TSC value.
    quiet_until: u64,
    tsc_khz: u64,
}

impl Spin {
    fn new(tsc_khz: u64) -> Self {
        Self { spins: 0, missed: 0, pause: 0, quiet_until: 0, tsc_khz }
    }

    /// Whether a wait starting at `now` spins.
    fn allowed(&self, now: u64) -> bool {
        now >= self.quiet_until
    }

    /// A spin ran out of time at `at` and its event came at `now`: a miss if the event came
    /// soon after ([`SPIN_NEAR_MS`]), and not a judgement of the host if not (the guest was
    /// idle, say an HTTP VM between requests).
    fn ran_out(&mut self, at: u64, now: u64) {
        if now.saturating_sub(at) < SPIN_NEAR_MS * self.tsc_khz {
            self.ended(false, now);
        }
    }

    /// A spin ended at `now`, having caught its event or not.
    fn ended(&mut self, caught: bool, now: u64) {
        self.spins += 1;
        self.missed += u32::from(!caught);
        let (min, max) = (SPIN_PAUSE_MIN_MS * self.tsc_khz, SPIN_PAUSE_MAX_MS * self.tsc_khz);
        if self.missed >= SPIN_MISSED_MAX {
            self.pause = (self.pause * 2).clamp(min, max);
            self.quiet_until = now + self.pause;
        } else if self.spins >= SPIN_WINDOW {
            self.pause /= 2;
            if self.pause < min {
                self.pause = 0;
            }
        } else {
            return;
        }
        self.spins = 0;
        self.missed = 0;
    }
}

impl Connection {
    fn matches(&self, event: &VsockEvent) -> bool {
        event.source == self.peer && event.destination.port == self.local_port
    }
}

/// Why a capability call failed before the provider answered.
#[derive(Debug)]
pub enum CallError {
    /// The transport failed.
    Vsock(VsockError),
    /// The host's answer was not a valid response.
    Protocol(DecodeError),
    /// The answer was for another request.
    WrongId,
    /// The request is too large to send.
    TooLarge,
}

impl core::fmt::Display for CallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Vsock(e) => write!(f, "{e}"),
            Self::Protocol(e) => write!(f, "capability broker: {e}"),
            Self::WrongId => f.write_str("capability broker answered another request"),
            Self::TooLarge => {
                write!(f, "capability request larger than {} bytes", capability::MAX_FRAME_LEN)
            }
        }
    }
}

/// A connection to the host's capability broker, carrying one request at a time.
pub struct CapabilityClient {
    vsock: SharedVsock,
    conn: Connection,
    next_id: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

impl CapabilityClient {
    /// Brings the device up and connects to the broker.
    pub fn connect(present: bool, tsc_khz: u64) -> Result<Self, VsockError> {
        Self::connect_on(Rc::new(RefCell::new(Vsock::init(present, tsc_khz)?)))
    }

    /// Connects to the broker over a device that is already up.
    pub fn connect_on(vsock: SharedVsock) -> Result<Self, VsockError> {
        let conn = vsock.borrow_mut().connect(CAPABILITY_PORT)?;
        Ok(Self { vsock, conn, next_id: 1, send_buf: Vec::new(), recv_buf: Vec::new() })
    }

    /// A client on an existing connection to the broker.
    pub fn over(vsock: Vsock, conn: Connection) -> Self {
        Self { vsock: Rc::new(RefCell::new(vsock)), conn, next_id: 1, send_buf: Vec::new(), recv_buf: Vec::new() }
    }

    /// Sends `request`, waits for its response and hands the outcome to `f`.
    pub fn call<R>(
        &mut self,
        request: &Request<'_>,
        f: impl FnOnce(Result<Reply<'_>, CapError<'_>>) -> R,
    ) -> Result<R, CallError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.send_buf.clear();
        encode_request(id, request, &mut self.send_buf).map_err(|_| CallError::TooLarge)?;
        let mut vsock = self.vsock.borrow_mut();
        vsock.send(self.conn, &self.send_buf).map_err(CallError::Vsock)?;
        let len = loop {
            match split_frame(&self.recv_buf).map_err(CallError::Protocol)? {
                Some((_, len)) => break len,
                None => vsock.recv_some(self.conn, &mut self.recv_buf).map_err(CallError::Vsock)?,
            }
        };
        drop(vsock);
        let outcome = match decode_response(&self.recv_buf[FRAME_HEADER_LEN..len]) {
            Err(e) => Err(CallError::Protocol(e)),
            Ok(response) if response.id != id => Err(CallError::WrongId),
            Ok(response) => Ok(f(response.result)),
        };
        self.recv_buf.drain(..len);
        outcome
    }
}
