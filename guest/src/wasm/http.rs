//! `wasi:http` in the guest: the types (fields, requests, responses, bodies, trailers) over the
//! front door's framed transport (`wasmvisor_abi::http`), and the serving loop of an HTTP VM.
//!
//! The VM connects once to the host's [`HTTP_PORT`] when its component is ready (engine built,
//! component deserialized and linked into an `InstancePre`); that connection is the readiness
//! signal and carries every request, one exchange after another. For each request the guest
//! makes a fresh store and instance (the semantics of `wasmtime serve`), calls
//! `wasi:http/incoming-handler.handle`, and streams the response back: the head when the
//! handler sets its `response-outparam`, body chunks as it writes and flushes, trailers and the
//! end when it finishes the body. The request body is read from the connection as the handler
//! reads its stream, and whatever it leaves unread is drained before the next request. A trap
//! before the head is answered 500; after it, the response is aborted. Frames from the host
//! are checked like any other input; a broken stream ends the VM (the host starts another).
//!
//! Outgoing requests (`wasi:http/outgoing-handler`) go to the host's `http-outgoing` provider
//! through the capability broker, one whole request and one whole response per call (bodies
//! are buffered, at most about 1 MiB each way): the request is sent when its future is first
//! asked (its body must be finished by then). A tenant without the grant, or a host not on its
//! allow-list, gets `HTTP-request-denied`.

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;

use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Store, Trap};
use wasmvisor_abi::http::{
    self as transport, Direction, Frame, HTTP_TRANSPORT_VERSION, MAX_CHUNK_LEN, Order, ResponseHead,
};
use wasmvisor_abi::vsock::HTTP_PORT;

use super::caps::BrokerConn;
use super::wasi::{self as p2, Ctx, InputStream, OutputStream, Pollable};
use crate::vsock::{Connection, SharedVsock, Vsock, VsockError};

wasmtime::component::bindgen!({
    path: "wit",
    world: "wasmvisor:guest/http",
    imports: { default: trappable },
    with: {
        "wasi:io": super::wasi::wasi::io,
        "wasi:clocks": super::wasi::wasi::clocks,
        "wasi:random": super::wasi::wasi::random,
        "wasi:cli": super::wasi::wasi::cli,
        "wasi:http/types.fields": Fields,
        "wasi:http/types.incoming-request": IncomingRequest,
        "wasi:http/types.outgoing-request": OutgoingRequest,
        "wasi:http/types.request-options": RequestOptions,
        "wasi:http/types.response-outparam": ResponseOutparam,
        "wasi:http/types.incoming-response": IncomingResponse,
        "wasi:http/types.incoming-body": IncomingBody,
        "wasi:http/types.future-trailers": FutureTrailers,
        "wasi:http/types.outgoing-response": OutgoingResponse,
        "wasi:http/types.outgoing-body": OutgoingBody,
        "wasi:http/types.future-incoming-response": FutureIncomingResponse,
    },
});

use wasi::http::types::{self, DnsErrorPayload, ErrorCode, HeaderError, Method, Scheme};
use wasmvisor_abi::capability::{CapError, HttpFailure, Reply, Request as CapRequest};

pub use super::wasi::Never;

/// Most bytes a handler may write to a response body before it sets the response.
const EARLY_BODY_MAX: usize = 1 << 20;
/// Header names WASI forbids a component to set (hop-by-hop, or owned by the transport), as
/// wasmtime's implementation does.
const FORBIDDEN: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "http2-settings"];

/// Header or trailer fields, owned: lowercase names and their values.
type FieldList = Vec<(String, Vec<u8>)>;

// ---- the connection ----

/// The request connection: the device, the connection, and what has arrived but is not used yet.
pub struct Link {
    vsock: SharedVsock,
    conn: Connection,
    buf: Vec<u8>,
    /// Encoded frames not sent yet (sent together, so a small response is one packet).
    out: Vec<u8>,
    /// Set when the stream is broken: the serving loop ends.
    broken: Option<String>,
}

/// A frame taken off the connection, owned.
enum Owned {
    Head(Request),
    Body(Vec<u8>),
    Trailers(Vec<(String, Vec<u8>)>),
    End,
    Abort(String),
}

/// A request's head.
struct Request {
    method: String,
    scheme: String,
    authority: String,
    path_with_query: String,
    headers: Vec<(String, Vec<u8>)>,
}

fn owned_fields(fields: &[transport::Field<'_>]) -> Vec<(String, Vec<u8>)> {
    fields.iter().map(|(n, v)| ((*n).to_owned(), v.to_vec())).collect()
}

impl Link {
    /// Waits for the next frame of the request message `order` tracks.
    fn next(&mut self, order: &mut Order) -> Result<Owned, String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        let result = loop {
            match transport::split(&self.buf) {
                Ok(Some((frame, used))) => {
                    let accepted = order.accept(&frame).map_err(|e| alloc::format!("request stream: {e}"));
                    let owned = accepted.map(|()| match frame {
                        Frame::RequestHead(h) => Owned::Head(Request {
                            method: h.method.to_owned(),
                            scheme: h.scheme.to_owned(),
                            authority: h.authority.to_owned(),
                            path_with_query: h.path_with_query.to_owned(),
                            headers: owned_fields(&h.headers),
                        }),
                        Frame::Body(b) => Owned::Body(b.to_vec()),
                        Frame::Trailers(t) => Owned::Trailers(owned_fields(&t)),
                        Frame::End => Owned::End,
                        Frame::Abort(why) => Owned::Abort(why.to_owned()),
                        // `order` refuses a response head on the request stream.
                        Frame::ResponseHead(_) => Owned::End,
                    });
                    self.buf.drain(..used);
                    break owned;
                }
                Ok(None) => {
                    let mut vsock = self.vsock.borrow_mut();
                    if let Err(e) = vsock.recv_some(self.conn, &mut self.buf) {
                        break Err(alloc::format!("request connection: {e}"));
                    }
                }
                Err(e) => break Err(alloc::format!("request stream: {e}")),
            }
        };
        if let Err(why) = &result {
            self.broken = Some(why.clone());
        }
        result
    }

    /// Sends what is queued, now (`soon`: before the guest next waits, see
    /// [`Vsock::send_soon`]; a handler's flush followed by the body's end is one packet).
    fn flush(&mut self, soon: bool) -> Result<(), String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        let mut vsock = self.vsock.borrow_mut();
        let sent = match soon {
            true => vsock.send_soon(self.conn, &self.out),
            false => vsock.send(self.conn, &self.out),
        };
        drop(vsock);
        self.out.clear();
        sent.map_err(|e: VsockError| {
            let why = alloc::format!("response connection: {e}");
            self.broken = Some(why.clone());
            why
        })
    }
}

// ---- the exchange a store serves ----

/// Where one request/response exchange is; lives in the store's context.
pub struct Exchange {
    link: Rc<RefCell<Link>>,
    request: Order,
    /// The request body's unread bytes (of the current chunk) and whether it ended.
    chunk: Vec<u8>,
    chunk_pos: usize,
    body_ended: bool,
    body_error: Option<String>,
    request_trailers: Option<Vec<(String, Vec<u8>)>>,
    response: ResponseState,
    /// Bytes written to response bodies (by the body's handle) before a response was set.
    early: BTreeMap<u32, Vec<u8>>,
    /// Bodies finished before their response was set, with their trailers.
    early_finished: BTreeMap<u32, Option<FieldList>>,
    /// The handle of the set response's body.
    current_body: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseState {
    /// Nothing sent; body bytes written so far wait in `early`.
    NotSet,
    /// The head is queued or sent; the body is open.
    Streaming,
    /// Finished (end sent) or aborted.
    Done,
}

impl Exchange {
    /// Sends the response bytes a flush deferred (the handler is about to wait).
    pub(crate) fn push_deferred(&self) {
        let link = self.link.borrow();
        link.vsock.borrow_mut().push_deferred();
    }

    fn new(link: Rc<RefCell<Link>>, order: Order) -> Self {
        Self {
            link,
            request: order,
            chunk: Vec::new(),
            chunk_pos: 0,
            body_ended: false,
            body_error: None,
            request_trailers: None,
            response: ResponseState::NotSet,
            early: BTreeMap::new(),
            early_finished: BTreeMap::new(),
            current_body: None,
        }
    }

    /// Moves to the next body chunk, if the current one is used up; false at the end.
    fn fill(&mut self) -> Result<bool, String> {
        while self.chunk_pos >= self.chunk.len() {
            if self.body_ended {
                return Ok(false);
            }
            if let Some(why) = &self.body_error {
                return Err(why.clone());
            }
            let frame = self.link.borrow_mut().next(&mut self.request);
            match frame {
                Ok(Owned::Body(b)) => {
                    self.chunk = b;
                    self.chunk_pos = 0;
                }
                Ok(Owned::Trailers(t)) => self.request_trailers = Some(t),
                Ok(Owned::End) => self.body_ended = true,
                Ok(Owned::Abort(why)) => {
                    let why = alloc::format!("the client's request body failed: {why}");
                    self.body_error = Some(why.clone());
                    return Err(why);
                }
                Ok(Owned::Head(_)) => return Err("request stream: a head inside a body".to_string()),
                Err(why) => {
                    self.body_error = Some(why.clone());
                    return Err(why);
                }
            }
        }
        Ok(true)
    }

    /// Up to `len` bytes of the request body; `Ok(None)` at its end.
    fn read_body(&mut self, len: usize) -> Result<Option<Vec<u8>>, String> {
        if !self.fill()? {
            return Ok(None);
        }
        let end = self.chunk.len().min(self.chunk_pos + len);
        let bytes = self.chunk[self.chunk_pos..end].to_vec();
        self.chunk_pos = end;
        Ok(Some(bytes))
    }

    /// Reads the rest of the request body (after the handler, or for its trailers).
    fn drain(&mut self) -> Result<(), String> {
        while self.fill()? {
            self.chunk_pos = self.chunk.len();
        }
        Ok(())
    }

    /// Queues the response head (and any body written before it).
    fn send_head(&mut self, status: u16, headers: &[(String, Vec<u8>)], early: &[u8]) -> Result<(), String> {
        let fields: Vec<transport::Field<'_>> = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        let head = ResponseHead { version: HTTP_TRANSPORT_VERSION, status, headers: fields };
        let mut link = self.link.borrow_mut();
        transport::encode_response_head(&head, &mut link.out).map_err(|e| alloc::format!("response head: {e}"))?;
        for chunk in early.chunks(MAX_CHUNK_LEN as usize) {
            transport::encode_body(chunk, &mut link.out);
        }
        self.response = ResponseState::Streaming;
        Ok(())
    }

    fn write_body(&mut self, bytes: &[u8], flush: bool) -> Result<(), String> {
        let mut link = self.link.borrow_mut();
        for chunk in bytes.chunks(MAX_CHUNK_LEN as usize) {
            transport::encode_body(chunk, &mut link.out);
        }
        if flush || link.out.len() >= MAX_CHUNK_LEN as usize {
            link.flush(true)?;
        }
        Ok(())
    }

    fn finish(&mut self, trailers: Option<&[(String, Vec<u8>)]>) -> Result<(), String> {
        let mut link = self.link.borrow_mut();
        if let Some(trailers) = trailers {
            let fields: Vec<transport::Field<'_>> = trailers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
            transport::encode_trailers(&fields, &mut link.out).map_err(|e| alloc::format!("trailers: {e}"))?;
        }
        transport::encode_end(&mut link.out);
        self.response = ResponseState::Done;
        link.flush(false)
    }

    /// Ends the response after the handler: a 500 if it never set one, an abort if it did not
    /// finish the body.
    fn conclude(&mut self, failure: Option<&str>) -> Result<(), String> {
        match self.response {
            ResponseState::Done => Ok(()),
            ResponseState::NotSet => {
                self.send_head(500, &[], &[])?;
                self.finish(None)
            }
            ResponseState::Streaming => {
                let mut link = self.link.borrow_mut();
                let why = failure.unwrap_or("the handler returned without finishing the response body");
                transport::encode_abort(why, &mut link.out);
                self.response = ResponseState::Done;
                link.flush(false)
            }
        }
    }
}

// ---- resources ----

/// `fields`: header or trailer fields, names lowercase.
pub struct Fields {
    entries: Vec<(String, Vec<u8>)>,
    mutable: bool,
}

/// `incoming-request`.
pub struct IncomingRequest {
    method: Method,
    scheme: Option<Scheme>,
    authority: String,
    path_with_query: String,
    headers: Vec<(String, Vec<u8>)>,
    consumed: bool,
}

/// `incoming-body`: the exchange's request body, or an outgoing request's response body.
pub struct IncomingBody {
    stream_taken: bool,
    /// The response body of an outgoing request (whole); `None` for the request's.
    buffered: Option<Vec<u8>>,
}

/// `future-trailers` of an incoming body.
pub struct FutureTrailers {
    taken: bool,
    /// Of a buffered body (which has none).
    buffered: bool,
}

/// `incoming-response`: an outgoing request's response.
pub struct IncomingResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

/// `future-incoming-response`: an outgoing request, made when first asked for.
pub struct FutureIncomingResponse {
    request: Option<(OutgoingRequest, Option<RequestOptions>)>,
    result: Option<Result<IncomingResponse, ErrorCode>>,
    taken: bool,
}

/// `outgoing-response`.
pub struct OutgoingResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    /// Its body's handle, once taken.
    body: Option<u32>,
}

/// `outgoing-body`: of a response (writes stream to the front door once the response is
/// set), or of an outgoing request.
pub enum OutgoingBody {
    /// A response's body.
    Response {
        /// Whether its output stream was taken.
        stream_taken: bool,
    },
    /// An outgoing request's body.
    Request {
        /// Whether its output stream was taken.
        stream_taken: bool,
        /// What was written so far.
        buf: Vec<u8>,
    },
}

/// Largest outgoing request body (it crosses in one capability frame).
const OUTGOING_BODY_MAX: usize = (wasmvisor_abi::capability::MAX_FRAME_LEN as usize) - 64 * 1024;

/// `response-outparam`.
pub struct ResponseOutparam;

/// `outgoing-request`.
pub struct OutgoingRequest {
    method: Method,
    scheme: Option<Scheme>,
    authority: Option<String>,
    path_with_query: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    body_taken: bool,
    /// Its body's handle, once taken.
    body: Option<u32>,
}

/// `request-options`.
#[derive(Default)]
pub struct RequestOptions {
    connect: Option<u64>,
    first_byte: Option<u64>,
    between_bytes: Option<u64>,
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Checks a field as a component may set it: a token name (lowercased), a valid value, not
/// a forbidden one.
fn field(name: &str, value: &[u8]) -> Result<String, HeaderError> {
    if !is_token(name) || !valid_value(value) {
        return Err(HeaderError::InvalidSyntax);
    }
    let name = name.to_ascii_lowercase();
    if FORBIDDEN.contains(&name.as_str()) {
        return Err(HeaderError::Forbidden);
    }
    Ok(name)
}

fn method_of(s: &str) -> Method {
    match s {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_owned()),
    }
}

impl Ctx {
    fn exchange(&mut self) -> wasmtime::Result<&mut Exchange> {
        self.http.as_mut().ok_or_else(|| wasmtime::format_err!("wasmvisor: no HTTP request is being served"))
    }

    fn push_fields(&mut self, entries: Vec<(String, Vec<u8>)>, mutable: bool) -> wasmtime::Result<Resource<Fields>> {
        Ok(self.table.push(Fields { entries, mutable })?)
    }

    /// `input-stream.read` on the request body.
    pub(super) fn read_request_body(
        &mut self,
        len: u64,
    ) -> wasmtime::Result<Result<Vec<u8>, p2::wasi::io::streams::StreamError>> {
        let len = len.min(u64::from(MAX_CHUNK_LEN)) as usize;
        match self.exchange()?.read_body(len) {
            Ok(Some(bytes)) => Ok(Ok(bytes)),
            Ok(None) => Ok(Err(p2::wasi::io::streams::StreamError::Closed)),
            Err(why) => {
                let err = self.table.push(p2::IoError(why, None))?;
                Ok(Err(p2::wasi::io::streams::StreamError::LastOperationFailed(err)))
            }
        }
    }

    /// `output-stream.write` (and flush) on a body; `body` is the `outgoing-body` it came from.
    pub(super) fn write_outgoing_body(
        &mut self,
        body: u32,
        bytes: &[u8],
        flush: bool,
    ) -> wasmtime::Result<Result<(), p2::wasi::io::streams::StreamError>> {
        let handle: Resource<OutgoingBody> = Resource::new_borrow(body);
        let failed = |ctx: &mut Ctx, why: &str| -> wasmtime::Result<_> {
            let err = ctx.table.push(p2::IoError(why.to_string(), None))?;
            Ok(Err(p2::wasi::io::streams::StreamError::LastOperationFailed(err)))
        };
        match self.table.get_mut(&handle) {
            Ok(OutgoingBody::Response { .. }) => {}
            Ok(OutgoingBody::Request { buf, .. }) => {
                if buf.len() + bytes.len() > OUTGOING_BODY_MAX {
                    return failed(self, "an outgoing request body is limited to 960 KiB");
                }
                buf.extend_from_slice(bytes);
                return Ok(Ok(()));
            }
            // Finished or dropped.
            Err(_) => return Ok(Err(p2::wasi::io::streams::StreamError::Closed)),
        }
        let exchange = self.exchange()?;
        let outcome = match exchange.response {
            ResponseState::Streaming if exchange.current_body == Some(body) => exchange.write_body(bytes, flush),
            ResponseState::NotSet => {
                let early = exchange.early.entry(body).or_default();
                if early.len() + bytes.len() > EARLY_BODY_MAX {
                    Err("more than 1 MiB written to a body before its response was set".to_string())
                } else {
                    early.extend_from_slice(bytes);
                    Ok(())
                }
            }
            _ => return Ok(Err(p2::wasi::io::streams::StreamError::Closed)),
        };
        match outcome {
            Ok(()) => Ok(Ok(())),
            Err(why) => failed(self, &why),
        }
    }
}

/// Adds `wasi:http/types` and `wasi:http/outgoing-handler` if the component imports them.
pub fn add_to_linker(linker: &mut Linker<Ctx>, wants: &dyn Fn(&str) -> bool) -> wasmtime::Result<()> {
    if wants("wasi:http/types") {
        types::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, &types::LinkOptions::default(), |ctx| ctx)?;
    }
    if wants("wasi:http/outgoing-handler") {
        wasi::http::outgoing_handler::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |ctx| ctx)?;
    }
    Ok(())
}

impl types::Host for Ctx {
    fn http_error_code(&mut self, _err: Resource<p2::IoError>) -> wasmtime::Result<Option<ErrorCode>> {
        Ok(None)
    }
}

impl types::HostFields for Ctx {
    fn new(&mut self) -> wasmtime::Result<Resource<Fields>> {
        self.push_fields(Vec::new(), true)
    }

    fn from_list(
        &mut self,
        entries: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<Resource<Fields>, HeaderError>> {
        let mut checked = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            match field(&name, &value) {
                Ok(name) => checked.push((name, value)),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(self.push_fields(checked, true)?))
    }

    fn get(&mut self, f: Resource<Fields>, name: String) -> wasmtime::Result<Vec<Vec<u8>>> {
        let f = self.table.get(&f)?;
        Ok(f.entries.iter().filter(|(n, _)| n.eq_ignore_ascii_case(&name)).map(|(_, v)| v.clone()).collect())
    }

    fn has(&mut self, f: Resource<Fields>, name: String) -> wasmtime::Result<bool> {
        Ok(self.table.get(&f)?.entries.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)))
    }

    fn set(
        &mut self,
        f: Resource<Fields>,
        name: String,
        values: Vec<Vec<u8>>,
    ) -> wasmtime::Result<Result<(), HeaderError>> {
        let fields = self.table.get_mut(&f)?;
        if !fields.mutable {
            return Ok(Err(HeaderError::Immutable));
        }
        let mut lower = String::new();
        for v in &values {
            match field(&name, v) {
                Ok(n) => lower = n,
                Err(e) => return Ok(Err(e)),
            }
        }
        if values.is_empty() {
            match field(&name, b"") {
                Ok(n) => lower = n,
                Err(e) => return Ok(Err(e)),
            }
        }
        fields.entries.retain(|(n, _)| *n != lower);
        fields.entries.extend(values.into_iter().map(|v| (lower.clone(), v)));
        Ok(Ok(()))
    }

    fn delete(&mut self, f: Resource<Fields>, name: String) -> wasmtime::Result<Result<(), HeaderError>> {
        let fields = self.table.get_mut(&f)?;
        if !fields.mutable {
            return Ok(Err(HeaderError::Immutable));
        }
        let name = match field(&name, b"") {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        fields.entries.retain(|(n, _)| *n != name);
        Ok(Ok(()))
    }

    fn append(
        &mut self,
        f: Resource<Fields>,
        name: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), HeaderError>> {
        let fields = self.table.get_mut(&f)?;
        if !fields.mutable {
            return Ok(Err(HeaderError::Immutable));
        }
        match field(&name, &value) {
            Ok(n) => fields.entries.push((n, value)),
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(()))
    }

    fn entries(&mut self, f: Resource<Fields>) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        Ok(self.table.get(&f)?.entries.clone())
    }

    fn clone(&mut self, f: Resource<Fields>) -> wasmtime::Result<Resource<Fields>> {
        let entries = self.table.get(&f)?.entries.clone();
        self.push_fields(entries, true)
    }

    fn drop(&mut self, f: Resource<Fields>) -> wasmtime::Result<()> {
        self.table.delete(f)?;
        Ok(())
    }
}

impl types::HostIncomingRequest for Ctx {
    fn method(&mut self, r: Resource<IncomingRequest>) -> wasmtime::Result<Method> {
        Ok(self.table.get(&r)?.method.clone())
    }

    fn path_with_query(&mut self, r: Resource<IncomingRequest>) -> wasmtime::Result<Option<String>> {
        Ok(Some(self.table.get(&r)?.path_with_query.clone()))
    }

    fn scheme(&mut self, r: Resource<IncomingRequest>) -> wasmtime::Result<Option<Scheme>> {
        Ok(self.table.get(&r)?.scheme.clone())
    }

    fn authority(&mut self, r: Resource<IncomingRequest>) -> wasmtime::Result<Option<String>> {
        Ok(Some(self.table.get(&r)?.authority.clone()))
    }

    fn headers(&mut self, r: Resource<IncomingRequest>) -> wasmtime::Result<Resource<Fields>> {
        let entries = self.table.get(&r)?.headers.clone();
        self.push_fields(entries, false)
    }

    fn consume(&mut self, r: Resource<IncomingRequest>) -> wasmtime::Result<Result<Resource<IncomingBody>, ()>> {
        let req = self.table.get_mut(&r)?;
        if req.consumed {
            return Ok(Err(()));
        }
        req.consumed = true;
        Ok(Ok(self.table.push(IncomingBody { stream_taken: false, buffered: None })?))
    }

    fn drop(&mut self, r: Resource<IncomingRequest>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

impl types::HostIncomingBody for Ctx {
    fn stream(&mut self, b: Resource<IncomingBody>) -> wasmtime::Result<Result<Resource<InputStream>, ()>> {
        let body = self.table.get_mut(&b)?;
        if body.stream_taken {
            return Ok(Err(()));
        }
        body.stream_taken = true;
        let stream = match body.buffered.take() {
            Some(data) => InputStream::Bytes { data, pos: 0 },
            None => InputStream::RequestBody,
        };
        Ok(Ok(self.table.push(stream)?))
    }

    fn finish(&mut self, b: Resource<IncomingBody>) -> wasmtime::Result<Resource<FutureTrailers>> {
        let body = self.table.delete(b)?;
        let buffered = body.buffered.is_some() || body.stream_taken && self.http.is_none();
        Ok(self.table.push(FutureTrailers { taken: false, buffered })?)
    }

    fn drop(&mut self, b: Resource<IncomingBody>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl types::HostFutureTrailers for Ctx {
    fn subscribe(&mut self, _f: Resource<FutureTrailers>) -> wasmtime::Result<Resource<Pollable>> {
        // Reading the trailers blocks until they arrive, so they are always "ready".
        Ok(self.table.push(Pollable::Ready)?)
    }

    #[allow(clippy::type_complexity)]
    fn get(
        &mut self,
        f: Resource<FutureTrailers>,
    ) -> wasmtime::Result<Option<Result<Result<Option<Resource<Fields>>, ErrorCode>, ()>>> {
        let fut = self.table.get_mut(&f)?;
        if fut.taken {
            return Ok(Some(Err(())));
        }
        fut.taken = true;
        if fut.buffered {
            return Ok(Some(Ok(Ok(None))));
        }
        let exchange = self.exchange()?;
        if let Err(why) = exchange.drain() {
            return Ok(Some(Ok(Err(ErrorCode::InternalError(Some(why))))));
        }
        match exchange.request_trailers.take() {
            Some(t) => Ok(Some(Ok(Ok(Some(self.push_fields(t, false)?))))),
            None => Ok(Some(Ok(Ok(None)))),
        }
    }

    fn drop(&mut self, f: Resource<FutureTrailers>) -> wasmtime::Result<()> {
        self.table.delete(f)?;
        Ok(())
    }
}

impl types::HostOutgoingResponse for Ctx {
    fn new(&mut self, headers: Resource<Fields>) -> wasmtime::Result<Resource<OutgoingResponse>> {
        let headers = self.table.delete(headers)?.entries;
        Ok(self.table.push(OutgoingResponse { status: 200, headers, body: None })?)
    }

    fn status_code(&mut self, r: Resource<OutgoingResponse>) -> wasmtime::Result<u16> {
        Ok(self.table.get(&r)?.status)
    }

    fn set_status_code(&mut self, r: Resource<OutgoingResponse>, status: u16) -> wasmtime::Result<Result<(), ()>> {
        if !(100..=599).contains(&status) {
            return Ok(Err(()));
        }
        self.table.get_mut(&r)?.status = status;
        Ok(Ok(()))
    }

    fn headers(&mut self, r: Resource<OutgoingResponse>) -> wasmtime::Result<Resource<Fields>> {
        // A child handle: a copy that cannot be changed (the response's own are final).
        let entries = self.table.get(&r)?.headers.clone();
        self.push_fields(entries, false)
    }

    fn body(&mut self, r: Resource<OutgoingResponse>) -> wasmtime::Result<Result<Resource<OutgoingBody>, ()>> {
        if self.table.get(&r)?.body.is_some() {
            return Ok(Err(()));
        }
        let body = self.table.push(OutgoingBody::Response { stream_taken: false })?;
        self.table.get_mut(&r)?.body = Some(body.rep());
        Ok(Ok(body))
    }

    fn drop(&mut self, r: Resource<OutgoingResponse>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

impl types::HostOutgoingBody for Ctx {
    fn write(&mut self, b: Resource<OutgoingBody>) -> wasmtime::Result<Result<Resource<OutputStream>, ()>> {
        let rep = b.rep();
        let (OutgoingBody::Response { stream_taken, .. } | OutgoingBody::Request { stream_taken, .. }) =
            self.table.get_mut(&b)?;
        if *stream_taken {
            return Ok(Err(()));
        }
        *stream_taken = true;
        Ok(Ok(self.table.push(OutputStream::Body(rep))?))
    }

    fn finish(
        &mut self,
        b: Resource<OutgoingBody>,
        trailers: Option<Resource<Fields>>,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        let trailers = match trailers {
            Some(t) => Some(self.table.delete(t)?.entries),
            None => None,
        };
        let rep = b.rep();
        if let OutgoingBody::Request { buf, .. } = self.table.delete(b)? {
            // For its request's future to send.
            self.finished_bodies.insert(rep, buf);
            return Ok(Ok(()));
        }
        let exchange = self.exchange()?;
        match exchange.response {
            ResponseState::Streaming if exchange.current_body == Some(rep) => {
                match exchange.finish(trailers.as_deref()) {
                    Ok(()) => Ok(Ok(())),
                    Err(why) => Ok(Err(ErrorCode::InternalError(Some(why)))),
                }
            }
            ResponseState::NotSet => {
                // Sent with the response when it is set.
                exchange.early_finished.insert(rep, trailers);
                Ok(Ok(()))
            }
            _ => Ok(Err(ErrorCode::InternalError(Some("this body's response was not the one sent".to_string())))),
        }
    }

    fn drop(&mut self, b: Resource<OutgoingBody>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl types::HostResponseOutparam for Ctx {
    fn send_informational(
        &mut self,
        _param: Resource<ResponseOutparam>,
        _status: u16,
        _headers: Resource<Fields>,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        Ok(Err(ErrorCode::InternalError(Some("informational responses are not supported".to_string()))))
    }

    fn set(
        &mut self,
        param: Resource<ResponseOutparam>,
        response: Result<Resource<OutgoingResponse>, ErrorCode>,
    ) -> wasmtime::Result<()> {
        self.table.delete(param)?;
        let response = match response {
            Ok(r) => r,
            Err(code) => {
                // As wasmtime serve: the error becomes a 500 (the conclusion sends it).
                crate::console::write_bytes(alloc::format!("guest: handler answered with {code:?}\n").as_bytes());
                return Ok(());
            }
        };
        let resp = self.table.delete(response)?;
        let exchange = self.exchange()?;
        if exchange.response != ResponseState::NotSet {
            return Ok(());
        }
        let early = resp.body.and_then(|rep| exchange.early.remove(&rep)).unwrap_or_default();
        let sent = exchange.send_head(resp.status, &resp.headers, &early);
        exchange.current_body = resp.body;
        let sent = match resp.body.and_then(|rep| exchange.early_finished.remove(&rep)) {
            Some(trailers) => sent.and_then(|()| exchange.finish(trailers.as_deref())),
            None => sent,
        };
        sent.map_err(|e| wasmtime::format_err!("{e}"))
    }

    fn drop(&mut self, param: Resource<ResponseOutparam>) -> wasmtime::Result<()> {
        self.table.delete(param)?;
        Ok(())
    }
}

impl types::HostOutgoingRequest for Ctx {
    fn new(&mut self, headers: Resource<Fields>) -> wasmtime::Result<Resource<OutgoingRequest>> {
        let headers = self.table.delete(headers)?.entries;
        Ok(self.table.push(OutgoingRequest {
            method: Method::Get,
            scheme: None,
            authority: None,
            path_with_query: None,
            headers,
            body_taken: false,
            body: None,
        })?)
    }

    fn body(&mut self, r: Resource<OutgoingRequest>) -> wasmtime::Result<Result<Resource<OutgoingBody>, ()>> {
        if self.table.get(&r)?.body_taken {
            return Ok(Err(()));
        }
        let body = self.table.push(OutgoingBody::Request { stream_taken: false, buf: Vec::new() })?;
        let req = self.table.get_mut(&r)?;
        req.body_taken = true;
        req.body = Some(body.rep());
        Ok(Ok(body))
    }

    fn method(&mut self, r: Resource<OutgoingRequest>) -> wasmtime::Result<Method> {
        Ok(self.table.get(&r)?.method.clone())
    }

    fn set_method(&mut self, r: Resource<OutgoingRequest>, method: Method) -> wasmtime::Result<Result<(), ()>> {
        if let Method::Other(m) = &method
            && !is_token(m)
        {
            return Ok(Err(()));
        }
        self.table.get_mut(&r)?.method = method;
        Ok(Ok(()))
    }

    fn path_with_query(&mut self, r: Resource<OutgoingRequest>) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&r)?.path_with_query.clone())
    }

    fn set_path_with_query(
        &mut self,
        r: Resource<OutgoingRequest>,
        p: Option<String>,
    ) -> wasmtime::Result<Result<(), ()>> {
        if p.as_deref().is_some_and(|p| p.bytes().any(|b| b <= b' ' || b == 0x7f)) {
            return Ok(Err(()));
        }
        self.table.get_mut(&r)?.path_with_query = p;
        Ok(Ok(()))
    }

    fn scheme(&mut self, r: Resource<OutgoingRequest>) -> wasmtime::Result<Option<Scheme>> {
        Ok(self.table.get(&r)?.scheme.clone())
    }

    fn set_scheme(&mut self, r: Resource<OutgoingRequest>, s: Option<Scheme>) -> wasmtime::Result<Result<(), ()>> {
        if let Some(Scheme::Other(o)) = &s
            && (o.is_empty() || !o.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)))
        {
            return Ok(Err(()));
        }
        self.table.get_mut(&r)?.scheme = s;
        Ok(Ok(()))
    }

    fn authority(&mut self, r: Resource<OutgoingRequest>) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&r)?.authority.clone())
    }

    fn set_authority(&mut self, r: Resource<OutgoingRequest>, a: Option<String>) -> wasmtime::Result<Result<(), ()>> {
        if a.as_deref().is_some_and(|a| a.bytes().any(|b| b <= b' ' || b"/?#@\\".contains(&b))) {
            return Ok(Err(()));
        }
        self.table.get_mut(&r)?.authority = a;
        Ok(Ok(()))
    }

    fn headers(&mut self, r: Resource<OutgoingRequest>) -> wasmtime::Result<Resource<Fields>> {
        let entries = self.table.get(&r)?.headers.clone();
        self.push_fields(entries, false)
    }

    fn drop(&mut self, r: Resource<OutgoingRequest>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

impl types::HostRequestOptions for Ctx {
    fn new(&mut self) -> wasmtime::Result<Resource<RequestOptions>> {
        Ok(self.table.push(RequestOptions::default())?)
    }

    fn connect_timeout(&mut self, o: Resource<RequestOptions>) -> wasmtime::Result<Option<u64>> {
        Ok(self.table.get(&o)?.connect)
    }

    fn set_connect_timeout(&mut self, o: Resource<RequestOptions>, d: Option<u64>) -> wasmtime::Result<Result<(), ()>> {
        self.table.get_mut(&o)?.connect = d;
        Ok(Ok(()))
    }

    fn first_byte_timeout(&mut self, o: Resource<RequestOptions>) -> wasmtime::Result<Option<u64>> {
        Ok(self.table.get(&o)?.first_byte)
    }

    fn set_first_byte_timeout(
        &mut self,
        o: Resource<RequestOptions>,
        d: Option<u64>,
    ) -> wasmtime::Result<Result<(), ()>> {
        self.table.get_mut(&o)?.first_byte = d;
        Ok(Ok(()))
    }

    fn between_bytes_timeout(&mut self, o: Resource<RequestOptions>) -> wasmtime::Result<Option<u64>> {
        Ok(self.table.get(&o)?.between_bytes)
    }

    fn set_between_bytes_timeout(
        &mut self,
        o: Resource<RequestOptions>,
        d: Option<u64>,
    ) -> wasmtime::Result<Result<(), ()>> {
        self.table.get_mut(&o)?.between_bytes = d;
        Ok(Ok(()))
    }

    fn drop(&mut self, o: Resource<RequestOptions>) -> wasmtime::Result<()> {
        self.table.delete(o)?;
        Ok(())
    }
}

impl types::HostIncomingResponse for Ctx {
    fn status(&mut self, r: Resource<IncomingResponse>) -> wasmtime::Result<u16> {
        Ok(self.table.get(&r)?.status)
    }

    fn headers(&mut self, r: Resource<IncomingResponse>) -> wasmtime::Result<Resource<Fields>> {
        let entries = self.table.get(&r)?.headers.clone();
        self.push_fields(entries, false)
    }

    fn consume(&mut self, r: Resource<IncomingResponse>) -> wasmtime::Result<Result<Resource<IncomingBody>, ()>> {
        match self.table.get_mut(&r)?.body.take() {
            Some(body) => Ok(Ok(self.table.push(IncomingBody { stream_taken: false, buffered: Some(body) })?)),
            None => Ok(Err(())),
        }
    }

    fn drop(&mut self, r: Resource<IncomingResponse>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

fn error_code(failure: HttpFailure, detail: &str) -> ErrorCode {
    match failure {
        HttpFailure::Denied => ErrorCode::HttpRequestDenied,
        HttpFailure::Dns => ErrorCode::DnsError(DnsErrorPayload { rcode: Some(detail.to_string()), info_code: None }),
        HttpFailure::ConnectionRefused => ErrorCode::ConnectionRefused,
        HttpFailure::ConnectionTimeout => ErrorCode::ConnectionTimeout,
        HttpFailure::Tls => ErrorCode::TlsProtocolError,
        HttpFailure::Protocol => ErrorCode::HttpProtocolError,
        HttpFailure::ResponseTooLarge => ErrorCode::HttpResponseBodySize(None),
        HttpFailure::BadUri => ErrorCode::HttpRequestUriInvalid,
        HttpFailure::Internal => ErrorCode::InternalError(Some(detail.to_string())),
    }
}

fn method_text(m: &Method) -> &str {
    match m {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(o) => o,
    }
}

impl Ctx {
    /// Sends a future's request to the host's provider, if its body is finished; `false`
    /// while it is not.
    fn perform(&mut self, f: &Resource<FutureIncomingResponse>) -> wasmtime::Result<bool> {
        let fut = self.table.get_mut(f)?;
        if fut.result.is_some() || fut.taken {
            return Ok(true);
        }
        let Some((req, _)) = &fut.request else { return Ok(true) };
        let body = match req.body {
            None => Some(Vec::new()),
            Some(rep) => self.finished_bodies.remove(&rep),
        };
        let fut = self.table.get_mut(f)?;
        let Some(body) = body else {
            let body_alive = fut
                .request
                .as_ref()
                .and_then(|(r, _)| r.body)
                .is_some_and(|rep| self.table.get(&Resource::<OutgoingBody>::new_borrow(rep)).is_ok());
            if body_alive {
                return Ok(false);
            }
            let fut = self.table.get_mut(f)?;
            fut.request = None;
            fut.result = Some(Err(ErrorCode::InternalError(Some(
                "the request body was dropped without outgoing-body.finish".to_string(),
            ))));
            return Ok(true);
        };
        let (req, options) = fut.request.take().expect("checked above");
        let scheme = match &req.scheme {
            None | Some(Scheme::Http) => "http".to_string(),
            Some(Scheme::Https) => "https".to_string(),
            Some(Scheme::Other(o)) => o.clone(),
        };
        let result = match &req.authority {
            None => Err(ErrorCode::HttpRequestUriInvalid),
            Some(authority) => {
                let headers: Vec<(&str, &[u8])> = req.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
                let request = CapRequest::HttpFetch {
                    method: method_text(&req.method),
                    scheme: &scheme,
                    authority,
                    path_with_query: req.path_with_query.as_deref().unwrap_or("/"),
                    headers,
                    body: &body,
                    connect_timeout_ns: options.as_ref().and_then(|o| o.connect),
                    first_byte_timeout_ns: options.as_ref().and_then(|o| o.first_byte),
                };
                let answer = self.caps.call(&request, |r| match r {
                    Ok(Reply::HttpResponse { status, headers, body }) => {
                        Ok(IncomingResponse { status, headers: owned_fields(&headers), body: Some(body.to_vec()) })
                    }
                    Ok(_) => Err(ErrorCode::InternalError(Some("the host answered something else".to_string()))),
                    Err(CapError::NotGranted { .. }) => Err(ErrorCode::HttpRequestDenied),
                    Err(CapError::Http { failure, detail }) => Err(error_code(failure, detail)),
                    Err(CapError::BadRequest(m) | CapError::Provider(m)) => {
                        Err(ErrorCode::InternalError(Some(m.to_string())))
                    }
                    Err(other) => Err(ErrorCode::InternalError(Some(alloc::format!("{other:?}")))),
                });
                answer.unwrap_or_else(|why| Err(ErrorCode::InternalError(Some(why))))
            }
        };
        self.table.get_mut(f)?.result = Some(result);
        Ok(true)
    }
}

impl types::HostFutureIncomingResponse for Ctx {
    fn subscribe(&mut self, f: Resource<FutureIncomingResponse>) -> wasmtime::Result<Resource<Pollable>> {
        // Waiting on it makes the request (blocking): afterwards it is ready.
        self.perform(&f)?;
        Ok(self.table.push(Pollable::Ready)?)
    }

    #[allow(clippy::type_complexity)]
    fn get(
        &mut self,
        f: Resource<FutureIncomingResponse>,
    ) -> wasmtime::Result<Option<Result<Result<Resource<IncomingResponse>, ErrorCode>, ()>>> {
        if !self.perform(&f)? {
            return Ok(None);
        }
        let fut = self.table.get_mut(&f)?;
        if fut.taken {
            return Ok(Some(Err(())));
        }
        fut.taken = true;
        match fut.result.take() {
            Some(Ok(response)) => Ok(Some(Ok(Ok(self.table.push(response)?)))),
            Some(Err(code)) => Ok(Some(Ok(Err(code)))),
            None => Ok(Some(Err(()))),
        }
    }

    fn drop(&mut self, f: Resource<FutureIncomingResponse>) -> wasmtime::Result<()> {
        self.table.delete(f)?;
        Ok(())
    }
}

impl wasi::http::outgoing_handler::Host for Ctx {
    fn handle(
        &mut self,
        request: Resource<OutgoingRequest>,
        options: Option<Resource<RequestOptions>>,
    ) -> wasmtime::Result<Result<Resource<FutureIncomingResponse>, ErrorCode>> {
        let request = self.table.delete(request)?;
        let options = match options {
            Some(o) => Some(self.table.delete(o)?),
            None => None,
        };
        if request.authority.is_none() {
            return Ok(Err(ErrorCode::HttpRequestUriInvalid));
        }
        Ok(Ok(self.table.push(FutureIncomingResponse {
            request: Some((request, options)),
            result: None,
            taken: false,
        })?))
    }
}

// ---- serving ----

/// Why serving stopped.
pub(super) enum Stop {
    /// The request connection broke or carried garbage.
    Link(String),
}

/// Serves requests on `vsock` with instances of `pre`, forever (until the link breaks).
pub(super) fn serve(
    vsock: SharedVsock,
    pre: &HttpPre<Ctx>,
    mut new_ctx: impl FnMut() -> Ctx,
    phases: &mut super::Phases,
) -> Stop {
    let conn = match vsock.borrow_mut().connect(HTTP_PORT) {
        Ok(c) => c,
        Err(e) => return Stop::Link(alloc::format!("cannot reach the front door: {e}")),
    };
    phases.lap("connect");
    phases.report();
    let link =
        Rc::new(RefCell::new(Link { vsock: vsock.clone(), conn, buf: Vec::new(), out: Vec::new(), broken: None }));
    // One broker connection for every request's instance (made on the first capability call).
    let mut caps = Some(BrokerConn::over(vsock));
    loop {
        let mut order = Order::new(Direction::Request);
        let head = match link.borrow_mut().next(&mut order) {
            Ok(Owned::Head(h)) => h,
            Ok(_) => return Stop::Link("request stream: a frame before the request head".to_string()),
            Err(why) => return Stop::Link(why),
        };
        let mut ctx = new_ctx();
        ctx.caps = caps.take().expect("given back after every request");
        ctx.http = Some(Exchange::new(link.clone(), order));
        let mut store = Store::new(pre.engine(), ctx);
        let seed = (store.data_mut().rng.u64(), store.data_mut().rng.u64());
        store.data_mut().insecure_seed = seed;
        store.limiter(|ctx| &mut ctx.limits);
        let outcome = handle(&mut store, pre, head);
        let mut ctx = store.into_data();
        ctx.flush_outputs();
        ctx.close_files();
        caps = Some(core::mem::replace(&mut ctx.caps, BrokerConn::new(false, 0)));
        let mut exchange = ctx.http.take().expect("set above");
        let failure = outcome.err();
        if let Some(why) = &failure {
            crate::console::write_bytes(alloc::format!("guest: HTTP handler failed: {why}\n").as_bytes());
        }
        if let Err(why) = exchange.conclude(failure.as_deref()).and_then(|()| exchange.drain()) {
            return Stop::Link(why);
        }
    }
}

/// Instantiates and calls the handler; `Err` says why it failed (a trap, a panic).
fn handle(store: &mut Store<Ctx>, pre: &HttpPre<Ctx>, head: Request) -> Result<(), String> {
    let scheme = match head.scheme.as_str() {
        "http" => Some(Scheme::Http),
        "https" => Some(Scheme::Https),
        other => Some(Scheme::Other(other.to_owned())),
    };
    let table: &mut ResourceTable = &mut store.data_mut().table;
    let request = table
        .push(IncomingRequest {
            method: method_of(&head.method),
            scheme,
            authority: head.authority,
            path_with_query: head.path_with_query,
            headers: head.headers,
            consumed: false,
        })
        .map_err(|e| e.to_string())?;
    let out = table.push(ResponseOutparam).map_err(|e| e.to_string())?;
    let result = pre
        .instantiate(&mut *store)
        .and_then(|proxy| proxy.wasi_http_incoming_handler().call_handle(&mut *store, request, out));
    result.map_err(|e| {
        if let Some(super::wasi::Exit(code)) = e.downcast_ref::<super::wasi::Exit>() {
            return alloc::format!("the handler exited with code {code}");
        }
        match e.downcast_ref::<Trap>() {
            Some(trap) => alloc::format!("the handler trapped: {trap}"),
            None => alloc::format!("{e:#}"),
        }
    })
}

/// Connects the device for an HTTP VM (at boot, before the component is loaded).
pub fn bring_up(present: bool, tsc_khz: u64) -> Result<SharedVsock, VsockError> {
    Ok(Rc::new(RefCell::new(Vsock::init(present, tsc_khz)?)))
}
