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
//!
//! File reads: the answer to an open of a file the session may read carries the opened file's
//! descriptor (SCM_RIGHTS, on the answer's first byte). A client given a placer
//! ([`BrokerClient::place_reads`]) keeps it under the handle until the guest closes it. A
//! placed read (`FsRead { into }`) of that handle still goes to the broker, which checks the
//! grant and the handle as for any call, but answers `FsReadHere` instead of the bytes; the
//! client then reads the page cache straight into guest RAM. So the bytes never cross the
//! socket (a 64 MiB read went from 0.25x to 0.7x wasmtime's), and revoking the grant or
//! closing the handle stops the reads at once. The descriptor is the session's own, opened for
//! reading (read-only through a read-only preopen); a child that cannot take it (out of
//! descriptors) gets the bytes as before.

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use wasmvisor_abi::capability::{
    CapError, FRAME_HEADER_LEN, MAX_FRAME_LEN, Reply, Request, RequestEnvelope, decode_request, decode_response,
    encode_request, encode_response, split_frame,
};
use wasmvisor_abi::fs::{FS_PLACED_CHUNK, FileType, Handle};

use crate::broker::Broker;
use crate::filesystem::{FsSession, PlaceReads, fs_error};
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
    read_body(stream, buf)?;
    Ok(true)
}

/// Reads the body of the frame whose header is in `buf`.
fn read_body(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = u32::from_le_bytes(buf[..FRAME_HEADER_LEN].try_into().expect("4 bytes"));
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes exceeds the limit")));
    }
    buf.resize(FRAME_HEADER_LEN + len as usize, 0);
    stream.read_exact(&mut buf[FRAME_HEADER_LEN..])
}

/// As [`read_frame`], for a frame that may carry one descriptor on its first byte.
fn read_frame_with_fd(stream: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<(bool, Option<OwnedFd>)> {
    buf.clear();
    buf.resize(FRAME_HEADER_LEN, 0);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            &*stream,
            &mut [IoSliceMut::new(&mut buf[..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m.bytes,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    // Any descriptor beyond one (a broker never sends more) is closed as it is dropped.
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    if got == 0 {
        return Ok((false, None));
    }
    if got < FRAME_HEADER_LEN {
        stream.read_exact(&mut buf[got..])?;
    }
    read_body(stream, buf)?;
    Ok((true, fd))
}

/// Writes `frame`, with `fd` on its first byte.
fn write_frame_with_fd(stream: &mut UnixStream, frame: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let sent = loop {
        match rustix::net::sendmsg(&*stream, &[IoSlice::new(frame)], &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    stream.write_all(&frame[sent..])
}

/// The file an answer to an open (`out`, its frame) opened, if the session may read it.
fn opened_file<'s>(session: &'s FsSession, out: &[u8]) -> Option<(Handle, &'s std::fs::File)> {
    let (answer, _) = split_frame(out).ok()??;
    match decode_response(answer).ok()?.result {
        Ok(Reply::FsOpened { handle, kind: FileType::RegularFile, .. }) => {
            Some((handle, session.readable_file(handle)?))
        }
        _ => None,
    }
}

/// The broker's half of a placed read of a file whose descriptor the client holds: if
/// `envelope` is one, and the grant and the handle allow it, answers `FsReadHere` in `out`
/// (true). Closes forget handles. Anything else is left to the usual path (false).
fn read_here(
    handed: &mut HashSet<Handle>,
    session: &FsSession,
    envelope: &RequestEnvelope<'_>,
    out: &mut Vec<u8>,
    granted: impl FnOnce() -> bool,
) -> bool {
    match envelope.request {
        Request::FsRead { handle, into: Some(_), .. }
            if handed.contains(&handle) && session.readable_file(handle).is_some() && granted() =>
        {
            encode_response(envelope.id, &Ok(Reply::FsReadHere), out).is_ok()
        }
        Request::FsClose { handle } => {
            handed.remove(&handle);
            false
        }
        Request::FsOpenAt { ref close, .. } => {
            for h in close {
                handed.remove(h);
            }
            false
        }
        _ => false,
    }
}

/// The VMM's side of a relay: each request goes to the broker at the other end of `stream`,
/// and the call waits for its answer; placed reads of files the broker handed over are
/// answered here.
pub struct BrokerClient {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Files the broker opened for the guest and handed over, by handle.
    files: HashMap<Handle, std::fs::File>,
    placer: Option<Box<dyn PlaceReads>>,
}

impl BrokerClient {
    /// Longest wait for one answer (a key-value commit takes milliseconds; a broker that
    /// takes this long is stuck, and the guest's connection is closed).
    pub const TIMEOUT: Duration = Duration::from_secs(30);

    /// Relays over `stream`, an open connection to a broker.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(Self::TIMEOUT))?;
        stream.set_write_timeout(Some(Self::TIMEOUT))?;
        Ok(Self { stream, buf: Vec::with_capacity(4096), files: HashMap::new(), placer: None })
    }

    /// Placed reads of files the broker hands over are read here, by `placer`.
    pub fn place_reads(&mut self, placer: Box<dyn PlaceReads>) {
        self.placer = Some(placer);
    }

    /// Sends one request frame (`body` behind its header) and reads the answer into `buf`,
    /// with the descriptor that came with it, if any.
    fn exchange(&mut self, body: &[u8]) -> Result<Option<OwnedFd>, RelayError> {
        let fail = |e: io::Error| RelayError::Relay(e.to_string());
        let len = u32::try_from(body.len()).map_err(|_| RelayError::Relay("request too long".into()))?;
        self.buf.clear();
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(body);
        self.stream.write_all(&self.buf).map_err(fail)?;
        let (more, fd) = read_frame_with_fd(&mut self.stream, &mut self.buf).map_err(fail)?;
        if !more {
            return Err(RelayError::Relay("the broker closed the relay".into()));
        }
        Ok(fd)
    }

    /// Reads a placed read of `handle` into guest RAM here, the broker having said so
    /// (`FsReadHere`): the answer for the guest, in `out`. Without the file's descriptor (it
    /// could not be taken) or a range it can write, the read is asked again unplaced, and the
    /// bytes are the answer (which the device places, or refuses as it refuses any such range).
    fn read_here(&mut self, id: u32, read: PlacedRead, out: &mut Vec<u8>) -> Result<(), RelayError> {
        let protocol = |e| RelayError::Protocol(ProtocolError::from(e));
        let PlacedRead { handle, offset, len, into } = read;
        let want = len.min(FS_PLACED_CHUNK) as usize;
        let placed = match (self.files.get(&handle), self.placer.as_mut()) {
            (Some(file), Some(placer)) => placer.read_at(file, offset, into, want),
            _ => None,
        };
        let result = match placed {
            Some(Ok(n)) => Ok(Reply::U64(n.min(want) as u64)),
            Some(Err(e)) => Err(CapError::Fs(fs_error(&e))),
            None => {
                let mut unplaced = Vec::new();
                encode_request(id, &Request::FsRead { handle, offset, len, into: None }, &mut unplaced)
                    .map_err(protocol)?;
                self.exchange(&unplaced[FRAME_HEADER_LEN..])?;
                out.extend_from_slice(&self.buf);
                return Ok(());
            }
        };
        encode_response(id, &result, out).map_err(protocol)
    }
}

/// A placed read (`FsRead { into: Some(..) }`), as a relay client keeps it for the answer.
#[derive(Clone, Copy)]
struct PlacedRead {
    handle: Handle,
    offset: u64,
    len: u32,
    into: u64,
}

impl CapabilityService for BrokerClient {
    fn handle(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), RelayError> {
        // Only a client that places reads looks into the frames: for the handles it holds
        // descriptors of, and for a placed read the broker may tell it to do itself.
        let mut placed = None;
        if self.placer.is_some()
            && let Ok(envelope) = decode_request(body)
        {
            match envelope.request {
                // The guest is done with these handles: their descriptors go too.
                Request::FsClose { handle } => drop(self.files.remove(&handle)),
                Request::FsOpenAt { ref close, .. } => close.iter().for_each(|h| drop(self.files.remove(h))),
                Request::FsRead { handle, offset, len, into: Some(into) } => {
                    placed = Some((envelope.id, PlacedRead { handle, offset, len, into }));
                }
                _ => {}
            }
        }
        let fd = self.exchange(body)?;
        if fd.is_some() || placed.is_some() {
            let answer = split_frame(&self.buf).ok().flatten().and_then(|(a, _)| decode_response(a).ok());
            match (answer.map(|r| r.result), fd, placed) {
                // Kept only where it is used (and its close is seen); else closed here.
                (Some(Ok(Reply::FsOpened { handle, .. })), Some(fd), _) if self.placer.is_some() => {
                    self.files.insert(handle, std::fs::File::from(fd));
                }
                (Some(Ok(Reply::FsReadHere)), _, Some((id, read))) => return self.read_here(id, read, out),
                _ => {}
            }
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
    // Handles whose descriptors went to the client with their open.
    let mut handed: HashSet<Handle> = HashSet::new();
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
        // A VM with preopens: its request decoded once, for the descriptors it is handed.
        let envelope = fs.as_ref().and_then(|_| decode_request(body).ok());
        let here = match (fs.as_ref(), envelope.as_ref()) {
            (Some(session), Some(envelope)) if !handed.is_empty() => {
                read_here(&mut handed, session, envelope, &mut out, || {
                    lock().map(|b| b.filesystem_granted()).unwrap_or(false)
                })
            }
            _ => false,
        };
        let fs_answer = match fs.as_mut() {
            _ if here => Some(Ok(())),
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
        // An opened file the VM may read goes with the answer (see the module's docs).
        let opened = match (fs.as_ref(), envelope.as_ref().map(|e| &e.request)) {
            (Some(session), Some(Request::FsOpenAt { .. })) => opened_file(session, &out),
            _ => None,
        };
        match opened {
            Some((handle, file)) => {
                write_frame_with_fd(&mut writer, &out, file.as_fd())?;
                handed.insert(handle);
            }
            None => writer.write_all(&out)?,
        }
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

    /// A broker granted `filesystem`, with one preopen (`/d`, the returned directory) holding
    /// `f` ("data").
    fn fs_broker() -> (TempDir, std::path::PathBuf, Arc<Mutex<Broker>>) {
        let dir = TempDir::new();
        let pre = dir.path().join("pre");
        std::fs::create_dir(&pre).unwrap();
        std::fs::write(pre.join("f"), "data").unwrap();
        let mut s = spec(dir.path(), "t", &[Capability::Filesystem], &[]);
        s.dirs = vec![crate::Preopen { host: pre.clone(), guest: "/d".into(), readonly: false }];
        let broker = Arc::new(Mutex::new(Broker::open(s).unwrap()));
        (dir, pre, broker)
    }

    /// One call through `client`: its answer's result, printed.
    fn call(client: &mut BrokerClient, id: u32, r: &Request<'_>) -> String {
        let frame = request(id, r);
        let (body, _) = split_frame(&frame).unwrap().unwrap();
        let mut out = Vec::new();
        client.handle(body, &mut out).unwrap();
        let (resp, _) = split_frame(&out).unwrap().unwrap();
        format!("{:?}", decode_response(resp).unwrap().result)
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

    /// Places reads in a buffer of its own (guest RAM's stand-in), for addresses below 1 << 30.
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl PlaceReads for Buffer {
        fn read_at(&mut self, file: &std::fs::File, offset: u64, into: u64, len: usize) -> Option<io::Result<usize>> {
            use std::os::unix::fs::FileExt;
            if into >= 1 << 30 {
                return None;
            }
            let mut b = self.0.lock().unwrap();
            b.resize(len, 0);
            let n = crate::read_full(len, offset, |from, at| file.read_at(&mut b[from..], at));
            if let Ok(n) = n {
                b.truncate(n);
            }
            Some(n)
        }
    }

    #[test]
    fn a_readable_file_goes_to_the_client_whose_placed_reads_the_broker_still_allows() {
        let (_dir, pre, broker) = fs_broker();
        let (near, far) = UnixStream::pair().unwrap();
        let server = spawn_server(broker.clone(), far).unwrap();
        let mut client = BrokerClient::new(near).unwrap();
        let placed = Arc::new(Mutex::new(Vec::new()));
        client.place_reads(Box::new(Buffer(placed.clone())));
        let open = |flags| Request::FsOpenAt { dir: 0, follow: true, path: "f", open: 0, flags, close: vec![] };
        let read = |handle, into| Request::FsRead { handle, offset: 0, len: 9, into };
        // Opened for reading: its descriptor came along, and a placed read is read here.
        assert!(call(&mut client, 1, &open(1)).starts_with("Ok(FsOpened { handle: 1,"));
        assert!(client.files.contains_key(&1));
        assert_eq!(call(&mut client, 2, &read(1, Some(0))), "Ok(U64(4))");
        assert_eq!(placed.lock().unwrap().as_slice(), b"data");
        // Not placed, or not a range the placer can write: the broker's bytes (which the device
        // places, or refuses for a range that is not guest RAM).
        assert_eq!(call(&mut client, 3, &read(1, None)), "Ok(Bytes(Some([100, 97, 116, 97])))");
        assert_eq!(call(&mut client, 4, &read(1, Some(1 << 30))), "Ok(Bytes(Some([100, 97, 116, 97])))");
        // Opened for writing only: no descriptor, and the broker refuses the read.
        assert!(call(&mut client, 5, &open(2)).starts_with("Ok(FsOpened { handle: 2,"));
        assert!(!client.files.contains_key(&2));
        assert_eq!(call(&mut client, 6, &read(2, Some(0))), "Err(Fs(BadDescriptor))");
        // The grant taken away: the broker refuses the placed read, and nothing is read here.
        placed.lock().unwrap().clear();
        broker.lock().unwrap().update(Default::default(), Default::default(), vec![], None, vec![]).unwrap();
        assert!(call(&mut client, 7, &read(1, Some(0))).contains("NotGranted"));
        assert!(placed.lock().unwrap().is_empty());
        // A closed handle's descriptor is gone from the client.
        call(&mut client, 8, &Request::FsClose { handle: 1 });
        assert!(client.files.is_empty());
        // A descriptor the client could not keep: the broker still says to read here, and the
        // client asks again for the bytes.
        let dirs = vec![crate::Preopen { host: pre.clone(), guest: "/d".into(), readonly: false }];
        broker.lock().unwrap().update([Capability::Filesystem].into(), Default::default(), vec![], None, dirs).unwrap();
        assert!(call(&mut client, 9, &open(1)).starts_with("Ok(FsOpened { handle: 3,"));
        assert!(client.files.remove(&3).is_some());
        assert_eq!(call(&mut client, 10, &read(3, Some(0))), "Ok(Bytes(Some([100, 97, 116, 97])))");
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn each_relay_stream_has_its_own_files_and_a_revoked_grant_ends_them() {
        let (_dir, _, broker) = fs_broker();
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
