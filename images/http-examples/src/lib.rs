//! `wasi:http` handlers the front door's tests and examples use, one per path:
//!
//! - `/echo`: streams the request body back as it arrives (`content-type` copied);
//! - `/headers`: the request as the component sees it (method, scheme, authority, path, one
//!   `name: value` line per header, sorted), with a repeated response header `x-multi`;
//! - `/status/N`: answers status `N`;
//! - `/sleep?ms=N`: waits `N` ms on a monotonic-clock pollable, then answers;
//! - `/panic`: panics (the front door answers 500 and serves the next request);
//! - `/fetch?url=U`: fetches `U` with `wasi:http/outgoing-handler` and answers its status and
//!   body, or 502 with the error code;
//! - `/env`: the environment, one `KEY=VALUE` line each (`wasi:cli/environment`);
//! - `/random`: 16 random bytes in hex (no two instances share a seed);
//! - `/count`: how many requests this instance has served (always 1: a fresh instance each).

use std::sync::atomic::{AtomicU32, Ordering};

use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam, Scheme,
};

static SERVED: AtomicU32 = AtomicU32::new(0);

struct Examples;

/// Sets a response with `status`, `headers` and `body` and finishes it.
fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &[u8])], body: &[u8]) {
    let fields: Vec<(String, Vec<u8>)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect();
    let response = OutgoingResponse::new(Fields::from_list(&fields).unwrap());
    response.set_status_code(status).unwrap();
    let outgoing = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    let stream = outgoing.write().unwrap();
    for chunk in body.chunks(4096) {
        stream.blocking_write_and_flush(chunk).unwrap();
    }
    drop(stream);
    OutgoingBody::finish(outgoing, None).unwrap();
}

fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    let (_, q) = path.split_once('?')?;
    q.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn method_name(m: &Method) -> String {
    match m {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(o) => o.clone(),
    }
}

fn echo(request: IncomingRequest, out: ResponseOutparam) {
    let content_type = request.headers().get("content-type");
    let headers: Vec<(String, Vec<u8>)> = content_type.into_iter().map(|v| ("content-type".to_string(), v)).collect();
    let response = OutgoingResponse::new(Fields::from_list(&headers).unwrap());
    let outgoing = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    let incoming = request.consume().unwrap();
    let input = incoming.stream().unwrap();
    let output = outgoing.write().unwrap();
    loop {
        match input.blocking_read(64 * 1024) {
            Ok(bytes) if bytes.is_empty() => continue,
            Ok(bytes) => {
                // Within the stream's write permit, then flushed: streamed as it arrives.
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let permit = output.check_write().unwrap() as usize;
                    let n = permit.min(rest.len()).max(1).min(rest.len());
                    output.write(&rest[..n]).unwrap();
                    rest = &rest[n..];
                }
                output.flush().unwrap();
            }
            Err(_) => break,
        }
    }
    drop(input);
    drop(output);
    OutgoingBody::finish(outgoing, None).unwrap();
}

fn fetch(url: &str, out: ResponseOutparam) {
    let (scheme, rest) = match url.split_once("://") {
        Some(("https", rest)) => (Scheme::Https, rest),
        Some((_, rest)) => (Scheme::Http, rest),
        None => (Scheme::Http, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&scheme)).unwrap();
    request.set_authority(Some(authority)).unwrap();
    request.set_path_with_query(Some(path)).unwrap();
    let body = request.body().unwrap();
    OutgoingBody::finish(body, None).unwrap();
    let future = match outgoing_handler::handle(request, None) {
        Ok(f) => f,
        Err(e) => return respond(out, 502, &[], format!("fetch failed: {e:?}\n").as_bytes()),
    };
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return respond(out, 502, &[], format!("fetch failed: {e:?}\n").as_bytes()),
        _ => return respond(out, 502, &[], b"fetch failed: no response\n"),
    };
    let status = response.status();
    let incoming = response.consume().unwrap();
    let input = incoming.stream().unwrap();
    let mut bytes = Vec::new();
    while let Ok(chunk) = input.blocking_read(64 * 1024) {
        bytes.extend(chunk);
    }
    respond(out, status, &[("x-upstream-status", status.to_string().as_bytes())], &bytes);
}

impl wasi::exports::http::incoming_handler::Guest for Examples {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        let path = request.path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or("/").to_string();
        match route.as_str() {
            "/echo" => echo(request, out),
            "/headers" => {
                let scheme = match request.scheme() {
                    Some(Scheme::Http) => "http".to_string(),
                    Some(Scheme::Https) => "https".to_string(),
                    Some(Scheme::Other(o)) => o,
                    None => "-".to_string(),
                };
                let mut text = format!(
                    "method: {}\nscheme: {scheme}\nauthority: {}\npath: {path}\n",
                    method_name(&request.method()),
                    request.authority().unwrap_or_default()
                );
                let mut entries = request.headers().entries();
                entries.sort();
                for (name, value) in entries {
                    text.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(&value)));
                }
                respond(
                    out,
                    200,
                    &[("content-type", b"text/plain"), ("x-multi", b"a"), ("x-multi", b"b")],
                    text.as_bytes(),
                );
            }
            "/sleep" => {
                let ms: u64 = query(&path, "ms").and_then(|v| v.parse().ok()).unwrap_or(100);
                wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
                respond(out, 200, &[], format!("slept {ms} ms\n").as_bytes());
            }
            "/panic" => panic!("the handler panicked on purpose"),
            "/fetch" => match query(&path, "url") {
                Some(url) => fetch(url, out),
                None => respond(out, 400, &[], b"fetch needs ?url=\n"),
            },
            "/env" => {
                let mut text = String::new();
                for (k, v) in wasi::cli::environment::get_environment() {
                    text.push_str(&format!("{k}={v}\n"));
                }
                respond(out, 200, &[], text.as_bytes());
            }
            "/random" => {
                let hex: String =
                    wasi::random::random::get_random_bytes(16).iter().map(|b| format!("{b:02x}")).collect();
                respond(out, 200, &[], format!("{hex}\n").as_bytes());
            }
            "/count" => respond(out, 200, &[], format!("{served}\n").as_bytes()),
            other => match other.strip_prefix("/status/").and_then(|s| s.parse::<u16>().ok()) {
                Some(status) => respond(out, status, &[], format!("status {status}\n").as_bytes()),
                None => respond(out, 200, &[], b"wasmvisor http examples\n"),
            },
        }
    }
}

wasi::http::proxy::export!(Examples);
