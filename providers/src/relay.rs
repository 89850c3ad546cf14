//! Capabilities across a process boundary: the VMM's device hands each request frame to a
//! [`CapabilityService`], either the tenant's [`Broker`] in its own process (`wasmvisor run`)
//! or a [`BrokerClient`] that relays it over a Unix stream to a broker in another process (a
//! VMM child relays to its supervisor, which owns the tenant's files, so that all of a tenant's
//! VMs share one store and a child holds none of them).
//!
//! On the relay stream the frames are exactly the guest's (`wasmvisor_abi::capability`): one
//! request frame, then one response frame. [`serve_stream`] is the broker's side. Both sides
//! check every frame header against `MAX_FRAME_LEN` before reading a body; a peer that breaks
//! the framing gets its stream closed, never a panic.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmvisor_abi::capability::{FRAME_HEADER_LEN, MAX_FRAME_LEN, split_frame};

use crate::broker::Broker;
use crate::protocol::ProtocolError;

/// Answers capability request frames: appends exactly one response frame to `out` per body.
pub trait CapabilityService: Send {
    /// Handles one request frame body (as `split_frame` returns it). An error closes the
    /// guest's connection.
    fn handle(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), RelayError>;
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The request itself is not a request.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The relay stream to the broker failed or broke the framing.
    #[error("capability relay: {0}")]
    Relay(String),
}

impl CapabilityService for Broker {
    fn handle(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), RelayError> {
        Ok(Broker::handle(self, body, out)?)
    }
}

/// Reads one whole frame (header and body) from `stream` into `buf` (cleared first); `Ok(false)`
/// on a clean end of stream before a header.
fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.clear();
    buf.resize(FRAME_HEADER_LEN, 0);
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(buf[..FRAME_HEADER_LEN].try_into().expect("4 bytes"));
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes exceeds the limit")));
    }
    buf.resize(FRAME_HEADER_LEN + len as usize, 0);
    stream.read_exact(&mut buf[FRAME_HEADER_LEN..])?;
    Ok(true)
}

/// The VMM's side of a relay: each request goes to the broker at the other end of `stream`,
/// and the call waits for its answer.
pub struct BrokerClient {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl BrokerClient {
    /// Longest wait for one answer (a key-value commit takes milliseconds; a broker that
    /// takes this long is stuck, and the guest's connection is closed).
    pub const TIMEOUT: Duration = Duration::from_secs(30);

    /// Relays over `stream`, an open connection to a broker.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(Self::TIMEOUT))?;
        stream.set_write_timeout(Some(Self::TIMEOUT))?;
        Ok(Self { stream, buf: Vec::with_capacity(4096) })
    }
}

impl CapabilityService for BrokerClient {
    fn handle(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), RelayError> {
        let fail = |e: io::Error| RelayError::Relay(e.to_string());
        let len = u32::try_from(body.len()).map_err(|_| RelayError::Relay("request too long".into()))?;
        self.buf.clear();
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(body);
        self.stream.write_all(&self.buf).map_err(fail)?;
        if !read_frame(&mut self.stream, &mut self.buf).map_err(fail)? {
            return Err(RelayError::Relay("the broker closed the relay".into()));
        }
        out.extend_from_slice(&self.buf);
        Ok(())
    }
}

/// The broker's side of one relay stream: answers request frames until the peer closes it.
/// A frame that is not a request, or broken framing, ends the stream with the error.
pub fn serve_stream(broker: &Mutex<Broker>, stream: UnixStream) -> io::Result<()> {
    let mut reader = io::BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let (mut frame, mut out) = (Vec::new(), Vec::new());
    // This stream is one VM's: its open files and directories are its own.
    let mut fs = broker
        .lock()
        .map_err(|_| io::Error::other("the broker panicked"))?
        .fs_session()
        .map_err(|e| io::Error::other(e.to_string()))?;
    while read_frame(&mut reader, &mut frame)? {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        // read_frame returns whole frames; a None here would be a bug, not a panic.
        let (body, _) = split_frame(&frame)
            .map_err(|e| invalid(e.to_string()))?
            .ok_or_else(|| invalid("an incomplete frame".into()))?;
        out.clear();
        let lock = || broker.lock().map_err(|_| io::Error::other("the broker panicked"));
        // The VM's own files are served outside the tenant's broker (its other VMs' calls do
        // not wait on a 960 KiB read); the grant is checked under the lock, briefly.
        let fs_answer = match fs.as_mut() {
            Some(session) => crate::broker::answer_fs_frame(
                session,
                || lock().map(|b| b.filesystem_granted()).unwrap_or(false),
                body,
                &mut out,
            ),
            None => None,
        };
        let answered = match fs_answer {
            Some(answered) => answered,
            None => lock()?.handle_with(fs.as_mut(), body, &mut out),
        };
        answered.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        writer.write_all(&out)?;
    }
    Ok(())
}

/// Serves `broker` on `stream` on a thread of its own (named `relay`), logging how it ended.
pub fn spawn_server(broker: Arc<Mutex<Broker>>, stream: UnixStream) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("relay".into()).spawn(move || {
        if let Err(e) = serve_stream(&broker, stream) {
            tracing::warn!("capability relay closed: {e}");
        }
    })
}

/// Accepts relay connections on `listener` and serves each on its own thread, until the
/// listener fails (it is closed, or the process ends).
pub fn serve_listener(broker: Arc<Mutex<Broker>>, listener: std::os::unix::net::UnixListener) -> io::Error {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = spawn_server(broker.clone(), stream) {
                    tracing::warn!("cannot serve a capability relay: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return e,
        }
    }
}

#[cfg(test)]
mod tests {
    use wasmvisor_abi::capability::{Reply, Request, decode_response, encode_request};

    use super::*;
    use crate::capability::Capability;
    use crate::test_utils::{TempDir, spec};

    fn request(id: u32, request: &Request<'_>) -> Vec<u8> {
        let mut frame = Vec::new();
        encode_request(id, request, &mut frame).unwrap();
        frame
    }

    #[test]
    fn a_relayed_request_gets_the_brokers_answer() {
        let dir = TempDir::new();
        let broker = Broker::open(spec(dir.path(), "t", &[Capability::Config], &[("k", "v")])).unwrap();
        let (near, far) = UnixStream::pair().unwrap();
        let server = spawn_server(Arc::new(Mutex::new(broker)), far).unwrap();
        let mut client = BrokerClient::new(near).unwrap();
        for id in 1..=3 {
            let frame = request(id, &Request::ConfigGet { key: "k" });
            let (body, _) = split_frame(&frame).unwrap().unwrap();
            let mut out = Vec::new();
            client.handle(body, &mut out).unwrap();
            let (resp, len) = split_frame(&out).unwrap().unwrap();
            assert_eq!(len, out.len(), "exactly one frame");
            let envelope = decode_response(resp).unwrap();
            assert_eq!(envelope.id, id);
            assert_eq!(envelope.result, Ok(Reply::Text(Some("v"))));
        }
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn each_relay_stream_has_its_own_files_and_a_revoked_grant_ends_them() {
        let dir = TempDir::new();
        let pre = dir.path().join("pre");
        std::fs::create_dir(&pre).unwrap();
        std::fs::write(pre.join("f"), "data").unwrap();
        let mut s = spec(dir.path(), "t", &[Capability::Filesystem], &[]);
        s.dirs = vec![crate::Preopen { host: pre.clone(), guest: "/d".into(), readonly: false }];
        let broker = Arc::new(Mutex::new(Broker::open(s).unwrap()));
        let call = |client: &mut BrokerClient, id: u32, r: &Request<'_>| -> String {
            let frame = request(id, r);
            let (body, _) = split_frame(&frame).unwrap().unwrap();
            let mut out = Vec::new();
            client.handle(body, &mut out).unwrap();
            let (resp, _) = split_frame(&out).unwrap().unwrap();
            format!("{:?}", decode_response(resp).unwrap().result)
        };
        let streams: Vec<_> = (0..2)
            .map(|_| {
                let (near, far) = UnixStream::pair().unwrap();
                (spawn_server(broker.clone(), far).unwrap(), BrokerClient::new(near).unwrap())
            })
            .collect();
        let (mut servers, mut clients): (Vec<_>, Vec<_>) = streams.into_iter().unzip();
        let open = Request::FsOpenAt { dir: 0, follow: true, path: "f", open: 0, flags: 1, close: vec![] };
        // Both streams number their first open 1: the handles are per stream.
        for c in clients.iter_mut() {
            assert!(call(c, 1, &open).starts_with("Ok(FsOpened { handle: 1,"));
        }
        assert_eq!(
            call(&mut clients[0], 2, &Request::FsRead { handle: 1, offset: 0, len: 9, into: None }),
            "Ok(Bytes(Some([100, 97, 116, 97])))"
        );
        call(&mut clients[1], 2, &Request::FsClose { handle: 1 });
        assert_eq!(
            call(&mut clients[1], 3, &Request::FsRead { handle: 1, offset: 0, len: 9, into: None }),
            "Err(Fs(BadDescriptor))"
        );
        assert_eq!(
            call(&mut clients[0], 3, &Request::FsRead { handle: 1, offset: 0, len: 1, into: None }),
            "Ok(Bytes(Some([100])))"
        );
        // The grant taken away: the open streams' next filesystem call is refused.
        broker.lock().unwrap().update(Default::default(), Default::default(), vec![], None, vec![]).unwrap();
        assert!(
            call(&mut clients[0], 4, &Request::FsRead { handle: 1, offset: 0, len: 1, into: None })
                .contains("NotGranted")
        );
        drop(clients);
        for s in servers.drain(..) {
            s.join().unwrap();
        }
    }

    #[test]
    fn a_broken_relay_is_an_error_not_a_hang_or_a_panic() {
        let dir = TempDir::new();
        let broker = Arc::new(Mutex::new(Broker::open(spec(dir.path(), "t", &[], &[])).unwrap()));
        // A request body that is not a request: the server ends the stream, the client errors.
        let (near, far) = UnixStream::pair().unwrap();
        let server = spawn_server(broker.clone(), far).unwrap();
        let mut client = BrokerClient::new(near).unwrap();
        let err = client.handle(b"\xff\xff\xff", &mut Vec::new()).unwrap_err();
        assert!(err.to_string().starts_with("capability relay"), "{err}");
        server.join().unwrap();
        // A header announcing more than the limit is refused before any body is read.
        let (mut near, far) = UnixStream::pair().unwrap();
        near.write_all(&(MAX_FRAME_LEN + 1).to_le_bytes()).unwrap();
        let err = serve_stream(&broker, far).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        // A peer that answers garbage framing to the client.
        let (near, mut far) = UnixStream::pair().unwrap();
        let mut client = BrokerClient::new(near).unwrap();
        far.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let frame = request(1, &Request::ConfigGet { key: "k" });
        let (body, _) = split_frame(&frame).unwrap().unwrap();
        assert!(client.handle(body, &mut Vec::new()).is_err());
    }
}
