//! The CLI's client of the daemon's API: HTTP/1.1 (hyper) over the daemon's Unix socket, one
//! connection per request, on a current-thread tokio runtime.

use std::io::Write;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// Why a call to the daemon failed.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens on the socket.
    NoDaemon(PathBuf),
    /// The connection or the exchange failed.
    Transport(String),
    /// The daemon answered with an error.
    Api {
        /// Its `error` message.
        message: String,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoDaemon(path) => {
                write!(f, "no wasmvisor daemon is listening on {}; start one with `wasmvisor serve`", path.display())
            }
            Self::Transport(why) => write!(f, "talking to the daemon: {why}"),
            Self::Api { message, .. } => f.write_str(message),
        }
    }
}

/// A client of one daemon.
pub struct Client {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Self { socket: socket.to_owned(), runtime })
    }

    /// Sends one request; on a 2xx answer calls `chunk` with each piece of the body as it
    /// arrives, else returns the daemon's error.
    pub fn call_streaming(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        mut chunk: impl FnMut(&[u8]),
    ) -> Result<u16, ClientError> {
        let transport = |e: &dyn std::fmt::Display| ClientError::Transport(e.to_string());
        self.runtime.block_on(async {
            let stream = match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(s) => s,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                    return Err(ClientError::NoDaemon(self.socket.clone()));
                }
                Err(e) => return Err(transport(&format!("{}: {e}", self.socket.display()))),
            };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| transport(&e))?;
            let driver = tokio::spawn(conn);
            let mut req = Request::builder().method(method).uri(path).header("host", "wasmvisor");
            let body = match body {
                Some((content_type, bytes)) => {
                    req = req.header("content-type", content_type);
                    Full::new(Bytes::from(bytes))
                }
                None => Full::new(Bytes::new()),
            };
            let req = req.body(body).map_err(|e| transport(&e))?;
            let resp = sender.send_request(req).await.map_err(|e| transport(&e))?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            if (200..300).contains(&status) {
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| transport(&e))?;
                    if let Some(data) = frame.data_ref() {
                        chunk(data);
                    }
                }
                driver.abort();
                return Ok(status);
            }
            let bytes = body.collect().await.map_err(|e| transport(&e))?.to_bytes();
            driver.abort();
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| format!("the daemon answered {status}: {}", String::from_utf8_lossy(&bytes)));
            Err(ClientError::Api { message })
        })
    }

    /// Sends one request and returns the status and the whole body of a 2xx answer.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut out = Vec::new();
        let status = self.call_streaming(method, path, body, |c| out.extend_from_slice(c))?;
        Ok((status, out))
    }

    /// A JSON answer.
    pub fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<serde_json::Value, ClientError> {
        let (_, bytes) = self.call(method, path, body)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Transport(format!("the daemon's answer is not JSON: {e}")))
    }

    /// Streams a text answer to stdout as it arrives.
    pub fn print(&self, path: &str) -> Result<(), ClientError> {
        let mut stdout = std::io::stdout();
        self.call_streaming(Method::GET, path, None, |c| {
            let _ = stdout.write_all(c);
            let _ = stdout.flush();
        })?;
        Ok(())
    }
}
