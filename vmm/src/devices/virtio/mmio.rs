//! The virtio-mmio transport, version 2 ("modern", virtio 1.x section 4.2.2): the register
//! page a driver reads and writes, the device status state machine, feature negotiation and
//! queue configuration.
//!
//! The transport owns the queues and the status; what the device is (its id, features,
//! configuration space) comes from a [`DeviceInfo`]. Register accesses are untrusted guest
//! input: a write the current state does not allow (queue setup after `DRIVER_OK`, an
//! out-of-range queue size, a misaligned or unknown register) is ignored and counted, never
//! fatal to the VMM. Notifications are not handled here: `QueueNotify` writes reach the
//! device through ioeventfds; [`MmioTransport::write`] reports the ones that did not.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// `MagicValue`: "virt".
const MAGIC: u32 = 0x7472_6976;
/// Transport version 2: virtio 1.x.
const VERSION: u32 = 2;
/// `VendorID`: "wsmv".
const VENDOR: u32 = 0x766d_7377;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// `VIRTIO_F_VERSION_1`: the device is a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a device contributes to its transport.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Virtio device id (19 for vsock).
    pub device_id: u32,
    /// Feature bits offered (the transport adds none of its own).
    pub features: u64,
    /// Largest size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// The configuration space, little-endian, read-only.
    pub config: Vec<u8>,
}

/// What a register write asks of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing beyond the register itself.
    None,
    /// The driver set `DRIVER_OK`: the queues are live.
    Activated,
    /// The driver wrote 0 to `Status`: reset the device.
    Reset,
    /// A queue notification that no ioeventfd caught (the queue index as written).
    Notify(u32),
}

/// A queue's configuration and positions, as a snapshot keeps them: `virtio_queue`'s own
/// state, which [`MmioTransport::restore`] validates as `Queue::try_from` does.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot(#[serde(with = "QueueStateDef")] virtio_queue::QueueState);

/// `virtio_queue::QueueState`'s fields, for serde.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "virtio_queue::QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// The transport's registers and queues, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    queues: Vec<QueueSnapshot>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

/// The register file and queues of one virtio-mmio device.
pub struct MmioTransport {
    info: DeviceInfo,
    /// The queues, in device order.
    pub queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// Register accesses that were refused (bad offset, size or state).
    pub refused_accesses: u64,
}

impl MmioTransport {
    /// A device in its reset state.
    pub fn new(info: DeviceInfo) -> Self {
        let queues = info
            .queue_max_sizes
            .iter()
            .map(|&max| Queue::new(max).expect("queue maximum sizes are powers of two ≤ 32768"))
            .collect();
        Self {
            info,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            refused_accesses: 0,
        }
    }

    /// The registers and queues, for a snapshot.
    pub fn save(&self) -> TransportSnapshot {
        let queues = self.queues.iter().map(|q| QueueSnapshot(q.state())).collect();
        TransportSnapshot {
            queues,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
        }
    }

    /// Takes the registers and queues of `saved` (from [`save`](Self::save) of a device of the
    /// same kind), checked as register writes are: the queue count and sizes must be this
    /// device's, the features a subset of its own, and a ready queue's rings must lie in `mem`.
    /// On refusal nothing changes.
    pub fn restore(&mut self, saved: &TransportSnapshot, mem: &GuestMemoryMmap) -> Result<(), String> {
        if saved.queues.len() != self.queues.len() {
            return Err(format!("{} queues, the device has {}", saved.queues.len(), self.queues.len()));
        }
        if saved.driver_features & !self.info.features != 0 {
            return Err(format!("driver features {:#x} the device does not offer", saved.driver_features));
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (i, (q, max)) in saved.queues.iter().zip(&self.info.queue_max_sizes).enumerate() {
            if q.0.max_size != *max {
                return Err(format!("queue {i} has maximum size {}, the device's is {max}", q.0.max_size));
            }
            let queue = Queue::try_from(q.0).map_err(|e| format!("queue {i}: {e}"))?;
            if queue.ready() && !queue.is_valid(mem) {
                return Err(format!("queue {i}'s rings do not lie in guest memory"));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.status = saved.status;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.driver_features = saved.driver_features;
        self.queue_sel = saved.queue_sel;
        self.config_generation = saved.config_generation;
        Ok(())
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver has set `DRIVER_OK` and the device has not failed since.
    pub fn is_active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Marks the device as needing a reset (virtio 1.x 2.1.2): it stops using its queues
    /// until the driver resets it.
    pub fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
    }

    fn refuse(&mut self, offset: u64, len: usize, write: bool) {
        self.refused_accesses += 1;
        tracing::debug!(offset, len, write, status = self.status, "virtio-mmio: register access refused");
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The value a 32-bit read of the register at `offset` (below the configuration space)
    /// returns, if it is a readable register. Reads have no side effects.
    fn register(&self, offset: u64) -> Option<u32> {
        let queue = self.queues.get(self.queue_sel as usize);
        Some(match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.info.device_id,
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.info.features as u32,
                1 => (self.info.features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            // No interrupts: nothing is ever pending.
            reg::INTERRUPT_STATUS => 0,
            reg::STATUS => self.status,
            // No shared memory regions: length all ones (4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::QUEUE_RESET => 0,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => return None,
        })
    }

    /// Writes what every read of the register page would return into `page` (a copy of the
    /// page the guest reads without exits; see `worker::RegisterPage`). Called after anything
    /// that changes a readable value: every register write, and the device failing.
    pub fn render(&self, page: &mut [u8]) {
        page.fill(0);
        for offset in (0..reg::CONFIG).step_by(4) {
            if let Some(v) = self.register(offset) {
                page[offset as usize..offset as usize + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        let config = reg::CONFIG as usize;
        let n = self.info.config.len().min(page.len().saturating_sub(config));
        page[config..config + n].copy_from_slice(&self.info.config[..n]);
    }

    /// Serves a read of `data.len()` bytes at `offset` within the register page.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            let start = (offset - reg::CONFIG) as usize;
            match self.info.config.get(start..start.saturating_add(data.len())) {
                Some(bytes) => data.copy_from_slice(bytes),
                None => self.refuse(offset, data.len(), false),
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.refuse(offset, data.len(), false);
            return;
        }
        let Some(value) = self.register(offset) else {
            self.refuse(offset, 4, false);
            return;
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Serves a write at `offset`; `mem` validates queue addresses when the driver makes a
    /// queue ready.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) -> WriteEffect {
        if data.len() != 4 || !offset.is_multiple_of(4) || offset >= reg::CONFIG {
            // The vsock configuration space is read-only.
            self.refuse(offset, data.len(), true);
            return WriteEffect::None;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let features_ok = self.status & status::FEATURES_OK != 0;
        let driver_ok = self.status & status::DRIVER_OK != 0;
        // Queue registers may change only between FEATURES_OK and DRIVER_OK, on a queue
        // that is not yet ready (4.2.3.2).
        let queue_setup_allowed = features_ok && !driver_ok && self.selected_queue().is_some_and(|q| !q.ready());
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if !features_ok && self.status & status::DRIVER != 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => self.refuse(offset, 4, true),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if queue_setup_allowed => {
                let q = self.selected_queue().expect("checked by queue_setup_allowed");
                match u16::try_from(value) {
                    Ok(size) if size != 0 && size <= q.max_size() && size.is_power_of_two() => q.set_size(size),
                    _ => self.refuse(offset, 4, true),
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if queue_setup_allowed => {
                let (low, high) = split(offset == reg::QUEUE_DESC_LOW, value);
                self.selected_queue().expect("checked").set_desc_table_address(low, high);
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if queue_setup_allowed => {
                let (low, high) = split(offset == reg::QUEUE_DRIVER_LOW, value);
                self.selected_queue().expect("checked").set_avail_ring_address(low, high);
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if queue_setup_allowed => {
                let (low, high) = split(offset == reg::QUEUE_DEVICE_LOW, value);
                self.selected_queue().expect("checked").set_used_ring_address(low, high);
            }
            reg::QUEUE_READY if value == 1 && queue_setup_allowed => {
                let q = self.selected_queue().expect("checked");
                q.set_ready(true);
                // A queue whose rings are misaligned or not wholly in RAM is never used.
                if !q.is_valid(mem) {
                    q.set_ready(false);
                    self.refuse(offset, 4, true);
                }
            }
            // A queue may be disabled at any time (4.2.2); the device stops using it.
            reg::QUEUE_READY if value == 0 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(false);
                }
            }
            reg::QUEUE_NOTIFY => return WriteEffect::Notify(value),
            // No interrupts, no shared memory: accepted and ignored.
            reg::INTERRUPT_ACK | reg::SHM_SEL => {}
            reg::STATUS => return self.write_status(value),
            _ => self.refuse(offset, 4, true),
        }
        WriteEffect::None
    }

    fn write_status(&mut self, value: u32) -> WriteEffect {
        if value == 0 {
            self.reset();
            return WriteEffect::Reset;
        }
        let old = self.status;
        // The driver may only add bits (2.1.1), and NEEDS_RESET is the device's to set.
        if value & old != old || (value & status::DEVICE_NEEDS_RESET) != (old & status::DEVICE_NEEDS_RESET) {
            self.refuse(reg::STATUS, 4, true);
            return WriteEffect::None;
        }
        let added = value & !old;
        if added & status::FEATURES_OK != 0 {
            let acceptable = self.driver_features & !self.info.features == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0
                && old & status::DRIVER != 0;
            if !acceptable {
                // Leave FEATURES_OK clear: the driver reads it back and gives up (3.1.1).
                self.status = value & !status::FEATURES_OK;
                return WriteEffect::None;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                self.refuse(reg::STATUS, 4, true);
                return WriteEffect::None;
            }
            self.status = value;
            return WriteEffect::Activated;
        }
        self.status = value;
        WriteEffect::None
    }

    /// Back to the reset state: queues forgotten, features and status cleared.
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

/// The (low, high) halves for `set_*_address`.
fn split(low: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if low { (Some(value), None) } else { (None, Some(value)) }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn transport() -> MmioTransport {
        MmioTransport::new(DeviceInfo {
            device_id: 19,
            features: VIRTIO_F_VERSION_1,
            queue_max_sizes: vec![16, 16],
            config: 3u64.to_le_bytes().to_vec(),
        })
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, m: &GuestMemoryMmap, offset: u64, v: u32) -> WriteEffect {
        t.write(offset, &v.to_le_bytes(), m)
    }

    /// The sequence a driver follows (3.1.1), and what the device refuses along the way.
    /// The rendered page says what reads say, register by register, whatever the selections.
    #[test]
    fn the_rendered_page_matches_register_reads() {
        let m = mem();
        let mut t = transport();
        let check = |t: &mut MmioTransport| {
            let mut page = vec![0u8; 4096];
            t.render(&mut page);
            for offset in (0..0x108u64).step_by(4) {
                let before = t.refused_accesses;
                let got = r(t, offset);
                let want = u32::from_le_bytes(page[offset as usize..offset as usize + 4].try_into().unwrap());
                assert_eq!(got, want, "offset {offset:#x}");
                t.refused_accesses = before;
            }
        };
        check(&mut t);
        w(&mut t, &m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, &m, reg::DEVICE_FEATURES_SEL, 1);
        check(&mut t);
        w(&mut t, &m, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, &m, reg::DRIVER_FEATURES, 1);
        w(&mut t, &m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        w(&mut t, &m, reg::QUEUE_SEL, 1);
        w(&mut t, &m, reg::QUEUE_NUM, 4);
        w(&mut t, &m, reg::QUEUE_READY, 1);
        check(&mut t);
        w(&mut t, &m, reg::QUEUE_SEL, 9);
        check(&mut t);
        t.set_needs_reset();
        check(&mut t);
    }

    #[test]
    fn notify_offset_matches_the_abi() {
        assert_eq!(reg::QUEUE_NOTIFY, wasmvisor_abi::vsock::MMIO_QUEUE_NOTIFY);
    }

    #[test]
    fn initialisation_sequence() {
        let m = mem();
        let mut t = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 19);
        w(&mut t, &m, reg::STATUS, status::ACKNOWLEDGE);
        w(&mut t, &m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, &m, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        // Queue setup before FEATURES_OK is refused.
        w(&mut t, &m, reg::QUEUE_NUM, 8);
        assert_eq!(t.refused_accesses, 1);
        // A feature the device does not offer: FEATURES_OK does not stick.
        w(&mut t, &m, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, &m, reg::DRIVER_FEATURES, 1 << 5);
        w(&mut t, &m, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, &m, reg::DRIVER_FEATURES, 1);
        w(&mut t, &m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        w(&mut t, &m, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, &m, reg::DRIVER_FEATURES, 0);
        w(&mut t, &m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Sizes: not a power of two, too big, zero are refused; 8 is taken.
        for bad in [3, 32, 0] {
            w(&mut t, &m, reg::QUEUE_NUM, bad);
        }
        assert_eq!(t.refused_accesses, 4);
        w(&mut t, &m, reg::QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size(), 8);
        // Rings outside RAM: the queue does not become ready.
        w(&mut t, &m, reg::QUEUE_DESC_LOW, 0);
        w(&mut t, &m, reg::QUEUE_DESC_HIGH, 1);
        w(&mut t, &m, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        w(&mut t, &m, reg::QUEUE_DESC_HIGH, 0);
        w(&mut t, &m, reg::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, &m, reg::QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, &m, reg::QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, &m, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // A ready queue cannot be moved.
        w(&mut t, &m, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(w(&mut t, &m, reg::STATUS, all), WriteEffect::Activated);
        assert!(t.is_active());
        // Config space: the CID, byte by byte too.
        assert_eq!(r(&mut t, reg::CONFIG), 3);
        let mut b = [0u8; 1];
        t.read(reg::CONFIG + 8, &mut b);
        assert_eq!(t.refused_accesses, 7);
        // The driver cannot clear bits or set NEEDS_RESET; the device can.
        w(&mut t, &m, reg::STATUS, status::ACKNOWLEDGE);
        w(&mut t, &m, reg::STATUS, all | status::DEVICE_NEEDS_RESET);
        assert_eq!(r(&mut t, reg::STATUS), all);
        t.set_needs_reset();
        assert!(!t.is_active());
        assert_eq!(w(&mut t, &m, reg::QUEUE_NOTIFY, 7), WriteEffect::Notify(7));
        assert_eq!(w(&mut t, &m, reg::STATUS, 0), WriteEffect::Reset);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert!(!t.queues[0].ready());
        // Misaligned or odd-sized accesses are refused, not fatal.
        let before = t.refused_accesses;
        t.write(reg::STATUS + 1, &[1, 0, 0, 0], &m);
        t.write(reg::STATUS, &[1, 0], &m);
        t.read(reg::MAGIC, &mut [0u8; 2]);
        assert_eq!(t.refused_accesses, before + 3);
    }
}
