//! Helpers shared by the unit tests: a scratch directory that removes itself, and a broker
//! driven through encoded frames as the VMM will drive it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use wasmvisor_abi::capability::{Reply, Request, decode_response, encode_request, split_frame};

use crate::{Broker, Capability, ProtocolError, TenantSpec};

/// A fresh directory under the system temp dir, removed with everything in it on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("wv-providers-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A spec for tenant `name` under `data_dir` with `grants` and `config`.
pub(crate) fn spec(data_dir: &Path, name: &str, grants: &[Capability], config: &[(&str, &str)]) -> TenantSpec {
    TenantSpec {
        name: name.parse().unwrap(),
        grants: grants.iter().copied().collect::<BTreeSet<_>>(),
        config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        data_dir: data_dir.to_owned(),
        echo_log: false,
        http_allow: Vec::new(),
        kv_quota: None,
        dirs: Vec::new(),
    }
}

/// An owned copy of a decoded response's result, so tests can keep it past the frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Res {
    Unit,
    Bytes(Option<Vec<u8>>),
    Text(Option<String>),
    Bool(bool),
    U64(u64),
    Pairs(Vec<(String, String)>),
    Keys(Vec<String>, Option<u64>),
    Values(Vec<Option<(String, Vec<u8>)>>),
    NotGranted(String),
    NoSuchStore,
    AccessDenied,
    Provider(String),
    BadRequest(String),
    Http(u16, Vec<(String, Vec<u8>)>, Vec<u8>),
    HttpFailed(wasmvisor_abi::capability::HttpFailure, String),
    Fs(wasmvisor_abi::fs::FsError),
    /// Any other filesystem reply, as its debug text.
    FsReply(String),
}

/// Decodes every response frame in `stream` into `(id, result)`.
pub(crate) fn responses(mut stream: &[u8]) -> Vec<(u32, Res)> {
    use wasmvisor_abi::capability::CapError as E;
    let mut all = Vec::new();
    while !stream.is_empty() {
        let (body, used) = split_frame(stream).unwrap().unwrap();
        let env = decode_response(body).unwrap();
        let own = |s: &str| s.to_owned();
        let res = match env.result {
            Ok(Reply::Unit) => Res::Unit,
            Ok(Reply::Bytes(b)) => Res::Bytes(b.map(<[u8]>::to_vec)),
            Ok(Reply::Text(t)) => Res::Text(t.map(own)),
            Ok(Reply::Bool(b)) => Res::Bool(b),
            Ok(Reply::U64(n)) => Res::U64(n),
            Ok(Reply::Pairs(p)) => Res::Pairs(p.into_iter().map(|(k, v)| (own(k), own(v))).collect()),
            Ok(Reply::Keys { keys, cursor }) => Res::Keys(keys.into_iter().map(own).collect(), cursor),
            Ok(Reply::Values(v)) => Res::Values(v.into_iter().map(|e| e.map(|(k, v)| (own(k), v.to_vec()))).collect()),
            Err(E::NotGranted { interface }) => Res::NotGranted(own(interface)),
            Err(E::NoSuchStore) => Res::NoSuchStore,
            Err(E::AccessDenied) => Res::AccessDenied,
            Err(E::Provider(m)) => Res::Provider(own(m)),
            Err(E::BadRequest(m)) => Res::BadRequest(own(m)),
            Ok(Reply::HttpResponse { status, headers, body }) => {
                Res::Http(status, headers.into_iter().map(|(n, v)| (own(n), v.to_vec())).collect(), body.to_vec())
            }
            Err(E::Http { failure, detail }) => Res::HttpFailed(failure, own(detail)),
            Err(E::Fs(e)) => Res::Fs(e),
            Ok(other) => Res::FsReply(format!("{other:?}")),
        };
        all.push((env.id, res));
        stream = &stream[used..];
    }
    all
}

/// A broker driven one request at a time through encoded frames.
pub(crate) struct Client {
    pub(crate) broker: Broker,
    next_id: u32,
}

impl Client {
    pub(crate) fn new(broker: Broker) -> Self {
        Self { broker, next_id: 1 }
    }

    /// Sends `request` as one frame and returns the result of its one response.
    pub(crate) fn call(&mut self, request: Request<'_>) -> Res {
        self.try_call(request).unwrap()
    }

    pub(crate) fn try_call(&mut self, request: Request<'_>) -> Result<Res, ProtocolError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = Vec::new();
        encode_request(id, &request, &mut frame).unwrap();
        let (body, _) = split_frame(&frame)?.expect("a whole frame");
        let mut out = Vec::new();
        self.broker.handle(body, &mut out)?;
        let mut all = responses(&out);
        assert_eq!(all.len(), 1, "one response per request");
        let (got_id, res) = all.remove(0);
        assert_eq!(got_id, id);
        Ok(res)
    }
}
