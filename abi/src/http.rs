//! The HTTP transport between the front door and a guest (groundwork for the HTTP issue): how
//! one request and its response cross a vsock stream.
//!
//! A message is a sequence of frames, each a 1-byte kind, a 4-byte little-endian payload
//! length and the payload: one head ([`RequestHead`] host to guest, [`ResponseHead`] guest to
//! host; postcard), any number of body chunks (raw bytes, at most [`MAX_CHUNK_LEN`] each), at
//! most one trailers frame (postcard), and an end frame. [`split`] takes one frame off a buffer
//! with bounds checks only; [`Order`] refuses frames out of that sequence. Heads and trailers
//! are checked as HTTP requires before anyone uses them: header names are lowercase tokens,
//! values carry no CR, LF or NUL, methods are tokens, paths start with `/` (or are `*`),
//! statuses are 100..=599, sizes are bounded. Nothing here panics on any input (the fuzz
//! target `http_decode` drives it).

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// Version of this transport; bumped on any incompatible change.
pub const HTTP_TRANSPORT_VERSION: u16 = 1;
/// Bytes before a frame's payload: its kind and its length.
pub const FRAME_HEADER_LEN: usize = 5;
/// Largest head or trailers payload.
pub const MAX_HEAD_LEN: u32 = 64 * 1024;
/// Largest body chunk payload.
pub const MAX_CHUNK_LEN: u32 = 64 * 1024;
/// Most header (or trailer) fields in one head.
pub const MAX_FIELDS: usize = 256;

const KIND_REQUEST_HEAD: u8 = 1;
const KIND_RESPONSE_HEAD: u8 = 2;
const KIND_BODY: u8 = 3;
const KIND_TRAILERS: u8 = 4;
const KIND_END: u8 = 5;
const KIND_ABORT: u8 = 6;
/// Longest abort reason.
pub const MAX_ABORT_LEN: u32 = 1024;

/// One header or trailer field: a lowercase name and its value bytes.
pub type Field<'a> = (&'a str, &'a [u8]);

/// A request as the guest receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead<'a> {
    /// [`HTTP_TRANSPORT_VERSION`].
    pub version: u16,
    /// The method, e.g. `GET`.
    #[serde(borrow)]
    pub method: &'a str,
    /// `http` or `https`, as the front door received it.
    pub scheme: &'a str,
    /// The authority (the Host).
    pub authority: &'a str,
    /// Path and query, e.g. `/a?b=c`.
    pub path_with_query: &'a str,
    /// Header fields, in order.
    #[serde(borrow)]
    pub headers: Vec<Field<'a>>,
}

/// A response as the guest sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead<'a> {
    /// [`HTTP_TRANSPORT_VERSION`].
    pub version: u16,
    /// The status code.
    pub status: u16,
    /// Header fields, in order.
    #[serde(borrow)]
    pub headers: Vec<Field<'a>>,
}

/// One frame, borrowed from the buffer it was split from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A request's head.
    RequestHead(RequestHead<'a>),
    /// A response's head.
    ResponseHead(ResponseHead<'a>),
    /// A body chunk (not empty).
    Body(&'a [u8]),
    /// The trailer fields.
    Trailers(Vec<Field<'a>>),
    /// The end of the message.
    End,
    /// The message failed before its end (the reason, UTF-8, at most [`MAX_ABORT_LEN`]).
    Abort(&'a str),
}

/// Why a frame or a sequence of frames is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpFrameError {
    /// An unknown frame kind.
    Kind(u8),
    /// A payload longer than its kind allows.
    TooLong(u32),
    /// A payload that does not decode.
    Malformed,
    /// Another transport version.
    Version(u16),
    /// A method that is not a token.
    BadMethod,
    /// A scheme other than `http`/`https`, or an authority with forbidden bytes.
    BadTarget,
    /// A path that does not start with `/` (and is not `*`), or has forbidden bytes.
    BadPath,
    /// A status outside 100..=599.
    BadStatus(u16),
    /// A field name that is not a lowercase token, or a value with CR, LF or NUL.
    BadField,
    /// More than [`MAX_FIELDS`] fields.
    TooManyFields,
    /// An empty body chunk, or an end frame with a payload.
    BadChunk,
    /// A frame out of sequence (e.g. a body before the head, anything after the end).
    OutOfOrder,
}

impl core::fmt::Display for HttpFrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Kind(k) => write!(f, "unknown frame kind {k}"),
            Self::TooLong(n) => write!(f, "a {n}-byte frame is longer than allowed"),
            Self::Malformed => f.write_str("a frame does not decode"),
            Self::Version(v) => write!(f, "transport version {v}, expected {HTTP_TRANSPORT_VERSION}"),
            Self::BadMethod => f.write_str("the method is not a token"),
            Self::BadTarget => f.write_str("a bad scheme or authority"),
            Self::BadPath => f.write_str("a bad path"),
            Self::BadStatus(s) => write!(f, "status {s} is not in 100..=599"),
            Self::BadField => f.write_str("a bad header or trailer field"),
            Self::TooManyFields => write!(f, "more than {MAX_FIELDS} fields"),
            Self::BadChunk => f.write_str("an empty body chunk or a non-empty end"),
            Self::OutOfOrder => f.write_str("a frame out of sequence"),
        }
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

fn check_fields(fields: &[Field<'_>]) -> Result<(), HttpFrameError> {
    if fields.len() > MAX_FIELDS {
        return Err(HttpFrameError::TooManyFields);
    }
    for (name, value) in fields {
        let name_ok = is_token(name) && !name.bytes().any(|b| b.is_ascii_uppercase());
        if !name_ok || value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(HttpFrameError::BadField);
        }
    }
    Ok(())
}

impl RequestHead<'_> {
    /// Checks what HTTP requires of a request head.
    pub fn check(&self) -> Result<(), HttpFrameError> {
        if self.version != HTTP_TRANSPORT_VERSION {
            return Err(HttpFrameError::Version(self.version));
        }
        if !is_token(self.method) {
            return Err(HttpFrameError::BadMethod);
        }
        let authority_ok = !self.authority.bytes().any(|b| b.is_ascii_control() || b" /?#@\\".contains(&b));
        if !matches!(self.scheme, "http" | "https") || !authority_ok {
            return Err(HttpFrameError::BadTarget);
        }
        let p = self.path_with_query;
        let path_ok =
            (p.starts_with('/') || p == "*") && !p.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'#');
        if !path_ok {
            return Err(HttpFrameError::BadPath);
        }
        check_fields(&self.headers)
    }
}

impl ResponseHead<'_> {
    /// Checks what HTTP requires of a response head.
    pub fn check(&self) -> Result<(), HttpFrameError> {
        if self.version != HTTP_TRANSPORT_VERSION {
            return Err(HttpFrameError::Version(self.version));
        }
        if !(100..=599).contains(&self.status) {
            return Err(HttpFrameError::BadStatus(self.status));
        }
        check_fields(&self.headers)
    }
}

fn decode_exact<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, HttpFrameError> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((value, [])) => Ok(value),
        _ => Err(HttpFrameError::Malformed),
    }
}

/// Takes one frame off the front of `buf`: `Ok(None)` if `buf` does not hold a whole frame
/// yet, else the frame (checked) and the bytes it used.
pub fn split(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, HttpFrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else { return Ok(None) };
    let kind = header[0];
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let max = match kind {
        KIND_REQUEST_HEAD | KIND_RESPONSE_HEAD | KIND_TRAILERS => MAX_HEAD_LEN,
        KIND_BODY => MAX_CHUNK_LEN,
        KIND_END => 0,
        KIND_ABORT => MAX_ABORT_LEN,
        other => return Err(HttpFrameError::Kind(other)),
    };
    if len > max {
        return Err(if kind == KIND_END { HttpFrameError::BadChunk } else { HttpFrameError::TooLong(len) });
    }
    let end = FRAME_HEADER_LEN + len as usize;
    let Some(payload) = buf.get(FRAME_HEADER_LEN..end) else { return Ok(None) };
    let frame = match kind {
        KIND_REQUEST_HEAD => {
            let head: RequestHead<'_> = decode_exact(payload)?;
            head.check()?;
            Frame::RequestHead(head)
        }
        KIND_RESPONSE_HEAD => {
            let head: ResponseHead<'_> = decode_exact(payload)?;
            head.check()?;
            Frame::ResponseHead(head)
        }
        KIND_BODY if payload.is_empty() => return Err(HttpFrameError::BadChunk),
        KIND_BODY => Frame::Body(payload),
        KIND_TRAILERS => {
            let fields: Vec<Field<'_>> = decode_exact(payload)?;
            check_fields(&fields)?;
            Frame::Trailers(fields)
        }
        KIND_ABORT => Frame::Abort(core::str::from_utf8(payload).map_err(|_| HttpFrameError::Malformed)?),
        _ => Frame::End,
    };
    Ok(Some((frame, end)))
}

fn push_frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

fn push_encoded<T: Serialize>(kind: u8, value: &T, out: &mut Vec<u8>) -> Result<(), HttpFrameError> {
    let payload = postcard::to_allocvec(value).map_err(|_| HttpFrameError::Malformed)?;
    let len = u32::try_from(payload.len()).map_err(|_| HttpFrameError::TooLong(u32::MAX))?;
    if len > MAX_HEAD_LEN {
        return Err(HttpFrameError::TooLong(len));
    }
    push_frame(kind, &payload, out);
    Ok(())
}

/// Appends a request head frame (checked first).
pub fn encode_request_head(head: &RequestHead<'_>, out: &mut Vec<u8>) -> Result<(), HttpFrameError> {
    head.check()?;
    push_encoded(KIND_REQUEST_HEAD, head, out)
}

/// Appends a response head frame (checked first).
pub fn encode_response_head(head: &ResponseHead<'_>, out: &mut Vec<u8>) -> Result<(), HttpFrameError> {
    head.check()?;
    push_encoded(KIND_RESPONSE_HEAD, head, out)
}

/// Appends `bytes` as body chunk frames of at most [`MAX_CHUNK_LEN`] (nothing for no bytes).
pub fn encode_body(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.chunks(MAX_CHUNK_LEN as usize) {
        push_frame(KIND_BODY, chunk, out);
    }
}

/// Appends a trailers frame (checked first).
pub fn encode_trailers(fields: &[Field<'_>], out: &mut Vec<u8>) -> Result<(), HttpFrameError> {
    check_fields(fields)?;
    push_encoded(KIND_TRAILERS, &fields, out)
}

/// Appends the end frame.
pub fn encode_end(out: &mut Vec<u8>) {
    push_frame(KIND_END, &[], out);
}

/// Appends an abort frame; the reason is cut to [`MAX_ABORT_LEN`] bytes (at a character
/// boundary).
pub fn encode_abort(reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(MAX_ABORT_LEN as usize);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    push_frame(KIND_ABORT, &reason.as_bytes()[..end], out);
}

/// Which message a stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Front door to guest: a request head first.
    Request,
    /// Guest to front door: a response head first.
    Response,
}

/// Where a message is in its sequence: head, body chunks, trailers, end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order {
    direction: Direction,
    state: State,
    body_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Body,
    Trailed,
    Ended,
}

impl Order {
    /// A message in `direction` that has not started.
    pub fn new(direction: Direction) -> Self {
        Self { direction, state: State::Head, body_bytes: 0 }
    }

    /// Accepts `frame` if it comes next in the sequence.
    pub fn accept(&mut self, frame: &Frame<'_>) -> Result<(), HttpFrameError> {
        self.state = match (self.state, frame, self.direction) {
            (State::Head, Frame::RequestHead(_), Direction::Request) => State::Body,
            (State::Head, Frame::ResponseHead(_), Direction::Response) => State::Body,
            (State::Body, Frame::Body(b), _) => {
                self.body_bytes = self.body_bytes.saturating_add(b.len() as u64);
                State::Body
            }
            (State::Body, Frame::Trailers(_), _) => State::Trailed,
            (State::Body | State::Trailed, Frame::End, _) => State::Ended,
            (State::Head | State::Body | State::Trailed, Frame::Abort(_), _) => State::Ended,
            _ => return Err(HttpFrameError::OutOfOrder),
        };
        Ok(())
    }

    /// Whether the end frame has been accepted.
    pub fn ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Body bytes accepted so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;

    fn request() -> RequestHead<'static> {
        RequestHead {
            version: HTTP_TRANSPORT_VERSION,
            method: "POST",
            scheme: "http",
            authority: "app.localhost:8080",
            path_with_query: "/echo?x=1",
            headers: vec![("content-type", b"text/plain"), ("x-empty", b"")],
        }
    }

    fn frames(mut buf: &[u8]) -> Result<Vec<Frame<'_>>, HttpFrameError> {
        let mut out = Vec::new();
        while let Some((frame, used)) = split(buf)? {
            out.push(frame);
            buf = &buf[used..];
        }
        assert!(buf.is_empty(), "a whole number of frames");
        Ok(out)
    }

    #[test]
    fn a_request_and_a_response_cross_in_order() {
        let mut buf = Vec::new();
        encode_request_head(&request(), &mut buf).unwrap();
        let body = vec![7u8; MAX_CHUNK_LEN as usize + 10];
        encode_body(&body, &mut buf);
        encode_trailers(&[("x-checksum", b"abc")], &mut buf).unwrap();
        encode_end(&mut buf);
        let got = frames(&buf).unwrap();
        assert_eq!(got.len(), 5, "head, two chunks, trailers, end");
        assert_eq!(got[0], Frame::RequestHead(request()));
        let mut order = Order::new(Direction::Request);
        for f in &got {
            order.accept(f).unwrap();
        }
        assert!(order.ended());
        assert_eq!(order.body_bytes(), body.len() as u64);

        let mut buf = Vec::new();
        let head = ResponseHead { version: HTTP_TRANSPORT_VERSION, status: 204, headers: vec![] };
        encode_response_head(&head, &mut buf).unwrap();
        encode_end(&mut buf);
        let got = frames(&buf).unwrap();
        let mut order = Order::new(Direction::Response);
        got.iter().for_each(|f| order.accept(f).unwrap());
        assert!(order.ended());
    }

    #[test]
    fn partial_frames_wait_for_more_and_oversized_ones_are_refused() {
        let mut buf = Vec::new();
        encode_request_head(&request(), &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert_eq!(split(&buf[..cut]), Ok(None), "cut at {cut}");
        }
        let mut long = vec![KIND_BODY];
        long.extend_from_slice(&(MAX_CHUNK_LEN + 1).to_le_bytes());
        assert_eq!(split(&long), Err(HttpFrameError::TooLong(MAX_CHUNK_LEN + 1)));
        let mut head = vec![KIND_RESPONSE_HEAD];
        head.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(split(&head), Err(HttpFrameError::TooLong(u32::MAX)), "refused before any allocation");
        assert_eq!(split(&[9, 0, 0, 0, 0]), Err(HttpFrameError::Kind(9)));
        assert_eq!(split(&[KIND_END, 1, 0, 0, 0, 0]), Err(HttpFrameError::BadChunk));
        assert_eq!(split(&[KIND_BODY, 0, 0, 0, 0]), Err(HttpFrameError::BadChunk));
        // Trailing bytes inside a head's payload are malformed, not ignored.
        let mut payload = postcard::to_allocvec(&request()).unwrap();
        payload.push(0);
        let mut buf = vec![KIND_REQUEST_HEAD];
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&payload);
        assert_eq!(split(&buf), Err(HttpFrameError::Malformed));
    }

    #[test]
    fn heads_are_checked_as_http_requires() {
        let bad_requests: [(RequestHead<'_>, HttpFrameError); 8] = [
            (RequestHead { method: "GE T", ..request() }, HttpFrameError::BadMethod),
            (RequestHead { method: "", ..request() }, HttpFrameError::BadMethod),
            (RequestHead { scheme: "ftp", ..request() }, HttpFrameError::BadTarget),
            (RequestHead { authority: "a/b", ..request() }, HttpFrameError::BadTarget),
            (RequestHead { path_with_query: "echo", ..request() }, HttpFrameError::BadPath),
            (RequestHead { path_with_query: "/a\r\nb", ..request() }, HttpFrameError::BadPath),
            (RequestHead { headers: vec![("Content-Type", b"x")], ..request() }, HttpFrameError::BadField),
            (RequestHead { version: 2, ..request() }, HttpFrameError::Version(2)),
        ];
        for (head, err) in bad_requests {
            assert_eq!(head.check(), Err(err), "{head:?}");
            assert_eq!(encode_request_head(&head, &mut Vec::new()), Err(err));
        }
        let smuggled = RequestHead { headers: vec![("x", b"a\r\nset-cookie: b")], ..request() };
        assert_eq!(smuggled.check(), Err(HttpFrameError::BadField));
        let many: Vec<Field<'_>> = (0..=MAX_FIELDS).map(|_| ("x", &b"y"[..])).collect();
        assert_eq!(check_fields(&many), Err(HttpFrameError::TooManyFields));
        for status in [0, 99, 600, u16::MAX] {
            let head = ResponseHead { version: HTTP_TRANSPORT_VERSION, status, headers: vec![] };
            assert_eq!(head.check(), Err(HttpFrameError::BadStatus(status)));
        }
        // A forged head on the wire is refused by `split` too.
        let head = ResponseHead { version: HTTP_TRANSPORT_VERSION, status: 700, headers: vec![] };
        let payload = postcard::to_allocvec(&head).unwrap();
        let mut buf = vec![KIND_RESPONSE_HEAD];
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&payload);
        assert_eq!(split(&buf), Err(HttpFrameError::BadStatus(700)));
    }

    #[test]
    fn frames_out_of_sequence_are_refused() {
        let head = Frame::ResponseHead(ResponseHead { version: 1, status: 200, headers: vec![] });
        let cases: [(&[Frame<'_>], Direction); 5] = [
            (&[Frame::Body(b"x")], Direction::Response),
            (&[Frame::RequestHead(request())], Direction::Response),
            (&[head.clone(), head.clone()], Direction::Response),
            (&[head.clone(), Frame::Trailers(vec![]), Frame::Body(b"x")], Direction::Response),
            (&[head.clone(), Frame::End, Frame::End], Direction::Response),
        ];
        for (seq, dir) in cases {
            let mut order = Order::new(dir);
            let (last, first) = seq.split_last().unwrap();
            first.iter().for_each(|f| order.accept(f).unwrap());
            assert_eq!(order.accept(last), Err(HttpFrameError::OutOfOrder), "{seq:?}");
        }
    }

    #[test]
    fn an_abort_ends_a_message_anywhere_before_its_end() {
        let mut buf = Vec::new();
        encode_abort(&"é".repeat(600), &mut buf);
        let (frame, used) = split(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        let Frame::Abort(reason) = frame else { panic!("{frame:?}") };
        assert_eq!(reason.len(), 1024, "cut at a character boundary within the limit");
        let mut order = Order::new(Direction::Response);
        order.accept(&Frame::Abort("x")).unwrap();
        assert!(order.ended());
        assert_eq!(order.accept(&Frame::Abort("x")), Err(HttpFrameError::OutOfOrder));
        let mut bad = vec![KIND_ABORT, 2, 0, 0, 0, 0xff, 0xfe];
        assert_eq!(split(&bad), Err(HttpFrameError::Malformed));
        bad[1] = 0;
        bad[2] = 8;
        assert_eq!(split(&bad), Err(HttpFrameError::TooLong(2048)));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A fixed pseudo-random stream (xorshift), sliced at every offset.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8
            })
            .collect();
        for start in 0..bytes.len() {
            let _ = split(&bytes[start..]);
        }
    }

    /// The fuzz target's property (`fuzz/fuzz_targets/http_decode.rs`) over mutations of valid
    /// messages, so that it runs in every `cargo test` (cargo-fuzz needs a nightly toolchain):
    /// 200,000 inputs, each a valid request or response with 1 to 8 bytes replaced, inserted
    /// or cut; decoding must never panic, and every head that decodes must re-encode to itself.
    #[test]
    fn mutated_messages_decode_or_fail_cleanly() {
        let mut valid = Vec::new();
        encode_request_head(&request(), &mut valid).unwrap();
        encode_body(b"hello", &mut valid);
        encode_trailers(&[("x-t", b"1")], &mut valid).unwrap();
        encode_end(&mut valid);
        let response = ResponseHead { version: 1, status: 204, headers: vec![("a", b"b"), ("set-cookie", b"x=1")] };
        encode_response_head(&response, &mut valid).unwrap();
        encode_body(&[0u8; 300], &mut valid);
        encode_abort("gone", &mut valid);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut decoded, mut refused) = (0u32, 0u32);
        for _ in 0..200_000 {
            let mut input = valid.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() as usize) % input.len();
                match next() % 3 {
                    0 => input[at] = next() as u8,
                    1 => input.insert(at, next() as u8),
                    _ => {
                        input.remove(at);
                    }
                }
            }
            let mut rest = &input[..];
            let mut orders = [Order::new(Direction::Request), Order::new(Direction::Response)];
            loop {
                match split(rest) {
                    Ok(Some((frame, used))) => {
                        decoded += 1;
                        for order in &mut orders {
                            let _ = order.accept(&frame);
                        }
                        let mut again = Vec::new();
                        match &frame {
                            Frame::RequestHead(h) => encode_request_head(h, &mut again).unwrap(),
                            Frame::ResponseHead(h) => encode_response_head(h, &mut again).unwrap(),
                            _ => {}
                        }
                        if !again.is_empty() {
                            assert_eq!(split(&again).unwrap().map(|(f, _)| f), Some(frame.clone()));
                        }
                        rest = &rest[used..];
                    }
                    Ok(None) => break,
                    Err(_) => {
                        refused += 1;
                        break;
                    }
                }
            }
        }
        assert!(decoded > 200_000 && refused > 10_000, "decoded {decoded}, refused {refused}");
    }
}
