//! The daemon's client for tenants' outgoing HTTP (`http-outgoing`): hyper over TCP, TLS with
//! rustls and the system's root certificates. The broker has already checked the grant and
//! the allow-list; this makes the request on the daemon's runtime (from a relay thread, which
//! blocks on it) and brings the whole response back, bounded.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wasmvisor_abi::capability::HttpFailure;
use wasmvisor_providers::{FetchRequest, FetchResponse, OutgoingHttp};

/// Limit on connecting, unless the request's options say otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit on the wait for a response head, unless the request's options say otherwise.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit on reading a response body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Header fields that belong to one hop (and `host`, which the URI's authority sets).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te", "trailer"];

/// The daemon's outgoing client, shared by every tenant's broker.
pub struct Client {
    runtime: tokio::runtime::Handle,
    client: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Client {
    /// A client on `runtime` trusting the system's roots.
    pub fn new(runtime: tokio::runtime::Handle) -> Result<Arc<Self>, String> {
        let _in_runtime = runtime.enter();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("cannot load the system's root certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = HyperClient::builder(TokioExecutor::new()).build(https);
        Ok(Arc::new(Self { runtime, client }))
    }
}

/// Names a failure as `wasi:http` would, from the error and its causes.
fn classify(e: &(dyn StdError + 'static)) -> HttpFailure {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return HttpFailure::ConnectionRefused,
                std::io::ErrorKind::TimedOut => return HttpFailure::ConnectionTimeout,
                _ => {}
            }
        }
        if c.downcast_ref::<rustls::Error>().is_some() {
            return HttpFailure::Tls;
        }
        let text = c.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            return HttpFailure::Dns;
        }
        if text.contains("certificate") || text.contains("tls") {
            return HttpFailure::Tls;
        }
        cause = c.source();
    }
    HttpFailure::Protocol
}

fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl OutgoingHttp for Client {
    fn fetch(&self, r: &FetchRequest<'_>) -> Result<FetchResponse, (HttpFailure, String)> {
        let uri: http::Uri = format!("{}://{}{}", r.scheme, r.authority, r.path_with_query)
            .parse()
            .map_err(|e| (HttpFailure::BadUri, format!("{e}")))?;
        let method =
            http::Method::from_bytes(r.method.as_bytes()).map_err(|e| (HttpFailure::Protocol, e.to_string()))?;
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in r.headers {
            if !HOP_BY_HOP.contains(name) {
                builder = builder.header(*name, *value);
            }
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(r.body)))
            .map_err(|e| (HttpFailure::Protocol, format!("cannot build the request: {e}")))?;
        let head_limit =
            r.connect_timeout.unwrap_or(CONNECT_TIMEOUT) + r.first_byte_timeout.unwrap_or(FIRST_BYTE_TIMEOUT);
        let max = r.max_response_body;
        let work = async {
            let response = match tokio::time::timeout(head_limit, self.client.request(request)).await {
                Err(_) => return Err((HttpFailure::ConnectionTimeout, "no response in time".to_string())),
                Ok(Err(e)) => return Err((classify(&e), chain(&e))),
                Ok(Ok(r)) => r,
            };
            let (parts, mut body) = response.into_parts();
            let mut bytes = Vec::new();
            let read = async {
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| (HttpFailure::Protocol, chain(&e)))?;
                    if let Ok(data) = frame.into_data() {
                        if bytes.len() + data.len() > max {
                            return Err((
                                HttpFailure::ResponseTooLarge,
                                format!("the response body is over {max} bytes"),
                            ));
                        }
                        bytes.extend_from_slice(&data);
                    }
                }
                Ok(())
            };
            match tokio::time::timeout(BODY_TIMEOUT, read).await {
                Err(_) => {
                    return Err((HttpFailure::ConnectionTimeout, "the response body did not end in time".to_string()));
                }
                Ok(r) => r?,
            }
            let headers = parts
                .headers
                .iter()
                .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()))
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect();
            Ok(FetchResponse { status: parts.status.as_u16(), headers, body: bytes })
        };
        self.runtime.block_on(work)
    }
}
