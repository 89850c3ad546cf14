//! The capability wire protocol: what a guest and the host's capability providers say to each
//! other over a byte stream (virtio-vsock, issue 4).
//!
//! A stream carries frames: a 4-byte little-endian body length, then a postcard-encoded body.
//! Guest to host, the body is a [`RequestEnvelope`]; host to guest, a [`ResponseEnvelope`]
//! with the same request id. Every envelope carries [`PROTOCOL_VERSION`]; a peer refuses a body
//! of another version with [`DecodeError::Version`]. Decoding borrows strings and bytes from the
//! frame, checks every length against the frame, and never panics on any input
//! ([`split_frame`] and the `decode_*` functions are what the fuzz targets drive).

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::fs::{FileType, FsError, Handle, NewTime, Stat};

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes of the frame header (the body length).
pub const FRAME_HEADER_LEN: usize = 4;
/// Largest body a peer accepts; a longer one is a protocol error, not a reason to allocate.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// Severity of a `wasi:logging` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// `trace`
    Trace,
    /// `debug`
    Debug,
    /// `info`
    Info,
    /// `warn`
    Warn,
    /// `error`
    Error,
    /// `critical`
    Critical,
}

/// What a guest asks of a capability provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request<'a> {
    /// Nothing: measures the round trip.
    Noop,
    /// `wasi:logging/logging.log`.
    Log {
        /// Severity.
        level: LogLevel,
        /// The component's context string.
        #[serde(borrow)]
        context: &'a str,
        /// The message.
        message: &'a str,
    },
    /// `wasi:config/store.get`.
    ConfigGet {
        /// The key.
        key: &'a str,
    },
    /// `wasi:config/store.get-all`.
    ConfigGetAll,
    /// `wasi:keyvalue/store.open`: whether the tenant may use this bucket.
    KvOpen {
        /// The bucket identifier.
        bucket: &'a str,
    },
    /// `wasi:keyvalue/store.bucket.get`.
    KvGet {
        /// The bucket.
        bucket: &'a str,
        /// The key.
        key: &'a str,
    },
    /// `wasi:keyvalue/store.bucket.set`.
    KvSet {
        /// The bucket.
        bucket: &'a str,
        /// The key.
        key: &'a str,
        /// The value.
        #[serde(borrow, with = "serde_bytes")]
        value: &'a [u8],
    },
    /// `wasi:keyvalue/store.bucket.delete`.
    KvDelete {
        /// The bucket.
        bucket: &'a str,
        /// The key.
        key: &'a str,
    },
    /// `wasi:keyvalue/store.bucket.exists`.
    KvExists {
        /// The bucket.
        bucket: &'a str,
        /// The key.
        key: &'a str,
    },
    /// `wasi:keyvalue/store.bucket.list-keys`.
    KvListKeys {
        /// The bucket.
        bucket: &'a str,
        /// Where the previous page ended (an opaque position from the last reply).
        cursor: Option<u64>,
    },
    /// `wasi:keyvalue/atomics.increment`.
    KvIncrement {
        /// The bucket.
        bucket: &'a str,
        /// The key.
        key: &'a str,
        /// What to add; a sum beyond `u64::MAX` is an error and changes nothing.
        delta: u64,
    },
    /// `wasi:keyvalue/batch.get-many`.
    KvGetMany {
        /// The bucket.
        bucket: &'a str,
        /// The keys.
        #[serde(borrow)]
        keys: Vec<&'a str>,
    },
    /// `wasi:keyvalue/batch.set-many`.
    KvSetMany {
        /// The bucket.
        bucket: &'a str,
        /// Keys and values.
        #[serde(borrow)]
        entries: Vec<(&'a str, &'a [u8])>,
    },
    /// `wasi:keyvalue/batch.delete-many`.
    KvDeleteMany {
        /// The bucket.
        bucket: &'a str,
        /// The keys.
        #[serde(borrow)]
        keys: Vec<&'a str>,
    },
    /// `wasi:http/outgoing-handler.handle`: one request, its whole body, answered with the
    /// whole response ([`Reply::HttpResponse`]) or a [`CapError::Http`].
    HttpFetch {
        /// The method, e.g. `GET`.
        method: &'a str,
        /// `http` or `https`.
        scheme: &'a str,
        /// Host and optional port.
        authority: &'a str,
        /// Path and query.
        path_with_query: &'a str,
        /// Header fields.
        #[serde(borrow)]
        headers: Vec<(&'a str, &'a [u8])>,
        /// The body.
        #[serde(borrow, with = "serde_bytes")]
        body: &'a [u8],
        /// `request-options` connect timeout, ns.
        connect_timeout_ns: Option<u64>,
        /// `request-options` first-byte timeout, ns.
        first_byte_timeout_ns: Option<u64>,
    },
    /// `wasi:filesystem/preopens.get-directories`: the tenant's preopened directories
    /// ([`Reply::FsPreopens`]); their handles are the first of the connection.
    FsPreopens,
    /// `descriptor.open-at`: `path` beneath directory `dir` ([`Reply::FsOpened`]).
    FsOpenAt {
        /// The directory.
        dir: Handle,
        /// Follow a final symbolic link (`path-flags.symlink-follow`).
        follow: bool,
        /// The path, relative.
        path: &'a str,
        /// [`crate::fs::open`] bits.
        open: u8,
        /// [`crate::fs::flags`] bits the new descriptor has.
        flags: u8,
        /// Handles the guest dropped since its last request, closed first (a close costs no
        /// round trip of its own).
        close: Vec<Handle>,
    },
    /// The guest dropped a descriptor.
    FsClose {
        /// The handle.
        handle: Handle,
    },
    /// `descriptor.read`: at most `len` (capped at [`crate::fs::FS_CHUNK`]) bytes at `offset`
    /// ([`Reply::Bytes`]; none at the end of the file).
    FsRead {
        /// The file.
        handle: Handle,
        /// Where.
        offset: u64,
        /// How many at most.
        len: u32,
        /// A guest-physical buffer of `len` bytes to place them in: the VMM's device writes
        /// the bytes there and answers [`Reply::U64`] (how many) instead of carrying them
        /// through the vsock queues. `None`: they come in the reply.
        into: Option<u64>,
    },
    /// `descriptor.write`, or an append when `offset` is `None` ([`Reply::U64`]: bytes written).
    FsWrite {
        /// The file.
        handle: Handle,
        /// Where, or at the end.
        offset: Option<u64>,
        /// The bytes (at most [`crate::fs::FS_CHUNK`]).
        #[serde(borrow, with = "serde_bytes")]
        data: &'a [u8],
    },
    /// `descriptor.stat`, or `stat-at` with a path ([`Reply::FsStat`]).
    FsStat {
        /// The descriptor, or the directory `path` is relative to.
        handle: Handle,
        /// For `stat-at`: follow a final symbolic link, and the path.
        at: Option<(bool, &'a str)>,
    },
    /// `descriptor.set-size`.
    FsSetSize {
        /// The file.
        handle: Handle,
        /// The new size.
        size: u64,
    },
    /// `descriptor.set-times`, or `set-times-at` with a path.
    FsSetTimes {
        /// The descriptor, or the directory `path` is relative to.
        handle: Handle,
        /// For `set-times-at`: follow a final symbolic link, and the path.
        at: Option<(bool, &'a str)>,
        /// Access time.
        accessed: NewTime,
        /// Modification time.
        modified: NewTime,
    },
    /// `descriptor.sync` (`data_only`: `sync-data`).
    FsSync {
        /// The descriptor.
        handle: Handle,
        /// Only the data.
        data_only: bool,
    },
    /// `descriptor.read-directory`: entries from position `cursor` on ([`Reply::FsEntries`]).
    FsReadDir {
        /// The directory.
        handle: Handle,
        /// How many entries the earlier pages held.
        cursor: u64,
    },
    /// `create-directory-at`.
    FsCreateDir {
        /// The directory.
        dir: Handle,
        /// The new directory's path.
        path: &'a str,
    },
    /// `remove-directory-at`.
    FsRemoveDir {
        /// The directory.
        dir: Handle,
        /// The path.
        path: &'a str,
    },
    /// `unlink-file-at`.
    FsUnlink {
        /// The directory.
        dir: Handle,
        /// The path.
        path: &'a str,
    },
    /// `rename-at`.
    FsRename {
        /// The old path's directory.
        dir: Handle,
        /// The old path.
        old: &'a str,
        /// The new path's directory.
        new_dir: Handle,
        /// The new path.
        new: &'a str,
    },
    /// `link-at`.
    FsLink {
        /// The old path's directory.
        dir: Handle,
        /// Follow a final symbolic link of the old path.
        follow: bool,
        /// The old path.
        old: &'a str,
        /// The new path's directory.
        new_dir: Handle,
        /// The new path.
        new: &'a str,
    },
    /// `symlink-at`: a link at `path` whose text is `target`.
    FsSymlink {
        /// The directory.
        dir: Handle,
        /// The link's text.
        target: &'a str,
        /// Where it goes.
        path: &'a str,
    },
    /// `readlink-at` ([`Reply::Text`]).
    FsReadLink {
        /// The directory.
        dir: Handle,
        /// The path.
        path: &'a str,
    },
    /// `is-same-object` ([`Reply::Bool`]).
    FsSameObject {
        /// One.
        a: Handle,
        /// The other.
        b: Handle,
    },
    /// `metadata-hash`, or `metadata-hash-at` with a path ([`Reply::FsHash`]).
    FsHash {
        /// The descriptor, or the directory `path` is relative to.
        handle: Handle,
        /// For `-at`: follow a final symbolic link, and the path.
        at: Option<(bool, &'a str)>,
    },
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply<'a> {
    /// Done, nothing to return.
    Unit,
    /// A value that may be absent (key-value get).
    Bytes(#[serde(borrow, with = "serde_bytes")] Option<&'a [u8]>),
    /// A string that may be absent (config get).
    Text(Option<&'a str>),
    /// A yes or no (exists).
    Bool(bool),
    /// A number (increment).
    U64(u64),
    /// Key-value string pairs (config get-all).
    #[serde(borrow)]
    Pairs(Vec<(&'a str, &'a str)>),
    /// A page of keys and where the next one starts (list-keys).
    Keys {
        /// The keys.
        #[serde(borrow)]
        keys: Vec<&'a str>,
        /// Cursor for the next page, if any.
        cursor: Option<u64>,
    },
    /// Values in request order, absent ones as `None` (get-many).
    #[serde(borrow)]
    Values(Vec<Option<(&'a str, &'a [u8])>>),
    /// An outgoing request's response.
    HttpResponse {
        /// The status code.
        status: u16,
        /// Header fields.
        #[serde(borrow)]
        headers: Vec<(&'a str, &'a [u8])>,
        /// The whole body.
        #[serde(borrow, with = "serde_bytes")]
        body: &'a [u8],
    },
    /// The preopened directories: handle, name in the guest, read-only.
    #[serde(borrow)]
    FsPreopens(Vec<(Handle, &'a str, bool)>),
    /// A descriptor opened: its handle, type and metadata (which a C library asks for next).
    FsOpened {
        /// The handle.
        handle: Handle,
        /// Its type.
        kind: FileType,
        /// Its metadata as `stat` gives it.
        stat: Stat,
    },
    /// A descriptor's metadata.
    FsStat(Stat),
    /// A page of directory entries (name, type and metadata hash: a C library asks for each
    /// entry's, to fill `d_ino`) and the cursor of the next page, if any.
    FsEntries {
        /// The entries.
        #[serde(borrow)]
        entries: Vec<(&'a str, FileType, (u64, u64))>,
        /// Where the next page starts.
        next: Option<u64>,
    },
    /// A metadata hash (`lower`, `upper`).
    FsHash(u64, u64),
    /// Between a VMM child and its broker only, never to a guest: the placed read may go on,
    /// and the child, which holds the file's descriptor, reads it into guest RAM itself.
    FsReadHere,
}

/// Why an outgoing HTTP request failed, as `wasi:http`'s `error-code` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpFailure {
    /// `HTTP-request-denied`: the tenant may not reach that host.
    Denied,
    /// `DNS-error`.
    Dns,
    /// `connection-refused`.
    ConnectionRefused,
    /// `connection-timeout`.
    ConnectionTimeout,
    /// `TLS-protocol-error` (also a certificate the system roots do not trust).
    Tls,
    /// `HTTP-protocol-error`.
    Protocol,
    /// `HTTP-response-body-size`: larger than the transport carries.
    ResponseTooLarge,
    /// `HTTP-request-URI-invalid`.
    BadUri,
    /// `internal-error`.
    Internal,
}

/// Why a request failed; maps onto the WIT error types of each interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CapError<'a> {
    /// The tenant was not granted the interface this request belongs to.
    NotGranted {
        /// The interface, e.g. `wasi:keyvalue/store`.
        interface: &'a str,
    },
    /// No such bucket (`wasi:keyvalue` `no-such-store`).
    NoSuchStore,
    /// Refused (`wasi:keyvalue` `access-denied`).
    AccessDenied,
    /// The provider's backend failed (`other` / `upstream` / `io`).
    Provider(&'a str),
    /// The request is malformed or out of range (too large, empty key, ...).
    BadRequest(&'a str),
    /// An outgoing HTTP request failed.
    Http {
        /// How.
        failure: HttpFailure,
        /// What the provider said.
        detail: &'a str,
    },
    /// A filesystem call failed, with `wasi:filesystem`'s error code.
    Fs(FsError),
}

/// A request with its id and the protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope<'a> {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// Chosen by the guest; echoed in the response.
    pub id: u32,
    /// The request.
    #[serde(borrow)]
    pub request: Request<'a>,
}

/// A response to the request with the same id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope<'a> {
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The request's id.
    pub id: u32,
    /// The outcome.
    #[serde(borrow)]
    pub result: Result<Reply<'a>, CapError<'a>>,
}

/// Why a frame or body could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The header announces a body longer than [`MAX_FRAME_LEN`].
    TooLong(u32),
    /// The body is not a valid postcard encoding of the expected type (or has trailing bytes).
    Malformed,
    /// The body is of another protocol version.
    Version(u16),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLong(n) => write!(f, "frame of {n} bytes exceeds the {MAX_FRAME_LEN}-byte limit"),
            Self::Malformed => f.write_str("malformed capability message"),
            Self::Version(v) => write!(f, "capability protocol version {v}, expected {PROTOCOL_VERSION}"),
        }
    }
}

/// Splits the first frame off `buf`: `Ok(Some((body, consumed)))` when a whole frame is there,
/// `Ok(None)` when more bytes are needed, `Err` when the header is unacceptable.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else { return Ok(None) };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong(len));
    }
    let end = FRAME_HEADER_LEN + len as usize;
    Ok(buf.get(FRAME_HEADER_LEN..end).map(|body| (body, end)))
}

fn encode_frame<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    let body = postcard::to_extend(value, core::mem::take(out)).map_err(|_| DecodeError::Malformed)?;
    *out = body;
    let len = u32::try_from(out.len() - start - FRAME_HEADER_LEN).map_err(|_| DecodeError::TooLong(u32::MAX))?;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(DecodeError::TooLong(len));
    }
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => Ok(value),
        _ => Err(DecodeError::Malformed),
    }
}

/// Appends `request` as a frame to `out` (fails only if it exceeds [`MAX_FRAME_LEN`]).
pub fn encode_request(id: u32, request: &Request<'_>, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    encode_frame(&RequestEnvelope { version: PROTOCOL_VERSION, id, request: request.clone() }, out)
}

/// Appends a response frame to `out` (fails only if it exceeds [`MAX_FRAME_LEN`]).
pub fn encode_response(
    id: u32,
    result: &Result<Reply<'_>, CapError<'_>>,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    encode_frame(&ResponseEnvelope { version: PROTOCOL_VERSION, id, result: result.clone() }, out)
}

/// Decodes a request body (as [`split_frame`] returns it).
pub fn decode_request(body: &[u8]) -> Result<RequestEnvelope<'_>, DecodeError> {
    check_version(body)?;
    decode_body(body)
}

/// Decodes a response body (as [`split_frame`] returns it).
pub fn decode_response(body: &[u8]) -> Result<ResponseEnvelope<'_>, DecodeError> {
    check_version(body)?;
    decode_body(body)
}

/// Reads the version (the first field of both envelopes) before the rest, so that a peer of
/// another version gets `Version` rather than `Malformed`.
fn check_version(body: &[u8]) -> Result<(), DecodeError> {
    let (version, _) = postcard::take_from_bytes::<u16>(body).map_err(|_| DecodeError::Malformed)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;
    use crate::fs::Time;

    fn requests() -> Vec<Request<'static>> {
        vec![
            Request::Noop,
            Request::Log { level: LogLevel::Warn, context: "ctx", message: "disk almost full" },
            Request::ConfigGet { key: "greeting" },
            Request::ConfigGetAll,
            Request::KvOpen { bucket: "" },
            Request::KvGet { bucket: "b", key: "k" },
            Request::KvSet { bucket: "b", key: "k", value: &[0, 1, 255] },
            Request::KvDelete { bucket: "b", key: "k" },
            Request::KvExists { bucket: "b", key: "k" },
            Request::KvListKeys { bucket: "b", cursor: Some(9) },
            Request::KvIncrement { bucket: "b", key: "counter", delta: u64::MAX },
            Request::KvGetMany { bucket: "b", keys: vec!["a", "b"] },
            Request::KvSetMany { bucket: "b", entries: vec![("a", b"1"), ("b", b"")] },
            Request::KvDeleteMany { bucket: "b", keys: vec![] },
            Request::FsPreopens,
            Request::FsOpenAt { dir: 0, follow: true, path: "a/b.txt", open: 1 | 8, flags: 3, close: vec![4, 5] },
            Request::FsRead { handle: 3, offset: u64::MAX, len: 1 << 20, into: Some(0x20_0000) },
            Request::FsWrite { handle: 3, offset: None, data: b"appended" },
            Request::FsStat { handle: 0, at: Some((false, "link")) },
            Request::FsSetTimes {
                handle: 0,
                at: None,
                accessed: NewTime::Now,
                modified: NewTime::At(Time { seconds: 1, nanoseconds: 2 }),
            },
            Request::FsReadDir { handle: 1, cursor: 1024 },
            Request::FsRename { dir: 0, old: "a", new_dir: 1, new: "b" },
            Request::FsLink { dir: 0, follow: false, old: "a", new_dir: 0, new: "c" },
            Request::FsSymlink { dir: 0, target: "../x", path: "l" },
            Request::FsClose { handle: 7 },
        ]
    }

    fn results() -> Vec<Result<Reply<'static>, CapError<'static>>> {
        vec![
            Ok(Reply::Unit),
            Ok(Reply::Bytes(None)),
            Ok(Reply::Bytes(Some(b"v"))),
            Ok(Reply::Text(Some("hi"))),
            Ok(Reply::Bool(true)),
            Ok(Reply::U64(u64::MAX)),
            Ok(Reply::Pairs(vec![("a", "1")])),
            Ok(Reply::Keys { keys: vec!["a"], cursor: None }),
            Ok(Reply::Values(vec![Some(("a", b"1")), None])),
            Err(CapError::NotGranted { interface: "wasi:keyvalue/store" }),
            Err(CapError::NoSuchStore),
            Err(CapError::AccessDenied),
            Err(CapError::Provider("disk full")),
            Err(CapError::BadRequest("key too long")),
            Ok(Reply::FsPreopens(vec![(0, "/data", false), (1, "/ro", true)])),
            Ok(Reply::FsOpened {
                handle: 2,
                kind: FileType::RegularFile,
                stat: Stat {
                    kind: FileType::RegularFile,
                    links: 1,
                    size: 3,
                    accessed: None,
                    modified: None,
                    changed: None,
                    hash: (5, 6),
                },
            }),
            Ok(Reply::FsStat(Stat {
                kind: FileType::Directory,
                links: 2,
                size: 4096,
                accessed: None,
                modified: Some(Time { seconds: 9, nanoseconds: 999_999_999 }),
                changed: None,
                hash: (1, 2),
            })),
            Ok(Reply::FsEntries { entries: vec![("a", FileType::RegularFile, (3, 4))], next: Some(1) }),
            Ok(Reply::FsHash(1, u64::MAX)),
            Err(CapError::Fs(FsError::NotEmpty)),
        ]
    }

    #[test]
    fn requests_round_trip_through_frames() {
        let mut stream = Vec::new();
        for (i, r) in requests().iter().enumerate() {
            encode_request(i as u32, r, &mut stream).unwrap();
        }
        let mut rest = &stream[..];
        for (i, want) in requests().iter().enumerate() {
            let (body, used) = split_frame(rest).unwrap().unwrap();
            let env = decode_request(body).unwrap();
            assert_eq!((env.version, env.id, &env.request), (PROTOCOL_VERSION, i as u32, want));
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn responses_round_trip_through_frames() {
        for (i, want) in results().iter().enumerate() {
            let mut frame = Vec::new();
            encode_response(i as u32, want, &mut frame).unwrap();
            let (body, used) = split_frame(&frame).unwrap().unwrap();
            assert_eq!(used, frame.len());
            let env = decode_response(body).unwrap();
            assert_eq!((env.id, &env.result), (i as u32, want));
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut frame = Vec::new();
        encode_request(7, &Request::KvSet { bucket: "b", key: "k", value: &[9; 100] }, &mut frame).unwrap();
        for cut in 0..frame.len() {
            assert_eq!(split_frame(&frame[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(split_frame(&frame).unwrap().is_some());
    }

    #[test]
    fn oversized_and_malformed_input_is_refused() {
        let huge = (MAX_FRAME_LEN + 1).to_le_bytes();
        assert_eq!(split_frame(&huge), Err(DecodeError::TooLong(MAX_FRAME_LEN + 1)));
        assert_eq!(decode_request(&[]), Err(DecodeError::Malformed));
        assert_eq!(decode_request(&[1, 0, 200]), Err(DecodeError::Malformed));
        // A valid body with a trailing byte.
        let mut frame = Vec::new();
        encode_request(1, &Request::Noop, &mut frame).unwrap();
        let mut body = frame[FRAME_HEADER_LEN..].to_vec();
        body.push(0);
        assert_eq!(decode_request(&body), Err(DecodeError::Malformed));
        // A request body read as a response: the reply is missing its variant byte.
        assert_eq!(decode_response(&frame[FRAME_HEADER_LEN..]), Err(DecodeError::Malformed));
        // A value too large for one frame does not encode.
        let big = vec![0u8; MAX_FRAME_LEN as usize];
        let mut out = vec![42];
        assert!(encode_request(1, &Request::KvSet { bucket: "b", key: "k", value: &big }, &mut out).is_err());
        assert_eq!(out, [42], "a failed encode leaves the buffer as it was");
    }

    #[test]
    fn another_version_is_named() {
        let mut frame = Vec::new();
        encode_request(1, &Request::Noop, &mut frame).unwrap();
        // The version is the first field, a varint: 1 encodes as one byte.
        frame[FRAME_HEADER_LEN] = 2;
        let body = &frame[FRAME_HEADER_LEN..];
        assert_eq!(decode_request(body), Err(DecodeError::Version(2)));
    }

    #[test]
    fn every_single_byte_corruption_decodes_or_fails_without_panicking() {
        let mut frames = Vec::new();
        for r in requests() {
            let mut f = Vec::new();
            encode_request(3, &r, &mut f).unwrap();
            frames.push(f);
        }
        for frame in frames {
            for i in 0..frame.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut bad = frame.clone();
                    bad[i] ^= flip;
                    if let Ok(Some((body, _))) = split_frame(&bad) {
                        let _ = decode_request(body);
                        let _ = decode_response(body);
                    }
                }
            }
        }
    }
}
