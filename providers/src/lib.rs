//! The host side of wasmvisor's capabilities: what a tenant may ask of the host beyond WASI 0.2,
//! and the providers that answer.
//!
//! A tenant is described by a [`TenantSpec`] (plain data: its name, the [`Capability`]s granted
//! with `--grant`, its `--config` pairs and the data directory). [`Broker::open`] turns that into
//! live providers, opening only what the grants need: the tenant's log file for `wasi:logging`,
//! its redb key-value file for `wasi:keyvalue`; `wasi:config` is served from the spec itself;
//! `http-outgoing` requests go to the embedder's client ([`OutgoingHttp`]) if the host is on the
//! tenant's allow-list; `wasi:filesystem` requests go to the tenant's preopened directories
//! (`--dir`), one [`FsSession`] per VM, confined beneath each directory by cap-std.
//! The VMM splits the frames of the wire protocol (`wasmvisor_abi::capability`) off a guest
//! connection and has the broker answer each one ([`Broker::handle`]), in its own process or,
//! relayed over a Unix stream ([`BrokerClient`], [`serve_stream`]), in another.
//!
//! Everything that arrives from the guest is untrusted: requests for a capability that was not
//! granted are refused with `CapError::NotGranted` whatever the guest claims, lengths are checked
//! before use, log text is escaped, and no input makes this crate panic. A body that is not a
//! request at all is a [`ProtocolError`], after which the caller closes the connection.
//!
//! Tenant files live in `<data dir>/tenants/<name>/`: `tenant.log` and `keyvalue.redb`.

#![forbid(unsafe_code)]

mod broker;
mod capability;
mod filesystem;
mod http_outgoing;
mod keyvalue;
mod logging;
mod protocol;
mod relay;
mod tenant;
#[cfg(test)]
mod test_utils;

pub use broker::{Broker, BrokerError};
pub use capability::{Capability, UnknownCapability};
pub use filesystem::{FsSession, PlaceReads, Preopen, read_full};
pub use http_outgoing::{FetchRequest, FetchResponse, OutgoingHttp, allowed as http_allowed};
pub use logging::{DEFAULT_LOG_LIMIT, LineListener, TenantLog, rfc3339_utc};
pub use protocol::ProtocolError;
pub use relay::{BrokerClient, CapabilityService, RelayError, serve_listener, serve_stream, spawn_server};
pub use tenant::{InvalidTenantName, TenantName, TenantSpec, default_data_dir, parse_config_pair};
