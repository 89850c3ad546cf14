//! The front door: the daemon's HTTP/1.1 server (hyper) that delivers requests to HTTP
//! tenants' components inside their VMs.
//!
//! A request is routed by its Host (`NAME.localhost`, a host its tenant's spec lists, or the
//! catch-all `*`), gets a VM from the tenant's pool (`http_pool`), and crosses the VM's
//! request connection as frames (`wasmvisor_abi::http`): the head, then the body as the client
//! sends it (from a task of its own, so that a handler streaming its answer while it reads
//! never deadlocks), then trailers and the end. The response comes back the same way and is
//! streamed to the client as it arrives. Everything the guest sends is checked: a frame out of
//! order, an oversized one, a bad status or header fails that request with 502, is written to
//! the tenant's log, and the VM is stopped, never reused; so is a VM whose request ran past
//! its limit (504) or whose client went away in the middle.
//!
//! Limits: the header size (`max_header_bytes`, 431 past it, by hyper), the header read time
//! of a connection (slow clients are dropped), the body size (413 on a declared length, an
//! abort of the body on a streamed one), the request time (the tenant's `timeout_s`: 504),
//! the number of connections, and the tenant's queue (503 with `Retry-After`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use wasmvisor_abi::http::{self as transport, Direction, Order};

use crate::http_pool::{AcquireError, HttpPool, Incoming as VmIncoming, ReadSide, Vm};
use crate::supervisor::Supervisor;

/// The front door's limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes.
    pub max_header_bytes: usize,
    /// Largest request body, bytes.
    pub max_body_bytes: u64,
    /// Longest a connection may take to send a request head.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 16 << 20,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

/// Header fields that belong to one hop, never forwarded either way (and `host`, which
/// crosses as the authority).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
    "http2-settings",
    "te",
    "trailer",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Serves the front door on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, sup: Arc<Supervisor>, limits: Limits) {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "front door: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the limit: closed at once, before anything is read.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sup = sup.clone();
        let limits = limits.clone();
        let limits_for_conn = limits.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let sup = sup.clone();
                let limits = limits.clone();
                async move {
                    let response = handle(sup.clone(), &limits, req, peer).await;
                    sup.metrics().http_response(response.status().as_u16());
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits_for_conn.header_read_timeout)
                .max_buf_size(limits_for_conn.max_header_bytes.max(8192))
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "front door: connection ended");
            }
            drop(slot);
        });
    }
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut text = text.into();
    text.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The host a request names: its Host header (HTTP/1.1), else its URI's authority.
fn host_of(req: &Request<Incoming>) -> Option<String> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))?;
    Some(host.to_ascii_lowercase())
}

async fn handle(sup: Arc<Supervisor>, limits: &Limits, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let arrived = Instant::now();
    let Some(host) = host_of(&req) else {
        return plain(StatusCode::BAD_REQUEST, "the request names no host");
    };
    let Some(pool) = sup.route(&host) else {
        return plain(StatusCode::NOT_FOUND, format!("no tenant serves {host}"));
    };
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {} bytes", limits.max_body_bytes),
        );
    }
    let head = match encode_head(&req) {
        Ok(head) => head,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("the request cannot be delivered: {e}")),
    };
    let bodiless = req.body().is_end_stream();
    let deadline = tokio::time::Instant::now() + pool.spec().request_timeout;
    let vm = match pool.acquire(deadline, bodiless).await {
        Ok(vm) => vm,
        Err(AcquireError::QueueFull) => {
            let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "every VM of this tenant is busy and its queue is full");
            r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Err(AcquireError::Timeout) => {
            let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "no VM of this tenant became free in time");
            r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Err(AcquireError::Closed) => return plain(StatusCode::SERVICE_UNAVAILABLE, "the tenant is being replaced"),
        Err(AcquireError::Failed(why)) => {
            return plain(StatusCode::BAD_GATEWAY, format!("the tenant's VM cannot start: {why}"));
        }
    };
    sup.metrics().http_phase("front_door", arrived.elapsed());
    exchange(sup, pool, vm, head, req.into_body(), deadline, limits.max_body_bytes, peer).await
}

/// The request head as it crosses to the guest (hop-by-hop fields left out).
fn encode_head(req: &Request<Incoming>) -> Result<Vec<u8>, transport::HttpFrameError> {
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let headers: Vec<(&str, &[u8])> =
        req.headers().iter().filter(|(n, _)| !is_hop_by_hop(n)).map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
    let head = transport::RequestHead {
        version: transport::HTTP_TRANSPORT_VERSION,
        method: req.method().as_str(),
        scheme: "http",
        authority: &authority,
        path_with_query: path,
        headers,
    };
    let mut bytes = Vec::new();
    transport::encode_request_head(&head, &mut bytes)?;
    Ok(bytes)
}

/// A VM lent to one exchange: given back at its clean end, stopped otherwise (dropped in the
/// middle, failed).
struct Lease {
    pool: Arc<HttpPool>,
    vm: Option<Vm>,
}

impl Lease {
    /// The response ended cleanly: the VM goes back with its connection's halves (`wr`, unless
    /// the pool holds it for pipelining).
    fn give_back(mut self, wr: Option<OwnedWriteHalf>, side: ReadSide) {
        if let Some(mut vm) = self.vm.take() {
            vm.wr = wr;
            self.pool.release(vm, side);
        }
    }

    fn fail(mut self, why: &str) {
        if let Some(vm) = self.vm.take() {
            self.pool.discard(vm, why);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            self.pool.discard(vm, "the exchange did not complete (the client went away)");
        }
    }
}

/// A response frame, owned.
enum Inbound {
    Head { status: u16, headers: Vec<(String, Vec<u8>)> },
    Body(Bytes),
    Trailers(Vec<(String, Vec<u8>)>),
    End,
    Abort(String),
}

/// Reads the guest's response frames, checked and in order.
struct Reader {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
    order: Order,
}

impl Reader {
    /// The next frame already in the buffer, checked; `None` when it needs more bytes.
    fn buffered(&mut self) -> Result<Option<Inbound>, String> {
        let Some((frame, used)) = transport::split(&self.buf).map_err(|e| format!("the guest's response: {e}"))? else {
            return Ok(None);
        };
        self.order.accept(&frame).map_err(|e| format!("the guest's response: {e}"))?;
        let owned = match frame {
            transport::Frame::ResponseHead(h) => Inbound::Head {
                status: h.status,
                headers: h.headers.iter().map(|(n, v)| ((*n).to_owned(), v.to_vec())).collect(),
            },
            transport::Frame::Body(b) => Inbound::Body(Bytes::copy_from_slice(b)),
            transport::Frame::Trailers(t) => {
                Inbound::Trailers(t.iter().map(|(n, v)| ((*n).to_owned(), v.to_vec())).collect())
            }
            transport::Frame::End => Inbound::End,
            transport::Frame::Abort(why) => Inbound::Abort(why.to_owned()),
            transport::Frame::RequestHead(_) => return Err("the guest's response: a request head".to_string()),
        };
        self.buf.drain(..used);
        Ok(Some(owned))
    }

    async fn next(&mut self) -> Result<Inbound, String> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            self.buf.reserve(64 * 1024);
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) => return Err("the VM closed its request connection".to_string()),
                Ok(_) => {}
                Err(e) => return Err(format!("the VM's request connection: {e}")),
            }
        }
    }

    /// The frames that arrived with the head, up to the end (or an abort): a small response
    /// usually comes whole in one read and is answered with a body of known length.
    fn rest_buffered(&mut self) -> Result<VecDeque<Inbound>, String> {
        let mut frames = VecDeque::new();
        while let Some(frame) = self.buffered()? {
            let last = matches!(frame, Inbound::End | Inbound::Abort(_));
            frames.push_back(frame);
            if last {
                break;
            }
        }
        Ok(frames)
    }
}

/// The request direction of an exchange: written at once when the request has no body (its
/// head and end in one write; the write half then goes to the pool, for a pipelined request),
/// else streamed by a task of its own.
enum Writer {
    Offered,
    Task(tokio::task::JoinHandle<Result<OwnedWriteHalf, String>>),
}

impl Writer {
    fn abort(&self) {
        if let Writer::Task(task) = self {
            task.abort();
        }
    }

    /// The write half (unless the pool has it), once every frame of the request is sent.
    async fn finish(self) -> Result<Option<OwnedWriteHalf>, String> {
        match self {
            Writer::Offered => Ok(None),
            Writer::Task(task) => task.await.map_err(|e| format!("the request's writer failed: {e}"))?.map(Some),
        }
    }
}

/// Header fields from the guest as hyper takes them; hop-by-hop ones are dropped.
fn header_map(fields: Vec<(String, Vec<u8>)>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("bad header name {name:?}"))?;
        let value = HeaderValue::from_bytes(&value).map_err(|_| format!("bad value for header {name}"))?;
        if !is_hop_by_hop(&name) {
            map.append(name, value);
        }
    }
    Ok(map)
}

/// Sends the request's frames: the head, the body as it arrives, trailers, the end (or an
/// abort); gives the write half back for the next exchange.
async fn send_request(
    mut wr: OwnedWriteHalf,
    head: Vec<u8>,
    mut body: Incoming,
    max_body: u64,
) -> Result<OwnedWriteHalf, String> {
    let io = |e: std::io::Error| format!("the VM's request connection: {e}");
    wr.write_all(&head).await.map_err(io)?;
    let mut sent = 0u64;
    let mut out = Vec::new();
    loop {
        out.clear();
        match body.frame().await {
            None => {
                transport::encode_end(&mut out);
                wr.write_all(&out).await.map_err(io)?;
                return Ok(wr);
            }
            Some(Err(e)) => {
                transport::encode_abort(&format!("the client's body failed: {e}"), &mut out);
                wr.write_all(&out).await.map_err(io)?;
                return Ok(wr);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    sent += data.len() as u64;
                    if sent > max_body {
                        transport::encode_abort(&format!("the request body is larger than {max_body} bytes"), &mut out);
                        wr.write_all(&out).await.map_err(io)?;
                        return Ok(wr);
                    }
                    for chunk in data.chunks(transport::MAX_CHUNK_LEN as usize) {
                        transport::encode_body(chunk, &mut out);
                    }
                    wr.write_all(&out).await.map_err(io)?;
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let fields: Vec<(&str, &[u8])> = trailers
                            .iter()
                            .filter(|(n, _)| !is_hop_by_hop(n))
                            .map(|(n, v)| (n.as_str(), v.as_bytes()))
                            .collect();
                        if transport::encode_trailers(&fields, &mut out).is_err() {
                            out.clear();
                        }
                        // The end follows at `None`.
                        wr.write_all(&out).await.map_err(io)?;
                    }
                }
            },
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    sup: Arc<Supervisor>,
    pool: Arc<HttpPool>,
    mut vm: Vm,
    mut head: Vec<u8>,
    body: Incoming,
    deadline: tokio::time::Instant,
    max_body: u64,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let (Some(mut wr), Some(incoming)) = (vm.wr.take(), vm.rd.take()) else {
        pool.discard(vm, "a VM without its connection");
        return plain(StatusCode::BAD_GATEWAY, "the tenant's VM lost its connection");
    };
    let (side, writer) = if body.is_end_stream() {
        transport::encode_end(&mut head);
        match tokio::time::timeout_at(deadline, wr.write_all(&head)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                pool.discard(vm, &format!("the VM's request connection: {e}"));
                return plain(StatusCode::BAD_GATEWAY, "the tenant's VM lost its connection");
            }
            Err(_) => {
                pool.discard(vm, "the request ran past its time limit");
                return plain(StatusCode::GATEWAY_TIMEOUT, "the component did not answer in time");
            }
        }
        let side = match incoming {
            VmIncoming::Ready(side) => side,
            // Pipelined: the response ahead must end first. If this request gives up, the
            // exchange ahead stops the VM at its end (nobody will read this response).
            VmIncoming::After(rx) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(side)) => side,
                Ok(Err(_)) => {
                    return plain(StatusCode::BAD_GATEWAY, "the tenant's VM failed while serving the request ahead");
                }
                Err(_) => return plain(StatusCode::GATEWAY_TIMEOUT, "the component did not answer in time"),
            },
        };
        pool.open(&vm, wr, started);
        (side, Writer::Offered)
    } else {
        let VmIncoming::Ready(side) = incoming else {
            pool.discard(vm, "a request with a body was pipelined");
            return plain(StatusCode::BAD_GATEWAY, "the tenant's VM lost its connection");
        };
        (side, Writer::Task(tokio::spawn(send_request(wr, head, body, max_body))))
    };
    let lease = Lease { pool: pool.clone(), vm: Some(vm) };
    let mut reader = Reader { rd: side.rd, buf: side.buf, order: Order::new(Direction::Response) };

    let first = tokio::time::timeout_at(deadline, reader.next()).await;
    let (status, fields) = match first {
        Ok(Ok(Inbound::Head { status, headers })) => (status, headers),
        Ok(Ok(Inbound::Abort(why))) => {
            writer.abort();
            pool.tenant().log_line("wasmvisor", &format!("request from {peer} failed in the guest: {why}"));
            lease.fail(&format!("the guest aborted the response: {why}"));
            return plain(StatusCode::BAD_GATEWAY, "the component failed before it answered");
        }
        Ok(Ok(_)) => unreachable!("the order check allows only a head or an abort first"),
        Ok(Err(why)) => {
            return malformed(&writer, lease, peer, &why);
        }
        Err(_) => {
            writer.abort();
            lease.fail("the request ran past its time limit");
            return plain(StatusCode::GATEWAY_TIMEOUT, "the component did not answer in time");
        }
    };
    sup.metrics().http_phase("guest_head", started.elapsed());
    let status = match StatusCode::from_u16(status) {
        Ok(s) if !s.is_informational() => s,
        _ => {
            writer.abort();
            lease.fail(&format!("status {status} as a final response"));
            return plain(StatusCode::BAD_GATEWAY, "the component's response was malformed");
        }
    };
    let headers = match header_map(fields) {
        Ok(h) => h,
        Err(why) => {
            return malformed(&writer, lease, peer, &why);
        }
    };

    let pending = match reader.rest_buffered() {
        Ok(frames) => frames,
        Err(why) => {
            return malformed(&writer, lease, peer, &why);
        }
    };
    let whole = matches!(pending.back(), Some(Inbound::End))
        && pending.iter().all(|f| matches!(f, Inbound::Body(_) | Inbound::End));
    if whole && matches!(writer, Writer::Offered) {
        // The whole response is here and the request had no body: answered with a body of
        // known length (one write to the client), and the VM given back before the client
        // reads it.
        let mut body = Vec::new();
        for frame in &pending {
            if let Inbound::Body(b) = frame {
                body.extend_from_slice(b);
            }
        }
        if let Err(why) = finish_exchange(writer, reader, lease, deadline).await {
            return plain(StatusCode::BAD_GATEWAY, format!("the component's response was malformed: {why}"));
        }
        sup.metrics().http_phase("exchange", started.elapsed());
        let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        return response;
    }

    // The body streams from here: each step reads one frame; the end gives the VM back.
    let state =
        Streaming { pending, reader: Some(reader), writer: Some(writer), lease: Some(lease), deadline, sup, started };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let item = st.step().await?;
        Some((item, st))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A response the guest got wrong: logged in the tenant's log, the VM stopped, 502.
fn malformed(writer: &Writer, lease: Lease, peer: SocketAddr, why: &str) -> Response<Body> {
    writer.abort();
    lease.pool.tenant().log_line("wasmvisor", &format!("bad response to a request from {peer}: {why}"));
    lease.fail(why);
    plain(StatusCode::BAD_GATEWAY, "the component's response was malformed")
}

/// After the response's end: waits until the request's frames are all sent, then gives the
/// VM back (the pool checks what was read past the end); a failure stops the VM (`Err`).
async fn finish_exchange(
    writer: Writer,
    reader: Reader,
    lease: Lease,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let why = match tokio::time::timeout_at(deadline, writer.finish()).await {
        Ok(Ok(wr)) => {
            lease.give_back(wr, ReadSide { rd: reader.rd, buf: reader.buf });
            return Ok(());
        }
        Ok(Err(why)) => why,
        Err(_) => "the request body was not delivered in time".to_string(),
    };
    lease.fail(&why);
    Err(why)
}

/// A response body on its way from the VM to the client.
struct Streaming {
    /// Frames that came with the head, handed out before anything more is read.
    pending: VecDeque<Inbound>,
    reader: Option<Reader>,
    writer: Option<Writer>,
    /// Taken when the exchange is over (the VM given back or stopped): the stream ends.
    lease: Option<Lease>,
    deadline: tokio::time::Instant,
    sup: Arc<Supervisor>,
    started: Instant,
}

impl Streaming {
    /// The next body frame; `None` at the end.
    async fn step(&mut self) -> Option<Result<Frame<Bytes>, std::io::Error>> {
        let lease = self.lease.take()?;
        let reader = self.reader.as_mut()?;
        let failed = |lease: Lease, why: String| {
            lease.pool.tenant().log_line("wasmvisor", &format!("response failed: {why}"));
            lease.fail(&why);
            Some(Err(std::io::Error::other(why)))
        };
        let frame = match self.pending.pop_front() {
            Some(frame) => frame,
            None => match tokio::time::timeout_at(self.deadline, reader.next()).await {
                Err(_) => return failed(lease, "the response ran past its time limit".to_string()),
                Ok(Err(why)) => return failed(lease, why),
                Ok(Ok(frame)) => frame,
            },
        };
        match frame {
            Inbound::Body(b) => {
                self.lease = Some(lease);
                Some(Ok(Frame::data(b)))
            }
            Inbound::Trailers(t) => match header_map(t) {
                Ok(map) => {
                    self.lease = Some(lease);
                    Some(Ok(Frame::trailers(map)))
                }
                Err(why) => failed(lease, why),
            },
            Inbound::Abort(why) => failed(lease, format!("the guest aborted the response: {why}")),
            Inbound::Head { .. } => failed(lease, "a second response head".to_string()),
            Inbound::End => {
                // The request's frames must all be sent before the connection serves another.
                let writer = self.writer.take()?;
                let reader = self.reader.take()?;
                if finish_exchange(writer, reader, lease, self.deadline).await.is_ok() {
                    self.sup.metrics().http_phase("exchange", self.started.elapsed());
                }
                None
            }
        }
    }
}
