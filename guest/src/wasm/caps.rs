//! The capability interfaces a tenant may be granted — `wasi:logging`, `wasi:config/store`,
//! `wasi:keyvalue` (store, atomics, batch) — implemented as calls to the host's capability
//! broker over vsock (`crate::vsock`). Bindings come from the `capabilities` world in
//! `guest/wit/world.wit`.
//!
//! The broker connection is made on the first call, so a component pays for the device only
//! if it uses a capability. The host refuses, before boot, a component that imports a
//! capability its tenant was not granted, and the broker checks every request again.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::mem::ManuallyDrop;

use wasmtime::component::{HasSelf, Linker, Resource};
use wasmvisor_abi::capability::{CapError, LogLevel, Reply, Request};

use super::wasi::Ctx;
use crate::vsock::{CallError, CapabilityClient, SharedVsock};

wasmtime::component::bindgen!({
    path: "wit",
    world: "wasmvisor:guest/capabilities",
    imports: { default: trappable },
    with: {
        "wasi:keyvalue/store.bucket": Bucket,
    },
});

use wasi::config::store as config;
use wasi::keyvalue::{atomics, batch, store};
use wasi::logging::logging;

/// An open bucket: its identifier (the host checks the tenant's access on every request).
pub struct Bucket {
    name: String,
}

/// The guest end of the capability broker, connected on first use.
pub struct BrokerConn {
    vsock_present: bool,
    tsc_khz: u64,
    /// The device an HTTP guest brought up at boot, to connect over instead of initialising one.
    shared: Option<SharedVsock>,
    /// Never dropped: the VM ends with the component, and tearing the device down first would
    /// cost ~30 register exits for nothing.
    client: Option<ManuallyDrop<CapabilityClient>>,
    /// Why connecting failed, so that every later call fails the same way without retrying.
    failed: Option<String>,
}

impl BrokerConn {
    /// Nothing connected yet; `vsock_present` from the boot flags.
    pub fn new(vsock_present: bool, tsc_khz: u64) -> Self {
        Self { vsock_present, tsc_khz, shared: None, client: None, failed: None }
    }

    /// Nothing connected yet; the connection will be made over `vsock`, which is up.
    pub fn over(vsock: SharedVsock) -> Self {
        Self { vsock_present: true, tsc_khz: 0, shared: Some(vsock), client: None, failed: None }
    }

    /// Sends `request` and maps the outcome with `f`; a transport failure is an `Err` string.
    pub fn call<R>(
        &mut self,
        request: &Request<'_>,
        f: impl FnOnce(Result<Reply<'_>, CapError<'_>>) -> R,
    ) -> Result<R, String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        if self.client.is_none() {
            let connected = match &self.shared {
                Some(vsock) => CapabilityClient::connect_on(vsock.clone()),
                None => CapabilityClient::connect(self.vsock_present, self.tsc_khz),
            };
            match connected {
                Ok(c) => self.client = Some(ManuallyDrop::new(c)),
                Err(e) => {
                    let why = format!("capabilities unavailable: {e}");
                    self.failed = Some(why.clone());
                    return Err(why);
                }
            }
        }
        let client = self.client.as_mut().expect("connected above");
        client.call(request, f).map_err(|e: CallError| {
            let why = format!("capability call failed: {e}");
            // The stream may be out of step now: do not use it again (and leave it be).
            self.client = None;
            self.failed = Some(why.clone());
            why
        })
    }
}

/// Adds the capability interfaces among `wants` to the linker.
pub fn add_to_linker(linker: &mut Linker<Ctx>, wants: impl Fn(&str) -> bool) -> wasmtime::Result<()> {
    if wants("wasi:logging/logging") {
        logging::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |ctx| ctx)?;
    }
    if wants("wasi:config/store") {
        config::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |ctx| ctx)?;
    }
    if wants("wasi:keyvalue/store") {
        store::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |ctx| ctx)?;
    }
    if wants("wasi:keyvalue/atomics") {
        atomics::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |ctx| ctx)?;
    }
    if wants("wasi:keyvalue/batch") {
        batch::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |ctx| ctx)?;
    }
    Ok(())
}

impl logging::Host for Ctx {
    fn log(&mut self, level: logging::Level, context: String, message: String) -> wasmtime::Result<()> {
        let level = match level {
            logging::Level::Trace => LogLevel::Trace,
            logging::Level::Debug => LogLevel::Debug,
            logging::Level::Info => LogLevel::Info,
            logging::Level::Warn => LogLevel::Warn,
            logging::Level::Error => LogLevel::Error,
            logging::Level::Critical => LogLevel::Critical,
        };
        // `log` cannot fail in WIT; a refused record goes to the guest console instead.
        let outcome = self.caps.call(&Request::Log { level, context: &context, message: &message }, |r| match r {
            Ok(_) => None,
            Err(e) => Some(cap_error_text(&e)),
        });
        if let Some(why) = outcome.unwrap_or_else(Some) {
            log::warn!("wasi:logging record dropped: {why}");
        }
        Ok(())
    }
}

impl config::Host for Ctx {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, config::Error>> {
        Ok(self
            .caps
            .call(&Request::ConfigGet { key: &key }, |r| match r {
                Ok(Reply::Text(v)) => Ok(v.map(ToString::to_string)),
                Ok(other) => Err(config::Error::Upstream(unexpected(&other))),
                Err(e) => Err(config::Error::Upstream(cap_error_text(&e))),
            })
            .unwrap_or_else(|why| Err(config::Error::Io(why))))
    }

    fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, config::Error>> {
        Ok(self
            .caps
            .call(&Request::ConfigGetAll, |r| match r {
                Ok(Reply::Pairs(pairs)) => Ok(pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                Ok(other) => Err(config::Error::Upstream(unexpected(&other))),
                Err(e) => Err(config::Error::Upstream(cap_error_text(&e))),
            })
            .unwrap_or_else(|why| Err(config::Error::Io(why))))
    }
}

fn unexpected(reply: &Reply<'_>) -> String {
    format!("the capability broker gave an unexpected reply: {reply:?}")
}

fn cap_error_text(e: &CapError<'_>) -> String {
    match e {
        CapError::NotGranted { interface } => format!("{interface} was not granted to this tenant"),
        CapError::NoSuchStore => "no such store".to_string(),
        CapError::AccessDenied => "access denied".to_string(),
        CapError::Provider(why) => format!("provider error: {why}"),
        CapError::BadRequest(why) => format!("bad request: {why}"),
        CapError::Http { detail, .. } => format!("outgoing HTTP failed: {detail}"),
        CapError::Fs(e) => format!("filesystem error: {e:?}"),
    }
}

fn kv_error(e: &CapError<'_>) -> store::Error {
    match e {
        CapError::NoSuchStore => store::Error::NoSuchStore,
        CapError::AccessDenied | CapError::NotGranted { .. } => store::Error::AccessDenied,
        CapError::Provider(why) | CapError::BadRequest(why) => store::Error::Other(why.to_string()),
        CapError::Http { detail, .. } => store::Error::Other(detail.to_string()),
        CapError::Fs(e) => store::Error::Other(format!("filesystem error: {e:?}")),
    }
}

impl Ctx {
    /// A key-value request whose reply `f` turns into the WIT result.
    fn kv<T>(
        &mut self,
        request: &Request<'_>,
        f: impl FnOnce(Reply<'_>) -> Result<T, store::Error>,
    ) -> Result<T, store::Error> {
        self.caps
            .call(request, |r| match r {
                Ok(reply) => f(reply),
                Err(e) => Err(kv_error(&e)),
            })
            .unwrap_or_else(|why| Err(store::Error::Other(why)))
    }

    fn bucket_name(&self, bucket: &Resource<Bucket>) -> wasmtime::Result<String> {
        Ok(self.table.get(bucket)?.name.clone())
    }
}

fn wrong(reply: &Reply<'_>) -> store::Error {
    store::Error::Other(unexpected(reply))
}

impl store::Host for Ctx {
    fn open(&mut self, identifier: String) -> wasmtime::Result<Result<Resource<Bucket>, store::Error>> {
        match self.kv(&Request::KvOpen { bucket: &identifier }, |r| match r {
            Reply::Unit => Ok(()),
            other => Err(wrong(&other)),
        }) {
            Ok(()) => Ok(Ok(self.table.push(Bucket { name: identifier })?)),
            Err(e) => Ok(Err(e)),
        }
    }
}

impl store::HostBucket for Ctx {
    fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.kv(&Request::KvGet { bucket: &name, key: &key }, |r| match r {
            Reply::Bytes(v) => Ok(v.map(<[u8]>::to_vec)),
            other => Err(wrong(&other)),
        }))
    }

    fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.kv(&Request::KvSet { bucket: &name, key: &key, value: &value }, unit))
    }

    fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<(), store::Error>> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.kv(&Request::KvDelete { bucket: &name, key: &key }, unit))
    }

    fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> wasmtime::Result<Result<bool, store::Error>> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.kv(&Request::KvExists { bucket: &name, key: &key }, |r| match r {
            Reply::Bool(b) => Ok(b),
            other => Err(wrong(&other)),
        }))
    }

    fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.kv(&Request::KvListKeys { bucket: &name, cursor }, |r| match r {
            Reply::Keys { keys, cursor } => {
                Ok(store::KeyResponse { keys: keys.into_iter().map(ToString::to_string).collect(), cursor })
            }
            other => Err(wrong(&other)),
        }))
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

fn unit(reply: Reply<'_>) -> Result<(), store::Error> {
    match reply {
        Reply::Unit => Ok(()),
        other => Err(wrong(&other)),
    }
}

impl atomics::Host for Ctx {
    fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<Result<u64, store::Error>> {
        let name = self.bucket_name(&bucket)?;
        Ok(self.kv(&Request::KvIncrement { bucket: &name, key: &key, delta }, |r| match r {
            Reply::U64(v) => Ok(v),
            other => Err(wrong(&other)),
        }))
    }
}

impl batch::Host for Ctx {
    fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
        let name = self.bucket_name(&bucket)?;
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(self.kv(&Request::KvGetMany { bucket: &name, keys }, |r| match r {
            Reply::Values(values) => {
                Ok(values.into_iter().map(|v| v.map(|(k, v)| (k.to_string(), v.to_vec()))).collect())
            }
            other => Err(wrong(&other)),
        }))
    }

    fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let name = self.bucket_name(&bucket)?;
        let entries: Vec<(&str, &[u8])> = key_values.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        Ok(self.kv(&Request::KvSetMany { bucket: &name, entries }, unit))
    }

    fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let name = self.bucket_name(&bucket)?;
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(self.kv(&Request::KvDeleteMany { bucket: &name, keys }, unit))
    }
}
