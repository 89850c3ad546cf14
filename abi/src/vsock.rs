//! virtio-vsock addressing: where the device sits, which context ids each side has, and which
//! ports the host serves (issue 4).
//!
//! The VMM exposes one virtio-mmio (virtio 1.x, "modern") vsock device at
//! [`VSOCK_MMIO_GPA`]. The guest is always [`GUEST_CID`]; the host is [`HOST_CID`]
//! (`VMADDR_CID_HOST`). A guest connection to [`CAPABILITY_PORT`] on the host reaches the
//! capability broker inside the VMM process; a connection to any other host port is forwarded
//! to the Unix socket `<uds>_<port>` when the VMM was given a socket path (Firecracker's
//! hybrid vsock convention), and refused otherwise.

use crate::layout::{MMIO_BASE, PAGE_SIZE};

/// Guest-physical address of the vsock device's virtio-mmio register page.
pub const VSOCK_MMIO_GPA: u64 = MMIO_BASE;
/// Size of that register page.
pub const VSOCK_MMIO_SIZE: u64 = PAGE_SIZE;
/// Offset of the QueueNotify register within the page (virtio 1.x, 4.2.2).
pub const MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// The host's context id (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// The guest's context id (the first one not reserved).
pub const GUEST_CID: u64 = 3;
/// Host port of the capability broker (the capability wire protocol, [`crate::capability`]).
pub const CAPABILITY_PORT: u32 = 1024;
/// Host port an HTTP guest connects to once it is ready to serve: the front door's requests
/// and their responses cross on that one connection, one exchange after another
/// ([`crate::http`]), forwarded to the Unix socket `<uds>_<port>`.
pub const HTTP_PORT: u32 = 1080;
/// First guest port the guest hands out to its own outgoing connections.
pub const GUEST_EPHEMERAL_PORT_BASE: u32 = 49152;
/// Queue indices of the vsock device (virtio 1.x, 5.10.2).
pub const RX_QUEUE: u16 = 0;
/// Driver-to-device packets.
pub const TX_QUEUE: u16 = 1;
/// Device events (transport reset).
pub const EVENT_QUEUE: u16 = 2;
/// Largest queue size the device offers.
pub const QUEUE_SIZE_MAX: u16 = 256;
/// Largest packet payload the device accepts from the guest or sends to it (bytes).
pub const MAX_PACKET_PAYLOAD: u32 = 64 * 1024;
