//! A virtio-mmio (version 2) transport for `virtio-drivers` that writes a register only when
//! the write changes something.
//!
//! Every register write here is an emulated MMIO exit (~50-75 µs under PVM); reads are free,
//! served from a read-only page the VMM keeps current. virtio-drivers' own `MmioTransport`
//! writes everything the specification allows, 43 writes to bring the vsock device up. This one
//! knows the state a freshly reset device is in (selectors 0, status 0, address registers 0),
//! keeps the selectors it wrote, skips the high halves of queue addresses (the guest's RAM is
//! below 4 GiB, and they reset to 0), and leaves the event queue alone entirely: the device
//! never sends events (it has no transport reset to announce), and activates without it. The
//! result is 17 writes, each one the device needs.
//!
//! A notify of the TX queue also waits for the device to take the buffer (see
//! [`LeanMmio::notify`]), spinning briefly and then sleeping in `WaitDevice`, where
//! virtio-drivers would spin until then.

use core::ptr::NonNull;

use crate::rdtsc;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Register offsets (virtio 1.x, 4.2.2).
mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    pub const CONFIG: usize = 0x100;
}

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The queue this transport never sets up (the vsock event queue).
const SKIPPED_QUEUE: u16 = wasmvisor_abi::vsock::EVENT_QUEUE;
const TX_QUEUE: u16 = wasmvisor_abi::vsock::TX_QUEUE;

/// Why the register page is not a usable device.
#[derive(Debug)]
pub enum ProbeError {
    /// Not a virtio-mmio version 2 device.
    NotVirtio,
}

/// The transport over one register page.
pub struct LeanMmio {
    base: NonNull<u8>,
    size: usize,
    device_type: DeviceType,
    /// The selectors as last written (a reset device has them at 0).
    queue_sel: u16,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// Queues set up (bit per queue), answered without asking the device.
    ready: u32,
    /// The TX queue's available and used indices (in its driver and device areas), while the
    /// queue is set up.
    tx_idx: Option<(NonNull<u16>, NonNull<u16>)>,
    /// How long a TX notify spins before it sleeps, and the gap between two polls that means
    /// the vCPU was descheduled, in TSC ticks (see [`LeanMmio::set_tsc_khz`]).
    tx_spin_ticks: u64,
    preempted_ticks: u64,
}

/// How long a TX notify polls for the device to take the buffer before it sleeps
/// (microseconds). The device thread takes a packet in ~25 us when it has a core; when it has
/// not (the host's cores all busy), polling on only keeps the core from it.
const TX_SPIN_US: u64 = 50;
/// A gap between two polls of a ring longer than this (microseconds) means the vCPU was
/// descheduled meanwhile.
pub(crate) const PREEMPTED_US: u64 = 20;
/// Longest single sleep of a TX notify (the device's wake-up is a flag and never lost; this
/// only bounds a look at the ring).
const TX_WAIT_NS: u64 = 10_000_000;

impl LeanMmio {
    /// A transport for the device at `base` (a register page of `size` bytes).
    ///
    /// # Safety
    ///
    /// `base` must point at a virtio-mmio register page of `size` bytes that stays mapped for
    /// the transport's life and that nothing else uses; the device must be freshly reset.
    pub unsafe fn new(base: NonNull<u8>, size: usize) -> Result<Self, ProbeError> {
        if size < reg::CONFIG {
            return Err(ProbeError::NotVirtio);
        }
        let mut t = Self {
            base,
            size,
            device_type: DeviceType::Socket,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            ready: 0,
            tx_idx: None,
            tx_spin_ticks: 0,
            preempted_ticks: 0,
        };
        if t.read(reg::MAGIC) != MAGIC || t.read(reg::VERSION) != 2 {
            return Err(ProbeError::NotVirtio);
        }
        t.device_type = DeviceType::try_from(t.read(reg::DEVICE_ID)).map_err(|_| ProbeError::NotVirtio)?;
        Ok(t)
    }

    /// Sets the TSC rate the TX notify's spin is timed by (until then it sleeps at once).
    pub fn set_tsc_khz(&mut self, tsc_khz: u64) {
        self.tx_spin_ticks = TX_SPIN_US * tsc_khz / 1000;
        self.preempted_ticks = PREEMPTED_US * tsc_khz / 1000;
    }

    /// Waits until the device has used every buffer the driver made available in the TX
    /// queue (the used index has caught up with the available one; one the device took
    /// before this looked counts, so no race with a device pass already under way): polls
    /// for [`TX_SPIN_US`] unless descheduled, then sleeps in `WaitDevice` (the device wakes
    /// it when it places used buffers) between looks.
    fn wait_tx_used(&self, avail: NonNull<u16>, used: NonNull<u16>) {
        // SAFETY: both are indices of the TX queue's rings, in DMA memory the driver allocated
        // and keeps while the queue is set up (`tx_idx` is cleared at `queue_unset`); the
        // driver wrote the available one before notifying, the device writes the used one,
        // hence volatile reads.
        let pending = || unsafe { avail.as_ptr().read_volatile() != used.as_ptr().read_volatile() };
        let start = rdtsc();
        let mut last = start;
        while pending() {
            let now = rdtsc();
            let descheduled = now.saturating_sub(last) > self.preempted_ticks;
            last = now;
            if now.saturating_sub(start) < self.tx_spin_ticks && !descheduled {
                core::hint::spin_loop();
                continue;
            }
            let _ = crate::hypercall::call(wasmvisor_abi::hypercall::Hypercall::WaitDevice { timeout_ns: TX_WAIT_NS });
            last = rdtsc();
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `offset` is a register offset below the page's size (checked at `new` for
        // every offset used here, all below 0x100); the page is mapped for our life.
        unsafe { self.base.as_ptr().add(offset).cast::<u32>().read_volatile() }
    }

    fn write(&mut self, offset: usize, value: u32) {
        // SAFETY: as in `read`; a register write is the device's interface.
        unsafe { self.base.as_ptr().add(offset).cast::<u32>().write_volatile(value) }
    }

    fn select_queue(&mut self, queue: u16) {
        if self.queue_sel != queue {
            self.write(reg::QUEUE_SEL, queue.into());
            self.queue_sel = queue;
        }
    }
}

impl Transport for LeanMmio {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        if self.device_features_sel != 0 {
            self.write(reg::DEVICE_FEATURES_SEL, 0);
            self.device_features_sel = 0;
        }
        let low = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        self.device_features_sel = 1;
        low | (u64::from(self.read(reg::DEVICE_FEATURES)) << 32)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        // Driver features reset to 0: only non-zero halves are written.
        for (sel, half) in [(0u32, driver_features as u32), (1, (driver_features >> 32) as u32)] {
            if half == 0 {
                continue;
            }
            if self.driver_features_sel != sel {
                self.write(reg::DRIVER_FEATURES_SEL, sel);
                self.driver_features_sel = sel;
            }
            self.write(reg::DRIVER_FEATURES, half);
        }
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        if queue == SKIPPED_QUEUE {
            // Allocated by the driver, never given to the device.
            return u32::from(wasmvisor_abi::vsock::QUEUE_SIZE_MAX);
        }
        self.select_queue(queue);
        self.read(reg::QUEUE_NUM_MAX)
    }

    /// Notifies the device of new buffers in `queue`. For the TX queue it returns once the
    /// device has used a buffer: virtio-drivers sends synchronously, polling the used ring right
    /// after this without end, which on a host with no core to spare keeps the vCPU from
    /// yielding to the device thread that would take the packet.
    fn notify(&mut self, queue: u16) {
        if queue == SKIPPED_QUEUE {
            return;
        }
        self.write(reg::QUEUE_NOTIFY, queue.into());
        if let Some((avail, used)) = self.tx_idx.filter(|_| queue == TX_QUEUE) {
            self.wait_tx_used(avail, used);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.read(reg::STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        // A reset of a device that is reset already changes nothing.
        if status.is_empty() && self.read(reg::STATUS) == 0 {
            return;
        }
        self.write(reg::STATUS, status.bits());
        if status.is_empty() {
            self.queue_sel = 0;
            self.device_features_sel = 0;
            self.driver_features_sel = 0;
            self.ready = 0;
        }
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if queue == SKIPPED_QUEUE {
            self.ready |= 1 << queue;
            return;
        }
        self.select_queue(queue);
        self.write(reg::QUEUE_NUM, size);
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, descriptors),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, driver_area),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, device_area),
        ] {
            self.write(low, addr as u32);
            if addr >> 32 != 0 {
                self.write(high, (addr >> 32) as u32);
            }
        }
        self.write(reg::QUEUE_READY, 1);
        self.ready |= 1 << queue;
        if queue == TX_QUEUE {
            // Each ring's index follows its 16-bit flags (virtio 1.x, 2.7.6 and 2.7.8); guest
            // addresses are the guest's virtual ones (identity-mapped).
            self.tx_idx = NonNull::new((driver_area + 2) as *mut u16).zip(NonNull::new((device_area + 2) as *mut u16));
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        self.ready &= !(1 << queue);
        if queue == TX_QUEUE {
            self.tx_idx = None;
        }
        if queue == SKIPPED_QUEUE {
            return;
        }
        self.select_queue(queue);
        self.write(reg::QUEUE_READY, 0);
        for offset in [
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DESC_HIGH,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
        ] {
            self.write(offset, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.ready & (1 << queue) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let pending = self.read(reg::INTERRUPT_STATUS);
        if pending != 0 {
            self.write(reg::INTERRUPT_ACK, pending);
        }
        InterruptStatus::from_bits_truncate(pending)
    }

    fn read_config_generation(&self) -> u32 {
        self.read(reg::CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        if !offset.is_multiple_of(align_of::<T>()) || align_of::<T>() > 4 {
            return Err(Error::InvalidParam);
        }
        let start = reg::CONFIG + offset;
        if start + size_of::<T>() > self.size {
            return Err(Error::ConfigSpaceTooSmall);
        }
        // SAFETY: in bounds of the mapped page (checked) and aligned for `T` (the page is
        // page-aligned, the offset a multiple of T's alignment); any bytes are a valid `T`
        // (`FromBytes`); reading config space has no side effects.
        Ok(unsafe { self.base.as_ptr().add(start).cast::<T>().read_volatile() })
    }

    fn write_config_space<T: IntoBytes + Immutable>(&mut self, offset: usize, value: T) -> Result<(), Error> {
        if !offset.is_multiple_of(align_of::<T>()) || align_of::<T>() > 4 {
            return Err(Error::InvalidParam);
        }
        let start = reg::CONFIG + offset;
        if start + size_of::<T>() > self.size {
            return Err(Error::ConfigSpaceTooSmall);
        }
        // SAFETY: as in `read_config_space`; a config write is the device's interface.
        unsafe { self.base.as_ptr().add(start).cast::<T>().write_volatile(value) };
        Ok(())
    }
}
