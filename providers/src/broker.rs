//! The per-tenant capability broker: opens the providers a [`TenantSpec`] grants and answers
//! each request body with exactly one response frame.
//!
//! Deny by default: the capability a request needs is derived from the request itself and
//! checked against the grants before any provider is touched, so a guest that imports nothing
//! still gets `NotGranted` for anything it sends. Every semantic failure is a `CapError`
//! response; only a body that is not a request at all is an error of [`Broker::handle`].

use std::error::Error as StdError;
use std::fs::DirBuilder;
#[cfg(unix)]
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use wasmvisor_abi::capability::{
    CapError, DecodeError, HttpFailure, MAX_FRAME_LEN, Reply, Request, decode_request, encode_response,
};

use crate::capability::Capability;
use crate::filesystem::{FsReply, FsSession};
use crate::http_outgoing::{FetchRequest, FetchResponse, OutgoingHttp};
use crate::keyvalue::{Entry, KvError, KvStore};
use crate::logging::TenantLog;
use crate::protocol::ProtocolError;
use crate::tenant::{TenantName, TenantSpec};

/// Why a tenant's providers could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No data directory was given and none can be derived from the environment.
    #[error("no data directory: set WASMVISOR_DATA_DIR, XDG_DATA_HOME or HOME")]
    NoDataDir,
    /// A directory could not be created.
    #[error("could not create the directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The tenant log could not be opened.
    #[error("could not open the log of tenant {tenant} ({path}): {source}")]
    OpenLog {
        /// The tenant.
        tenant: TenantName,
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Another broker, in this or another process, has the tenant's key-value store open.
    #[error("the key-value store of tenant {tenant} is in use by another wasmvisor process ({})", path.display())]
    KeyValueInUse {
        /// The tenant.
        tenant: TenantName,
        /// The database file.
        path: PathBuf,
    },
    /// The tenant's key-value store could not be opened (I/O, corruption, unsupported format).
    #[error("could not open the key-value store of tenant {tenant} ({}): {source}", path.display())]
    OpenKeyValue {
        /// The tenant.
        tenant: TenantName,
        /// The database file.
        path: PathBuf,
        /// What the storage engine said.
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A preopened directory could not be opened.
    #[error("tenant {tenant}: {source}")]
    OpenDir {
        /// The tenant.
        tenant: TenantName,
        /// What the OS said, naming the directory.
        source: std::io::Error,
    },
}

/// A tenant's capability broker: its spec and the providers its grants opened.
pub struct Broker {
    spec: TenantSpec,
    log: Option<Arc<TenantLog>>,
    kv: Option<KvStore>,
    outgoing: Option<Arc<dyn OutgoingHttp>>,
    /// The preopens of the VM this broker serves in process (a broker shared by relayed VMs
    /// gives each relay stream a session of its own: [`Broker::fs_session`]).
    fs: Option<FsSession>,
    calls: u64,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("spec", &self.spec)
            .field("kv", &self.kv.is_some())
            .field("outgoing", &self.outgoing.is_some())
            .field("calls", &self.calls)
            .finish()
    }
}

/// Room kept in a reply frame for an outgoing response's head.
const RESPONSE_HEAD_ROOM: usize = 64 * 1024;

impl Broker {
    /// Opens what the grants need: the tenant's redb key-value file only if KeyValue is granted,
    /// the tenant log only if Logging is granted. Creates directories (mode 0700) as needed.
    pub fn open(spec: TenantSpec) -> Result<Broker, BrokerError> {
        let needs_dir = spec.is_granted(Capability::Logging) || spec.is_granted(Capability::KeyValue);
        if needs_dir {
            create_dir(&spec.tenant_dir())?;
        }
        let log = if spec.is_granted(Capability::Logging) {
            let path = spec.log_path();
            let log = TenantLog::open(path.clone(), spec.echo_log).map_err(|source| BrokerError::OpenLog {
                tenant: spec.name.clone(),
                path,
                source,
            })?;
            Some(Arc::new(log))
        } else {
            None
        };
        let kv = if spec.is_granted(Capability::KeyValue) { Some(open_kv(&spec)?) } else { None };
        let fs = open_fs(&spec)?;
        Ok(Broker { spec, log, kv, outgoing: None, fs, calls: 0 })
    }

    /// A broker whose `wasi:logging` records go to `log`, a log its caller shares (a
    /// supervisor writes the guest's output to it too). The key-value store opens if granted.
    pub fn with_log(spec: TenantSpec, log: Arc<TenantLog>) -> Result<Broker, BrokerError> {
        create_dir(&spec.tenant_dir())?;
        let kv = if spec.is_granted(Capability::KeyValue) { Some(open_kv(&spec)?) } else { None };
        Ok(Broker { spec, log: Some(log), kv, outgoing: None, fs: None, calls: 0 })
    }

    /// The client that makes this tenant's `http-outgoing` requests (without one, they fail).
    pub fn set_outgoing(&mut self, client: Arc<dyn OutgoingHttp>) {
        self.outgoing = Some(client);
    }

    /// Takes new grants, configuration and quota (a tenant's spec was replaced): opens the
    /// key-value store if it is granted now. A store no longer granted stays open but
    /// unreachable.
    pub fn update(
        &mut self,
        grants: std::collections::BTreeSet<Capability>,
        config: std::collections::BTreeMap<String, String>,
        http_allow: Vec<String>,
        kv_quota: Option<u64>,
        dirs: Vec<crate::Preopen>,
    ) -> Result<(), BrokerError> {
        if grants.contains(&Capability::KeyValue) && self.kv.is_none() {
            let mut spec = self.spec.clone();
            spec.grants = grants.clone();
            spec.kv_quota = kv_quota;
            create_dir(&spec.tenant_dir())?;
            self.kv = Some(open_kv(&spec)?);
        }
        if let Some(kv) = &mut self.kv {
            kv.set_quota(kv_quota);
        }
        self.spec.grants = grants;
        self.spec.config = config;
        self.spec.http_allow = http_allow;
        self.spec.kv_quota = kv_quota;
        // VMs started from now on see the new directories (a running VM keeps its session).
        self.spec.dirs = dirs;
        Ok(())
    }

    /// Closes the providers (the tenant is gone): its key-value store and log are released at
    /// once, whoever still holds this broker, and every later request is refused.
    pub fn close(&mut self) {
        self.kv = None;
        self.log = None;
        self.spec.grants.clear();
        self.spec.config.clear();
        self.spec.http_allow.clear();
        self.outgoing = None;
        self.fs = None;
    }

    /// A filesystem session over the tenant's preopens, for one VM's relay stream (`None`
    /// when it has none).
    pub fn fs_session(&self) -> Result<Option<FsSession>, BrokerError> {
        open_fs(&self.spec)
    }

    /// How many requests this broker has answered.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// The tenant this broker serves.
    pub fn spec(&self) -> &TenantSpec {
        &self.spec
    }

    /// Handles one request frame body (as `split_frame` returns it) and appends exactly one
    /// response frame to `out`. Errors only when the body is not a decodable request at all
    /// (then the caller closes the connection); every semantic failure is a `CapError` response,
    /// including a reply too large for a frame (`BadRequest` naming the limit).
    pub fn handle(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let mut fs = self.fs.take();
        let handled = self.handle_with(fs.as_mut(), body, out);
        self.fs = fs;
        handled
    }

    /// [`Broker::handle`], with filesystem requests answered by `fs` (one VM's session).
    pub fn handle_with(
        &mut self,
        fs: Option<&mut FsSession>,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ProtocolError> {
        let envelope = decode_request(body)?;
        self.calls += 1;
        let mut fs = fs;
        let answer = self.answer(&envelope.request, fs.as_deref_mut());
        let responded = respond(envelope.id, &answer, out);
        if let (Some(fs), Ok(Owned::Fs(reply))) = (fs, answer) {
            fs.recycle(reply);
        }
        responded
    }

    /// File reads that name a guest buffer are placed there by `placer` (a broker in the
    /// VMM's own process). Without preopens there is nothing to read and this does nothing.
    pub fn place_reads(&mut self, placer: Box<dyn crate::PlaceReads>) {
        if let Some(fs) = self.fs.as_mut() {
            fs.place_reads(placer);
        }
    }

    /// Whether filesystem requests are granted now (a relay stream asks before it answers one
    /// outside the broker's lock, with its own session: [`answer_fs_frame`]).
    pub fn filesystem_granted(&self) -> bool {
        self.spec.is_granted(Capability::Filesystem)
    }

    fn answer(&mut self, request: &Request<'_>, fs: Option<&mut FsSession>) -> Answer {
        if let Some((capability, interface)) = needs(request)
            && !self.spec.is_granted(capability)
        {
            return Err(Failure::NotGranted(interface));
        }
        if is_fs(request) {
            return answer_fs(fs, request);
        }
        match request {
            Request::Noop => Ok(Owned::Unit),
            Request::Log { level, context, message } => {
                let log = self.log.as_ref().ok_or(Failure::NotGranted("wasi:logging/logging"))?;
                log.record(&self.spec.name, *level, context, message, SystemTime::now()).map_err(|err| {
                    tracing::warn!(tenant = %self.spec.name, path = %log.path().display(), %err, "tenant log write failed");
                    Failure::Provider("could not write the tenant log".into())
                })?;
                Ok(Owned::Unit)
            }
            Request::ConfigGet { key } => Ok(Owned::Text(self.spec.config.get(*key).cloned())),
            Request::ConfigGetAll => {
                Ok(Owned::Pairs(self.spec.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
            }
            Request::HttpFetch {
                method,
                scheme,
                authority,
                path_with_query,
                headers,
                body,
                connect_timeout_ns,
                first_byte_timeout_ns,
            } => {
                if !crate::http_outgoing::allowed(&self.spec.http_allow, scheme, authority) {
                    return Err(Failure::Http(
                        HttpFailure::Denied,
                        format!("{scheme}://{authority} is not on tenant {}'s allow-list", self.spec.name),
                    ));
                }
                let Some(client) = &self.outgoing else {
                    return Err(Failure::Http(
                        HttpFailure::Internal,
                        "outgoing HTTP is served by the daemon (`wasmvisor serve`) only".to_string(),
                    ));
                };
                let request = FetchRequest {
                    method,
                    scheme,
                    authority,
                    path_with_query,
                    headers,
                    body,
                    connect_timeout: connect_timeout_ns.map(std::time::Duration::from_nanos),
                    first_byte_timeout: first_byte_timeout_ns.map(std::time::Duration::from_nanos),
                    max_response_body: MAX_FRAME_LEN as usize - RESPONSE_HEAD_ROOM,
                };
                match client.fetch(&request) {
                    Ok(r) => Ok(Owned::Http(r)),
                    Err((failure, detail)) => {
                        tracing::debug!(tenant = %self.spec.name, %authority, %detail, "outgoing request failed");
                        Err(Failure::Http(failure, detail))
                    }
                }
            }
            kv_request => {
                let kv = self.kv.as_ref().ok_or(Failure::NotGranted("wasi:keyvalue/store"))?;
                keyvalue(kv, kv_request).map_err(|err| {
                    if let KvError::Provider(message) | KvError::Quota(message) = &err {
                        tracing::warn!(tenant = %self.spec.name, %message, "key-value request failed");
                    }
                    Failure::from(err)
                })
            }
        }
    }
}

/// A filesystem request answered by one VM's session.
fn answer_fs(fs: Option<&mut FsSession>, request: &Request<'_>) -> Answer {
    let fs = fs.ok_or(Failure::NotGranted("wasi:filesystem/preopens"))?;
    match fs.handle(request) {
        Some(Ok(reply)) => Ok(Owned::Fs(reply)),
        Some(Err(e)) => {
            tracing::debug!(?request, error = ?e, "filesystem request failed");
            Err(Failure::Fs(e))
        }
        None => Err(Failure::BadRequest("not a filesystem request".into())),
    }
}

/// Appends the response frame for `answer` to `out` (a reply too large for a frame becomes a
/// `BadRequest` naming the limit).
fn respond(id: u32, answer: &Answer, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    match encode_response(id, &as_wire(answer), out) {
        Ok(()) => Ok(()),
        Err(err) => {
            let message = match err {
                DecodeError::TooLong(len) => {
                    format!("the reply of {len} bytes exceeds the {MAX_FRAME_LEN}-byte frame limit; ask for less")
                }
                other => format!("the reply could not be encoded: {other}"),
            };
            encode_response(id, &Err(CapError::BadRequest(&message)), out).map_err(|_| ProtocolError::Reply { id })
        }
    }
}

/// Answers `body` if it is a filesystem request, with `fs` (one VM's session) and whether the
/// tenant holds the grant now; `None` for any other request (the broker answers it). Lets a
/// relay stream serve its VM's files without holding the tenant's broker.
pub fn answer_fs_frame(
    fs: &mut FsSession,
    granted: impl FnOnce() -> bool,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Option<Result<(), ProtocolError>> {
    let envelope = match decode_request(body) {
        Ok(e) => e,
        Err(e) => return Some(Err(e.into())),
    };
    if !is_fs(&envelope.request) {
        return None;
    }
    let answer = if granted() {
        answer_fs(Some(&mut *fs), &envelope.request)
    } else {
        Err(Failure::NotGranted("wasi:filesystem/types"))
    };
    let responded = respond(envelope.id, &answer, out);
    if let Ok(Owned::Fs(reply)) = answer {
        fs.recycle(reply);
    }
    Some(responded)
}

fn open_fs(spec: &TenantSpec) -> Result<Option<FsSession>, BrokerError> {
    let preopens = spec.preopens();
    if preopens.is_empty() {
        return Ok(None);
    }
    FsSession::new(preopens).map(Some).map_err(|source| BrokerError::OpenDir { tenant: spec.name.clone(), source })
}

/// Whether `request` is a `wasi:filesystem` one.
fn is_fs(request: &Request<'_>) -> bool {
    matches!(needs(request), Some((Capability::Filesystem, _)))
}

fn open_kv(spec: &TenantSpec) -> Result<KvStore, BrokerError> {
    let path = spec.keyvalue_path();
    let tenant = spec.name.clone();
    KvStore::open(&path, spec.kv_quota).map_err(|err| match err {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            BrokerError::KeyValueInUse { tenant, path }
        }
        other => BrokerError::OpenKeyValue { tenant, path, source: Box::new(other) },
    })
}

/// The capability a request needs and the WIT interface it belongs to; `None` for `Noop`.
fn needs(request: &Request<'_>) -> Option<(Capability, &'static str)> {
    Some(match request {
        Request::Noop => return None,
        Request::Log { .. } => (Capability::Logging, "wasi:logging/logging"),
        Request::ConfigGet { .. } | Request::ConfigGetAll => (Capability::Config, "wasi:config/store"),
        Request::KvOpen { .. }
        | Request::KvGet { .. }
        | Request::KvSet { .. }
        | Request::KvDelete { .. }
        | Request::KvExists { .. }
        | Request::KvListKeys { .. } => (Capability::KeyValue, "wasi:keyvalue/store"),
        Request::KvIncrement { .. } => (Capability::KeyValue, "wasi:keyvalue/atomics"),
        Request::KvGetMany { .. } | Request::KvSetMany { .. } | Request::KvDeleteMany { .. } => {
            (Capability::KeyValue, "wasi:keyvalue/batch")
        }
        Request::HttpFetch { .. } => (Capability::HttpOutgoing, "wasi:http/outgoing-handler"),
        Request::FsPreopens => (Capability::Filesystem, "wasi:filesystem/preopens"),
        Request::FsOpenAt { .. }
        | Request::FsClose { .. }
        | Request::FsRead { .. }
        | Request::FsWrite { .. }
        | Request::FsStat { .. }
        | Request::FsSetSize { .. }
        | Request::FsSetTimes { .. }
        | Request::FsSync { .. }
        | Request::FsReadDir { .. }
        | Request::FsCreateDir { .. }
        | Request::FsRemoveDir { .. }
        | Request::FsUnlink { .. }
        | Request::FsRename { .. }
        | Request::FsLink { .. }
        | Request::FsSymlink { .. }
        | Request::FsReadLink { .. }
        | Request::FsSameObject { .. }
        | Request::FsHash { .. } => (Capability::Filesystem, "wasi:filesystem/types"),
    })
}

fn keyvalue(kv: &KvStore, request: &Request<'_>) -> Result<Owned, KvError> {
    Ok(match request {
        Request::KvOpen { bucket } => kv.open_bucket(bucket).map(|()| Owned::Unit)?,
        Request::KvGet { bucket, key } => Owned::Bytes(kv.get(bucket, key)?),
        Request::KvSet { bucket, key, value } => kv.set(bucket, key, value).map(|()| Owned::Unit)?,
        Request::KvDelete { bucket, key } => kv.delete(bucket, key).map(|()| Owned::Unit)?,
        Request::KvExists { bucket, key } => Owned::Bool(kv.exists(bucket, key)?),
        Request::KvListKeys { bucket, cursor } => {
            let (keys, cursor) = kv.list_keys(bucket, *cursor)?;
            Owned::Keys { keys, cursor }
        }
        Request::KvIncrement { bucket, key, delta } => Owned::U64(kv.increment(bucket, key, *delta)?),
        Request::KvGetMany { bucket, keys } => Owned::Values(kv.get_many(bucket, keys)?),
        Request::KvSetMany { bucket, entries } => kv.set_many(bucket, entries).map(|()| Owned::Unit)?,
        Request::KvDeleteMany { bucket, keys } => kv.delete_many(bucket, keys).map(|()| Owned::Unit)?,
        _ => return Err(KvError::BadRequest("not a key-value request".into())),
    })
}

fn create_dir(path: &Path) -> Result<(), BrokerError> {
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(0o700);
    builder.create(path).map_err(|source| BrokerError::CreateDir { path: path.to_owned(), source })
}

/// An answer that owns its data, borrowed as a wire [`Reply`] to encode.
type Answer = Result<Owned, Failure>;

enum Owned {
    Unit,
    Bytes(Option<Vec<u8>>),
    Text(Option<String>),
    Bool(bool),
    U64(u64),
    Pairs(Vec<(String, String)>),
    Keys { keys: Vec<String>, cursor: Option<u64> },
    Values(Vec<Option<Entry>>),
    Http(FetchResponse),
    Fs(FsReply),
}

enum Failure {
    NotGranted(&'static str),
    Provider(String),
    BadRequest(String),
    Http(HttpFailure, String),
    Fs(wasmvisor_abi::fs::FsError),
}

impl From<KvError> for Failure {
    fn from(err: KvError) -> Self {
        match err {
            KvError::BadRequest(m) => Failure::BadRequest(m),
            KvError::Provider(m) | KvError::Quota(m) => Failure::Provider(m),
        }
    }
}

/// `answer` as the wire types, borrowing its data.
fn as_wire(answer: &Answer) -> Result<Reply<'_>, CapError<'_>> {
    match answer {
        Ok(Owned::Unit) => Ok(Reply::Unit),
        Ok(Owned::Bytes(v)) => Ok(Reply::Bytes(v.as_deref())),
        Ok(Owned::Text(v)) => Ok(Reply::Text(v.as_deref())),
        Ok(Owned::Bool(b)) => Ok(Reply::Bool(*b)),
        Ok(Owned::U64(n)) => Ok(Reply::U64(*n)),
        Ok(Owned::Pairs(pairs)) => Ok(Reply::Pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect())),
        Ok(Owned::Keys { keys, cursor }) => {
            Ok(Reply::Keys { keys: keys.iter().map(String::as_str).collect(), cursor: *cursor })
        }
        Ok(Owned::Values(values)) => {
            Ok(Reply::Values(values.iter().map(|e| e.as_ref().map(|(k, v)| (k.as_str(), v.as_slice()))).collect()))
        }
        Ok(Owned::Http(r)) => Ok(Reply::HttpResponse {
            status: r.status,
            headers: r.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect(),
            body: &r.body,
        }),
        Ok(Owned::Fs(reply)) => Ok(match reply {
            FsReply::Unit => Reply::Unit,
            FsReply::Preopens(list) => Reply::FsPreopens(list.iter().map(|(h, n, ro)| (*h, n.as_str(), *ro)).collect()),
            FsReply::Opened(handle, kind, stat) => Reply::FsOpened { handle: *handle, kind: *kind, stat: *stat },
            FsReply::Bytes(b) => Reply::Bytes(Some(b)),
            FsReply::Written(n) | FsReply::Placed(n) => Reply::U64(*n),
            FsReply::Stat(st) => Reply::FsStat(*st),
            FsReply::Entries(entries, next) => Reply::FsEntries {
                entries: entries.iter().map(|(n, k, h)| (n.as_str(), *k, *h)).collect(),
                next: *next,
            },
            FsReply::Text(t) => Reply::Text(Some(t)),
            FsReply::Same(b) => Reply::Bool(*b),
            FsReply::Hash(lo, hi) => Reply::FsHash(*lo, *hi),
        }),
        Err(Failure::Fs(e)) => Err(CapError::Fs(*e)),
        Err(Failure::NotGranted(interface)) => Err(CapError::NotGranted { interface }),
        Err(Failure::Http(failure, detail)) => Err(CapError::Http { failure: *failure, detail }),
        Err(Failure::Provider(m)) => Err(CapError::Provider(m)),
        Err(Failure::BadRequest(m)) => Err(CapError::BadRequest(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{Client, Res, TempDir, spec};

    const ALL: &[Capability] = &Capability::ALL;

    fn client(dir: &TempDir, name: &str, grants: &[Capability]) -> Client {
        Client::new(Broker::open(spec(dir.path(), name, grants, &[])).unwrap())
    }

    fn keys(names: &[&str]) -> Res {
        Res::Keys(names.iter().map(|k| k.to_string()).collect(), None)
    }

    /// Answers every request with its own method and authority (the broker's checks are what
    /// is tested here; the daemon's real client is tested against a real server).
    struct Reflect;

    impl OutgoingHttp for Reflect {
        fn fetch(&self, r: &FetchRequest<'_>) -> Result<FetchResponse, (HttpFailure, String)> {
            if r.authority.starts_with("refused") {
                return Err((HttpFailure::ConnectionRefused, "refused".into()));
            }
            Ok(FetchResponse {
                status: 200,
                headers: vec![("x-seen".into(), r.authority.as_bytes().to_vec())],
                body: [r.method.as_bytes(), b" ", r.body].concat(),
            })
        }
    }

    #[test]
    fn outgoing_requests_need_the_grant_and_the_allow_list() {
        let dir = TempDir::new();
        let fetch = |authority: &'static str| Request::HttpFetch {
            method: "POST",
            scheme: "http",
            authority,
            path_with_query: "/",
            headers: vec![],
            body: b"hi",
            connect_timeout_ns: None,
            first_byte_timeout_ns: None,
        };
        let mut c = client(&dir, "no-grant", &[]);
        assert_eq!(c.call(fetch("127.0.0.1:9000")), Res::NotGranted("wasi:http/outgoing-handler".into()));
        let mut s = spec(dir.path(), "granted", &[Capability::HttpOutgoing], &[]);
        s.http_allow = vec!["127.0.0.1:9000".into(), "refused.test".into()];
        let mut c = Client::new(Broker::open(s).unwrap());
        let Res::HttpFailed(HttpFailure::Internal, why) = c.call(fetch("127.0.0.1:9000")) else { panic!() };
        assert!(why.contains("daemon"), "{why}");
        c.broker.set_outgoing(Arc::new(Reflect));
        assert_eq!(
            c.call(fetch("127.0.0.1:9000")),
            Res::Http(200, vec![("x-seen".into(), b"127.0.0.1:9000".to_vec())], b"POST hi".to_vec())
        );
        let Res::HttpFailed(HttpFailure::Denied, why) = c.call(fetch("127.0.0.1:9001")) else { panic!() };
        assert!(why.contains("allow-list"), "{why}");
        assert_eq!(c.call(fetch("refused.test")), Res::HttpFailed(HttpFailure::ConnectionRefused, "refused".into()));
        c.broker.close();
        assert_eq!(c.call(fetch("127.0.0.1:9000")), Res::NotGranted("wasi:http/outgoing-handler".into()));
    }

    #[test]
    fn broker_is_send() {
        fn send<T: Send>() {}
        send::<Broker>();
    }

    #[test]
    fn every_keyvalue_operation_round_trips() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        let b = "bucket";
        assert_eq!(c.call(Request::KvOpen { bucket: b }), Res::Unit);
        assert_eq!(c.call(Request::KvGet { bucket: b, key: "k" }), Res::Bytes(None));
        assert_eq!(c.call(Request::KvExists { bucket: b, key: "k" }), Res::Bool(false));
        assert_eq!(c.call(Request::KvListKeys { bucket: b, cursor: None }), keys(&[]));
        assert_eq!(c.call(Request::KvSet { bucket: b, key: "k", value: &[0, 1, 255] }), Res::Unit);
        assert_eq!(c.call(Request::KvGet { bucket: b, key: "k" }), Res::Bytes(Some(vec![0, 1, 255])));
        assert_eq!(c.call(Request::KvSet { bucket: b, key: "k", value: b"" }), Res::Unit);
        assert_eq!(c.call(Request::KvGet { bucket: b, key: "k" }), Res::Bytes(Some(vec![])));
        assert_eq!(c.call(Request::KvExists { bucket: b, key: "k" }), Res::Bool(true));
        assert_eq!(c.call(Request::KvDelete { bucket: b, key: "k" }), Res::Unit);
        assert_eq!(c.call(Request::KvDelete { bucket: b, key: "k" }), Res::Unit, "deleting an absent key is fine");
        assert_eq!(c.call(Request::KvExists { bucket: b, key: "k" }), Res::Bool(false));

        // Counters are decimal text, as in wasmtime's reference implementation.
        assert_eq!(c.call(Request::KvIncrement { bucket: b, key: "n", delta: 5 }), Res::U64(5));
        assert_eq!(c.call(Request::KvIncrement { bucket: b, key: "n", delta: 37 }), Res::U64(42));
        assert_eq!(c.call(Request::KvGet { bucket: b, key: "n" }), Res::Bytes(Some(b"42".to_vec())));
        c.call(Request::KvSet { bucket: b, key: "n", value: b"100" });
        assert_eq!(c.call(Request::KvIncrement { bucket: b, key: "n", delta: 0 }), Res::U64(100));
        c.call(Request::KvSet { bucket: b, key: "text", value: b"\x01\x00\x00\x00\x00\x00\x00\x00" });
        let Res::Provider(m) = c.call(Request::KvIncrement { bucket: b, key: "text", delta: 1 }) else { panic!() };
        assert!(m.contains("\"text\" is not a counter"), "{m}");
        c.call(Request::KvSet { bucket: b, key: "max", value: u64::MAX.to_string().as_bytes() });
        let Res::Provider(m) = c.call(Request::KvIncrement { bucket: b, key: "max", delta: 1 }) else { panic!() };
        assert!(m.contains("overflow"), "{m}");

        assert_eq!(
            c.call(Request::KvSetMany { bucket: b, entries: vec![("a", b"1"), ("c", b"3"), ("b", b"2"), ("a", b"4")] }),
            Res::Unit
        );
        assert_eq!(
            c.call(Request::KvGetMany { bucket: b, keys: vec!["c", "zz", "a"] }),
            Res::Values(vec![Some(("c".into(), b"3".to_vec())), None, Some(("a".into(), b"4".to_vec()))])
        );
        assert_eq!(c.call(Request::KvListKeys { bucket: b, cursor: None }), keys(&["a", "b", "c", "max", "n", "text"]));
        assert_eq!(c.call(Request::KvDeleteMany { bucket: b, keys: vec!["a", "b", "nope", "max", "text"] }), Res::Unit);
        assert_eq!(c.call(Request::KvListKeys { bucket: b, cursor: None }), keys(&["c", "n"]));
        // Batch operations on a bucket never written.
        assert_eq!(c.call(Request::KvGetMany { bucket: "empty", keys: vec!["a"] }), Res::Values(vec![None]));
        assert_eq!(c.call(Request::KvDeleteMany { bucket: "empty", keys: vec![] }), Res::Unit);
        assert_eq!(c.call(Request::KvGetMany { bucket: b, keys: vec![] }), Res::Values(vec![]));
    }

    #[test]
    fn buckets_are_separate() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        c.call(Request::KvSet { bucket: "one", key: "k", value: b"1" });
        c.call(Request::KvSet { bucket: "two", key: "k", value: b"2" });
        assert_eq!(c.call(Request::KvGet { bucket: "one", key: "k" }), Res::Bytes(Some(b"1".to_vec())));
        assert_eq!(c.call(Request::KvGet { bucket: "two", key: "k" }), Res::Bytes(Some(b"2".to_vec())));
        assert_eq!(c.call(Request::KvGet { bucket: "three", key: "k" }), Res::Bytes(None));
    }

    #[test]
    fn out_of_range_identifiers_and_keys_are_bad_requests() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        let long_bucket = "b".repeat(256);
        let long_key = "k".repeat(4097);
        // The empty identifier is the default bucket.
        assert_eq!(c.call(Request::KvOpen { bucket: "" }), Res::Unit);
        assert_eq!(c.call(Request::KvGet { bucket: "", key: "k" }), Res::Bytes(None));
        for request in [
            Request::KvOpen { bucket: &long_bucket },
            Request::KvGet { bucket: "b", key: "" },
            Request::KvSet { bucket: "b", key: &long_key, value: b"v" },
            Request::KvExists { bucket: "b", key: "" },
            Request::KvListKeys { bucket: &long_bucket, cursor: None },
            Request::KvIncrement { bucket: "b", key: "", delta: 1 },
            Request::KvGetMany { bucket: "b", keys: vec!["a", ""] },
            Request::KvSetMany { bucket: "b", entries: vec![("a", b"1"), (&long_key, b"2")] },
            Request::KvDeleteMany { bucket: "b", keys: vec!["", "a"] },
        ] {
            assert!(matches!(c.call(request.clone()), Res::BadRequest(_)), "{request:?}");
        }
        assert_eq!(
            c.call(Request::KvGet { bucket: "b", key: "a" }),
            Res::Bytes(None),
            "refused set-many wrote nothing"
        );
        assert_eq!(c.call(Request::KvOpen { bucket: &"b".repeat(255) }), Res::Unit);
        assert_eq!(c.call(Request::KvSet { bucket: "b", key: &"k".repeat(4096), value: b"" }), Res::Unit);
    }

    #[test]
    fn list_keys_pages_through_sorted_keys() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        let names: Vec<String> = (0..2500).map(|i| format!("key{i:05}")).collect();
        for chunk in names.chunks(700) {
            let entries = chunk.iter().rev().map(|k| (k.as_str(), &b"v"[..])).collect();
            assert_eq!(c.call(Request::KvSetMany { bucket: "b", entries }), Res::Unit);
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let Res::Keys(page, next) = c.call(Request::KvListKeys { bucket: "b", cursor }) else { panic!() };
            assert!(page.len() <= 1000);
            seen.extend(page);
            pages += 1;
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!((pages, seen), (3, names));
        assert_eq!(c.call(Request::KvListKeys { bucket: "b", cursor: Some(2500) }), keys(&[]));
        assert_eq!(c.call(Request::KvListKeys { bucket: "b", cursor: Some(u64::MAX) }), keys(&[]));
        assert_eq!(c.call(Request::KvListKeys { bucket: "b", cursor: Some(2498) }), keys(&["key02498", "key02499"]));
    }

    #[test]
    fn list_keys_pages_end_early_rather_than_overflow_a_frame() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        // 600 keys of 4 KiB: 2.4 MiB, so a page of 1000 would not fit in a frame.
        let names: Vec<String> = (0..600).map(|i| format!("{i:04}{}", "x".repeat(4092))).collect();
        for chunk in names.chunks(200) {
            c.call(Request::KvSetMany { bucket: "b", entries: chunk.iter().map(|k| (k.as_str(), &b""[..])).collect() });
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let Res::Keys(page, next) = c.call(Request::KvListKeys { bucket: "b", cursor }) else { panic!() };
            assert!(!page.is_empty() && page.len() < 600);
            seen.extend(page);
            cursor = next;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(seen, names);
    }

    #[test]
    fn a_reply_too_large_for_a_frame_is_a_bad_request() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        let big = vec![7u8; 600 * 1024];
        c.call(Request::KvSet { bucket: "b", key: "x", value: &big });
        c.call(Request::KvSet { bucket: "b", key: "y", value: &big });
        assert_eq!(c.call(Request::KvGet { bucket: "b", key: "x" }), Res::Bytes(Some(big.clone())));
        let Res::BadRequest(m) = c.call(Request::KvGetMany { bucket: "b", keys: vec!["x", "y"] }) else { panic!() };
        assert!(m.contains("1048576-byte frame limit"), "{m}");
        // The connection goes on.
        assert_eq!(c.call(Request::KvExists { bucket: "b", key: "y" }), Res::Bool(true));
    }

    #[test]
    fn writes_survive_closing_and_reopening() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        c.call(Request::KvSet { bucket: "b", key: "k", value: b"v" });
        c.call(Request::KvIncrement { bucket: "b", key: "n", delta: 2 });
        c.call(Request::KvSetMany { bucket: "c", entries: vec![("x", b"1"), ("y", b"2")] });
        c.call(Request::KvDeleteMany { bucket: "c", keys: vec!["x"] });
        drop(c);
        let mut c = client(&dir, "t", &[Capability::KeyValue]);
        assert_eq!(c.call(Request::KvGet { bucket: "b", key: "k" }), Res::Bytes(Some(b"v".to_vec())));
        assert_eq!(c.call(Request::KvIncrement { bucket: "b", key: "n", delta: 1 }), Res::U64(3));
        assert_eq!(c.call(Request::KvListKeys { bucket: "c", cursor: None }), keys(&["y"]));
        assert!(dir.path().join("tenants/t/keyvalue.redb").is_file());
    }

    #[test]
    fn tenants_see_only_their_own_data() {
        let dir = TempDir::new();
        let mut a = client(&dir, "alice", &[Capability::KeyValue]);
        let mut b = client(&dir, "bob", &[Capability::KeyValue]);
        a.call(Request::KvSet { bucket: "shared", key: "k", value: b"alice" });
        assert_eq!(b.call(Request::KvGet { bucket: "shared", key: "k" }), Res::Bytes(None));
        b.call(Request::KvSet { bucket: "shared", key: "k", value: b"bob" });
        assert_eq!(a.call(Request::KvGet { bucket: "shared", key: "k" }), Res::Bytes(Some(b"alice".to_vec())));
        assert_eq!(b.call(Request::KvGet { bucket: "shared", key: "k" }), Res::Bytes(Some(b"bob".to_vec())));
        assert_eq!(a.call(Request::KvIncrement { bucket: "shared", key: "n", delta: 1 }), Res::U64(1));
        assert_eq!(b.call(Request::KvIncrement { bucket: "shared", key: "n", delta: 1 }), Res::U64(1));
    }

    #[test]
    fn a_tenant_store_open_twice_is_in_use() {
        let dir = TempDir::new();
        let first = Broker::open(spec(dir.path(), "t", &[Capability::KeyValue], &[])).unwrap();
        let err = Broker::open(spec(dir.path(), "t", ALL, &[])).unwrap_err();
        assert!(matches!(err, BrokerError::KeyValueInUse { .. }), "{err:?}");
        let path = dir.path().join("tenants/t/keyvalue.redb");
        assert_eq!(
            err.to_string(),
            format!("the key-value store of tenant t is in use by another wasmvisor process ({})", path.display())
        );
        // Another tenant, or the same one without key-value, is not affected.
        Broker::open(spec(dir.path(), "u", ALL, &[])).unwrap();
        Broker::open(spec(dir.path(), "t", &[Capability::Logging, Capability::Config], &[])).unwrap();
        drop(first);
        Broker::open(spec(dir.path(), "t", ALL, &[])).unwrap();
    }

    #[test]
    fn ungranted_capabilities_are_refused_naming_the_interface() {
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[]);
        let cases = [
            (
                Request::Log { level: wasmvisor_abi::capability::LogLevel::Info, context: "", message: "m" },
                "wasi:logging/logging",
            ),
            (Request::ConfigGet { key: "k" }, "wasi:config/store"),
            (Request::ConfigGetAll, "wasi:config/store"),
            (Request::KvOpen { bucket: "b" }, "wasi:keyvalue/store"),
            (Request::KvGet { bucket: "b", key: "k" }, "wasi:keyvalue/store"),
            (Request::KvSet { bucket: "b", key: "k", value: b"v" }, "wasi:keyvalue/store"),
            (Request::KvDelete { bucket: "b", key: "k" }, "wasi:keyvalue/store"),
            (Request::KvExists { bucket: "b", key: "k" }, "wasi:keyvalue/store"),
            (Request::KvListKeys { bucket: "b", cursor: None }, "wasi:keyvalue/store"),
            (Request::KvIncrement { bucket: "b", key: "k", delta: 1 }, "wasi:keyvalue/atomics"),
            (Request::KvGetMany { bucket: "b", keys: vec![] }, "wasi:keyvalue/batch"),
            (Request::KvSetMany { bucket: "b", entries: vec![] }, "wasi:keyvalue/batch"),
            (Request::KvDeleteMany { bucket: "b", keys: vec![] }, "wasi:keyvalue/batch"),
            // Refused before validation: an ungranted tenant learns nothing about the limits.
            (Request::KvOpen { bucket: "" }, "wasi:keyvalue/store"),
        ];
        for (request, interface) in cases {
            assert_eq!(c.call(request), Res::NotGranted(interface.into()));
        }
        assert_eq!(c.call(Request::Noop), Res::Unit);
        // Nothing was created on disk for a tenant with no file-backed grants.
        assert!(!dir.path().join("tenants").exists());

        // A grant covers its own package only.
        let mut c = client(&dir, "u", &[Capability::Config]);
        assert_eq!(c.call(Request::ConfigGetAll), Res::Pairs(vec![]));
        assert_eq!(c.call(Request::KvGet { bucket: "b", key: "k" }), Res::NotGranted("wasi:keyvalue/store".into()));
        assert!(!dir.path().join("tenants/u").exists());
    }

    #[test]
    fn config_is_served_from_the_spec() {
        let dir = TempDir::new();
        let spec = spec(dir.path(), "t", &[Capability::Config], &[("zeta", "z"), ("alpha", "a=1"), ("empty", "")]);
        let mut c = Client::new(Broker::open(spec).unwrap());
        assert_eq!(c.call(Request::ConfigGet { key: "alpha" }), Res::Text(Some("a=1".into())));
        assert_eq!(c.call(Request::ConfigGet { key: "empty" }), Res::Text(Some("".into())));
        assert_eq!(c.call(Request::ConfigGet { key: "missing" }), Res::Text(None));
        assert_eq!(
            c.call(Request::ConfigGetAll),
            Res::Pairs(vec![("alpha".into(), "a=1".into()), ("empty".into(), "".into()), ("zeta".into(), "z".into())])
        );
        assert_eq!(c.broker.spec().name.as_str(), "t");
    }

    #[test]
    fn log_records_are_escaped_lines_in_the_tenant_log() {
        use wasmvisor_abi::capability::LogLevel;
        let dir = TempDir::new();
        let mut c = client(&dir, "t", &[Capability::Logging]);
        let forged = "hello\n2000-01-01T00:00:00.000Z CRITICAL [x] forged";
        assert_eq!(c.call(Request::Log { level: LogLevel::Info, context: "ctx", message: forged }), Res::Unit);
        assert_eq!(
            c.call(Request::Log { level: LogLevel::Error, context: "a\r\nb", message: "\u{1b}[31m" }),
            Res::Unit
        );
        let text = std::fs::read_to_string(dir.path().join("tenants/t/tenant.log")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with(" INFO [ctx] hello\\n2000-01-01T00:00:00.000Z CRITICAL [x] forged"), "{}", lines[0]);
        assert!(lines[1].ends_with(" ERROR [a\\r\\nb] \\u{1b}[31m"), "{}", lines[1]);
        assert!(!dir.path().join("tenants/t/keyvalue.redb").exists(), "no store without the grant");
    }
}
