//! Why a connection's byte stream cannot be served. Framing itself (`split_frame` in
//! `wasmvisor_abi::capability`) is the caller's: the VMM's vsock device splits frames off a
//! connection's bytes as its credit accounting allows and hands each body to
//! [`crate::Broker::handle`]. After a [`ProtocolError`] the stream cannot be trusted to be in
//! step and the caller closes the connection.

use wasmvisor_abi::capability::{DecodeError, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// Why a connection's byte stream cannot be served (the caller closes it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame header announced a body longer than the protocol allows.
    #[error("capability frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLong(u32),
    /// A frame body is not a well-formed request.
    #[error("malformed capability request")]
    Malformed,
    /// A request of another protocol version.
    #[error("capability request of protocol version {0}, expected {PROTOCOL_VERSION}")]
    Version(u16),
    /// Not even an error response could be encoded for the request (cannot happen in practice).
    #[error("could not encode the response to capability request {id}")]
    Reply {
        /// The request's id.
        id: u32,
    },
}

impl From<DecodeError> for ProtocolError {
    fn from(err: DecodeError) -> Self {
        match err {
            DecodeError::TooLong(len) => Self::TooLong(len),
            DecodeError::Malformed => Self::Malformed,
            DecodeError::Version(version) => Self::Version(version),
        }
    }
}

#[cfg(test)]
mod tests {
    use wasmvisor_abi::capability::{FRAME_HEADER_LEN, Request, encode_request};

    use super::*;
    use crate::test_utils::{TempDir, spec};
    use crate::{Broker, Capability};

    fn broker(dir: &TempDir) -> Broker {
        Broker::open(spec(dir.path(), "t", &Capability::ALL, &[("k", "v")])).unwrap()
    }

    #[test]
    fn a_garbage_body_is_a_protocol_error() {
        let dir = TempDir::new();
        let mut b = broker(&dir);
        for body in [&[][..], &[0xff; 12], &[1, 0, 200], &[1, 7, 99, 1, 2]] {
            let mut out = Vec::new();
            assert_eq!(b.handle(body, &mut out), Err(ProtocolError::Malformed), "{body:?}");
            assert!(out.is_empty());
        }
        assert_eq!(ProtocolError::Malformed.to_string(), "malformed capability request");
    }

    #[test]
    fn another_version_is_a_protocol_error() {
        let dir = TempDir::new();
        let mut b = broker(&dir);
        let mut frame = Vec::new();
        encode_request(1, &Request::Noop, &mut frame).unwrap();
        frame[FRAME_HEADER_LEN] = 2;
        let err = b.handle(&frame[FRAME_HEADER_LEN..], &mut Vec::new()).unwrap_err();
        assert_eq!(err, ProtocolError::Version(2));
        assert_eq!(err.to_string(), "capability request of protocol version 2, expected 1");
    }

    #[test]
    fn frame_errors_read_well() {
        let err = ProtocolError::from(DecodeError::TooLong(MAX_FRAME_LEN + 1));
        assert_eq!(err.to_string(), "capability frame of 1048577 bytes exceeds the 1048576-byte limit");
    }
}
