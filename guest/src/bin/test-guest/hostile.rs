//! A hostile vsock driver: it programs the virtio-mmio registers and builds its rings by hand
//! so that it can post what no honest driver would (descriptors outside RAM, loops, oversized
//! packets, a runaway avail index) and check that the VMM fails the device with a reason,
//! recovers on reset and keeps serving.

use alloc::alloc::{Layout, alloc_zeroed};
use alloc::vec::Vec;

use wasmvisor_guest::abi::hypercall::Hypercall;
use wasmvisor_guest::abi::vsock::{CAPABILITY_PORT, GUEST_CID, HOST_CID, RX_QUEUE, TX_QUEUE, VSOCK_MMIO_GPA};
use wasmvisor_guest::{hypercall, println};

const STATUS: u64 = 0x70;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_DESC: u64 = 0x80;
const QUEUE_DRIVER: u64 = 0x90;
const QUEUE_DEVICE: u64 = 0xa0;
const NEEDS_RESET: u32 = 0x40;
const DRIVER_OK: u32 = 4;
const SIZE: u16 = 8;
const HDR: usize = 44;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn reg_read(off: u64) -> u32 {
    // SAFETY: the vsock register page is mapped (the VM was started with the device).
    unsafe { core::ptr::read_volatile((VSOCK_MMIO_GPA + off) as *const u32) }
}

fn reg_write(off: u64, v: u32) {
    // SAFETY: as for `reg_read`; the device validates every value.
    unsafe { core::ptr::write_volatile((VSOCK_MMIO_GPA + off) as *mut u32, v) }
}

fn page() -> *mut u8 {
    // SAFETY: a non-zero, page-aligned layout.
    let p = unsafe { alloc_zeroed(Layout::from_size_align(4096, 4096).expect("layout")) };
    assert!(!p.is_null(), "out of memory");
    p
}

/// One split virtqueue in guest memory.
struct Ring {
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    next_avail: u16,
}

impl Ring {
    fn new() -> Self {
        Self { desc: page(), avail: page(), used: page(), next_avail: 0 }
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: `desc` is a page we own; index < 256 keeps it inside (16 bytes each).
        unsafe {
            let d = self.desc.add(usize::from(i) * 16);
            core::ptr::write_volatile(d.cast::<u64>(), addr);
            core::ptr::write_volatile(d.add(8).cast::<u32>(), len);
            core::ptr::write_volatile(d.add(12).cast::<u16>(), flags);
            core::ptr::write_volatile(d.add(14).cast::<u16>(), next);
        }
    }

    /// Publishes descriptor `head` and sets the avail index to `idx` (normally one more).
    fn publish(&mut self, head: u16, idx: u16) {
        // SAFETY: `avail` is a page we own: flags, idx, ring[SIZE].
        unsafe {
            let slot = usize::from(self.next_avail % SIZE);
            core::ptr::write_volatile(self.avail.add(4 + 2 * slot).cast::<u16>(), head);
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            core::ptr::write_volatile(self.avail.add(2).cast::<u16>(), idx);
        }
        self.next_avail = idx;
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: `used` is a page we own, written by the device.
        unsafe { core::ptr::read_volatile(self.used.add(2).cast::<u16>()) }
    }

    fn program(&self, queue: u16) {
        reg_write(QUEUE_SEL, u32::from(queue));
        reg_write(QUEUE_NUM, u32::from(SIZE));
        for (off, p) in [(QUEUE_DESC, self.desc), (QUEUE_DRIVER, self.avail), (QUEUE_DEVICE, self.used)] {
            reg_write(off, p as u64 as u32);
            reg_write(off + 4, (p as u64 >> 32) as u32);
        }
        reg_write(QUEUE_READY, 1);
    }
}

struct Raw {
    rx: Ring,
    tx: Ring,
    buffers: Vec<*mut u8>,
}

/// Resets the device and brings it up with fresh rings and RX buffers.
fn init() -> Raw {
    reg_write(STATUS, 0);
    reg_write(STATUS, 1);
    reg_write(STATUS, 1 | 2);
    reg_write(DRIVER_FEATURES_SEL, 1);
    reg_write(DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    reg_write(DRIVER_FEATURES_SEL, 0);
    reg_write(DRIVER_FEATURES, 0);
    reg_write(STATUS, 1 | 2 | 8);
    let mut raw = Raw { rx: Ring::new(), tx: Ring::new(), buffers: Vec::new() };
    raw.rx.program(RX_QUEUE);
    raw.tx.program(TX_QUEUE);
    for i in 0..SIZE {
        let buf = page();
        raw.rx.set_desc(i, buf as u64, 4096, F_WRITE, 0);
        raw.rx.publish(i, i + 1);
        raw.buffers.push(buf);
    }
    reg_write(STATUS, 1 | 2 | 8 | DRIVER_OK);
    raw
}

fn header(op: u16, src_cid: u64, dst_port: u32, len: u32) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
    h[16..20].copy_from_slice(&50000u32.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&1u16.to_le_bytes());
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&65536u32.to_le_bytes());
    h
}

/// Copies `bytes` into a fresh page and returns its address.
fn stage(bytes: &[u8]) -> u64 {
    let p = page();
    // SAFETY: `p` is a fresh page of 4096 bytes; `bytes` is at most that long.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len().min(4096)) };
    p as u64
}

fn notify(queue: u16) {
    reg_write(QUEUE_NOTIFY, u32::from(queue));
}

/// Waits up to ~1 s for `done`, sleeping in `WaitDevice` between looks.
fn await_until(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if done() {
            return true;
        }
        let _ = hypercall::call(Hypercall::WaitDevice { timeout_ns: 1_000_000 });
    }
    done()
}

/// The op of the first packet the device put in RX buffer `i`.
fn rx_op(raw: &Raw, i: usize) -> u16 {
    // SAFETY: the buffer is a page we own; the device wrote a header at its start.
    unsafe { core::ptr::read_volatile(raw.buffers[i].add(30).cast::<u16>()) }
}

/// Staged packets and the RAM size, for the attacks.
struct Addrs {
    /// A REQUEST to the broker.
    valid: u64,
    /// An RW header announcing 1 MiB of data.
    huge: u64,
    /// An RW header announcing 16 bytes.
    rw16: u64,
    /// Bytes of RAM.
    mem: u64,
}

/// Runs every attack; returns the exit code (0 when the VMM behaved).
pub fn run(memory_size: u64) -> u8 {
    // This driver resets and drives the registers itself.
    wasmvisor_guest::vsock::forget_before_launch();
    let mut failures = 0u32;
    let mut check = |what: &str, ok: bool| {
        println!("{what}: {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failures += 1;
        }
    };

    // Control: an honest connection request through the hand-built rings gets RESPONSE.
    let mut raw = init();
    raw.tx.set_desc(0, stage(&header(1, GUEST_CID, CAPABILITY_PORT, 0)), HDR as u32, 0, 0);
    raw.tx.publish(0, 1);
    notify(TX_QUEUE);
    let answered = await_until(|| raw.rx.used_idx() >= 1);
    check("control: REQUEST to the broker is answered with RESPONSE", answered && rx_op(&raw, 0) == 2);

    // Protocol abuse on one connection is answered with RST; the device stays up.
    let mut raw = init();
    raw.tx.set_desc(0, stage(&header(5, GUEST_CID, 9999, 0)), HDR as u32, 0, 0);
    raw.tx.publish(0, 1);
    raw.tx.set_desc(1, stage(&header(1, 7, CAPABILITY_PORT, 0)), HDR as u32, 0, 0);
    raw.tx.publish(1, 2);
    raw.tx.set_desc(2, stage(&header(1, GUEST_CID, 4321, 0)), HDR as u32, 0, 0);
    raw.tx.publish(2, 3);
    notify(TX_QUEUE);
    let answered = await_until(|| raw.rx.used_idx() >= 3);
    let resets = answered && (0..3).all(|i| rx_op(&raw, i) == 3);
    check("data for no connection, a foreign source CID, a closed port: each reset", resets);
    check("  ...and the device is still up", reg_read(STATUS) & NEEDS_RESET == 0);

    // Malformed descriptor chains: each must fail the device (NEEDS_RESET), not the VMM.
    let a = Addrs {
        valid: stage(&header(1, GUEST_CID, CAPABILITY_PORT, 0)),
        huge: stage(&header(5, GUEST_CID, CAPABILITY_PORT, 1 << 20)),
        rw16: stage(&header(5, GUEST_CID, CAPABILITY_PORT, 16)),
        mem: memory_size,
    };
    type Attack = (&'static str, fn(&mut Raw, &Addrs));
    let attacks: [Attack; 8] = [
        ("header outside RAM", |r, a| r.tx.set_desc(0, a.mem + 0x1000, HDR as u32, 0, 0)),
        ("address that overflows", |r, _| r.tx.set_desc(0, u64::MAX - 8, HDR as u32, 0, 0)),
        ("header shorter than a packet header", |r, a| r.tx.set_desc(0, a.valid, 10, 0, 0)),
        ("write-only descriptor on TX", |r, a| r.tx.set_desc(0, a.valid, HDR as u32, F_WRITE, 0)),
        ("data buffer crossing the end of RAM", |r, a| {
            r.tx.set_desc(0, a.rw16, HDR as u32, F_NEXT, 1);
            r.tx.set_desc(1, a.mem - 8, 16, 0, 0);
        }),
        ("next index beyond the queue", |r, a| r.tx.set_desc(0, a.rw16, HDR as u32, F_NEXT, 200)),
        ("indirect table outside RAM", |r, a| r.tx.set_desc(0, a.mem + 0x10_0000, 64, F_INDIRECT, 0)),
        ("oversized packet (len 1 MiB)", |r, a| r.tx.set_desc(0, a.huge, HDR as u32 + 64, 0, 0)),
    ];
    for (name, post) in attacks {
        let mut raw = init();
        post(&mut raw, &a);
        raw.tx.publish(0, 1);
        notify(TX_QUEUE);
        check(name, await_until(|| reg_read(STATUS) & NEEDS_RESET != 0));
    }
    {
        // A chain that loops on itself: the device reads no more than a packet needs, so the
        // loop is harmless; the data is for no connection and gets RST.
        let mut raw = init();
        raw.tx.set_desc(0, a.rw16, HDR as u32, F_NEXT, 0);
        raw.tx.publish(0, 1);
        notify(TX_QUEUE);
        let answered = await_until(|| raw.rx.used_idx() >= 1);
        check("a chain that loops on itself is read once and reset", answered && rx_op(&raw, 0) == 3);
    }
    {
        // The avail index runs 100 entries ahead of an 8-entry ring.
        let mut raw = init();
        raw.tx.set_desc(0, a.valid, HDR as u32, 0, 0);
        raw.tx.publish(0, 100);
        notify(TX_QUEUE);
        check("avail index far ahead of the ring", await_until(|| reg_read(STATUS) & NEEDS_RESET != 0));
    }
    {
        // A read-only RX buffer: the device cannot write its answer there.
        reg_write(STATUS, 0);
        let mut raw = init();
        raw.rx.set_desc(0, raw.buffers[0] as u64, 4096, 0, 0);
        raw.tx.set_desc(0, a.valid, HDR as u32, 0, 0);
        raw.tx.publish(0, 1);
        notify(TX_QUEUE);
        check("read-only RX buffer", await_until(|| reg_read(STATUS) & NEEDS_RESET != 0));
    }
    {
        // Rings outside RAM are refused at setup: the queue never becomes ready.
        reg_write(STATUS, 0);
        reg_write(STATUS, 1 | 2);
        reg_write(DRIVER_FEATURES_SEL, 1);
        reg_write(DRIVER_FEATURES, 1);
        reg_write(STATUS, 1 | 2 | 8);
        reg_write(QUEUE_SEL, u32::from(TX_QUEUE));
        reg_write(QUEUE_NUM, u32::from(SIZE));
        reg_write(QUEUE_DESC, 0);
        reg_write(QUEUE_DESC + 4, 0x10);
        reg_write(QUEUE_READY, 1);
        check("rings outside RAM are refused", reg_read(QUEUE_READY) == 0);
        // Garbage register traffic: ignored.
        // SAFETY: byte and misaligned accesses to the mapped register page; the device ignores them.
        unsafe {
            core::ptr::write_volatile((VSOCK_MMIO_GPA + 0x71) as *mut u8, 0xff);
            core::ptr::write_volatile((VSOCK_MMIO_GPA + 0x800) as *mut u32, 0xdead_beef);
            core::ptr::write_volatile((VSOCK_MMIO_GPA + 0x100) as *mut u32, 7);
        }
        reg_write(STATUS, 1 | 2 | 8 | DRIVER_OK | NEEDS_RESET);
        check("the driver cannot set NEEDS_RESET or go live without queues", reg_read(STATUS) & DRIVER_OK == 0);
    }

    // After all that, a reset device serves an honest driver.
    reg_write(STATUS, 0);
    match wasmvisor_guest::vsock::CapabilityClient::connect(true, 1_000_000) {
        Ok(mut client) => {
            let r = client.call(&wasmvisor_guest::abi::capability::Request::Noop, |r| r.is_ok());
            check("an honest driver after a reset: no-op round trip", matches!(r, Ok(true)));
        }
        Err(e) => {
            println!("an honest driver after a reset: connect failed: {e}");
            failures += 1;
        }
    }
    println!("hostile: {failures} failures");
    u8::from(failures > 0)
}
