//! `http-outgoing`: the host makes a tenant's outgoing `wasi:http` requests, only to the hosts
//! of its allow-list. The broker checks the grant and the allow-list; the client itself is
//! the embedder's ([`OutgoingHttp`]): the daemon's runs on its tokio runtime with hyper and
//! rustls, and a VMM process (whose threads are confined to Unix sockets) has none.

use std::time::Duration;

use wasmvisor_abi::capability::HttpFailure;

/// One outgoing request, as the guest sent it.
#[derive(Debug)]
pub struct FetchRequest<'a> {
    /// The method.
    pub method: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Host and optional port.
    pub authority: &'a str,
    /// Path and query.
    pub path_with_query: &'a str,
    /// Header fields.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The whole body.
    pub body: &'a [u8],
    /// Limit on connecting.
    pub connect_timeout: Option<Duration>,
    /// Limit on the wait for the response head.
    pub first_byte_timeout: Option<Duration>,
    /// Largest response body the transport carries back.
    pub max_response_body: usize,
}

/// A response, whole.
#[derive(Debug, Default)]
pub struct FetchResponse {
    /// The status.
    pub status: u16,
    /// Header fields.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Makes outgoing requests for a broker.
pub trait OutgoingHttp: Send + Sync {
    /// Makes `request` (already checked against the allow-list) and returns its response.
    fn fetch(&self, request: &FetchRequest<'_>) -> Result<FetchResponse, (HttpFailure, String)>;
}

/// Splits an authority into its host (lowercase) and port (the scheme's default if absent).
pub fn host_port(scheme: &str, authority: &str) -> Option<(String, u16)> {
    let default = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => default,
            None => return None,
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (authority.to_owned(), default),
        }
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#', '\\', ' ']) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// Whether `allow` lets a request reach `authority` over `scheme`: an entry `host` allows
/// that host on the scheme's default port, `host:port` that port.
pub fn allowed(allow: &[String], scheme: &str, authority: &str) -> bool {
    let Some(target) = host_port(scheme, authority) else { return false };
    allow.iter().any(|entry| host_port(scheme, entry).is_some_and(|e| e == target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_is_exact_on_host_and_port() {
        let allow = vec!["api.example.com".to_string(), "127.0.0.1:9000".to_string(), "[::1]:8080".to_string()];
        assert!(allowed(&allow, "https", "api.example.com"));
        assert!(allowed(&allow, "https", "API.Example.com:443"));
        assert!(allowed(&allow, "http", "api.example.com:80"));
        assert!(!allowed(&allow, "https", "api.example.com:8443"));
        assert!(!allowed(&allow, "https", "evil.api.example.com"));
        assert!(!allowed(&allow, "https", "api.example.com.evil"));
        assert!(allowed(&allow, "http", "127.0.0.1:9000"));
        assert!(!allowed(&allow, "http", "127.0.0.1"));
        assert!(!allowed(&allow, "http", "127.0.0.1:9001"));
        assert!(allowed(&allow, "http", "[::1]:8080"));
        assert!(!allowed(&allow, "http", "[::1]"));
        assert!(!allowed(&allow, "http", "user@api.example.com"));
        assert!(!allowed(&allow, "ftp", "api.example.com"));
        assert!(!allowed(&[], "https", "api.example.com"));
    }
}
