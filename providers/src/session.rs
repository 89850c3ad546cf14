//! One guest connection's byte stream: frame reassembly in front of a [`Broker`].
//!
//! Bytes arrive in arbitrary pieces. Whole frames in a piece are handled straight from it; only
//! the unfinished frame at its end is copied into the session's buffer, which therefore never
//! holds more than one frame (at most `MAX_FRAME_LEN + 4` bytes, since a header announcing more
//! is refused before its body is awaited). Responses are appended to the caller's buffer in
//! request order. After a [`ProtocolError`] the stream cannot be trusted to be in step and the
//! caller closes the connection.

use wasmvisor_abi::capability::{DecodeError, FRAME_HEADER_LEN, MAX_FRAME_LEN, PROTOCOL_VERSION, split_frame};

use crate::broker::Broker;

/// Capacity kept by an idle session's buffer; a larger one is given back after a big frame.
const IDLE_BUFFER_CAPACITY: usize = 64 * 1024;

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

/// Byte-stream reassembly for one connection: buffers a partial frame, has the broker handle
/// each complete one, and appends the responses to the caller's output.
#[derive(Debug, Default)]
pub struct Session {
    /// The start of an unfinished frame; empty between frames.
    pending: Vec<u8>,
}

impl Session {
    /// A session at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes the next `bytes` of the stream: each frame they complete is handled by `broker`,
    /// whose response is appended to `out`. On error the session must not be fed again.
    pub fn on_bytes(&mut self, broker: &mut Broker, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        while !bytes.is_empty() {
            if self.pending.is_empty() {
                match split_frame(bytes)? {
                    Some((body, used)) => {
                        broker.handle(body, out)?;
                        bytes = &bytes[used..];
                    }
                    None => {
                        // Less than a header, or a body of at most MAX_FRAME_LEN still coming.
                        self.pending.extend_from_slice(bytes);
                        return Ok(());
                    }
                }
            } else {
                // Top up the unfinished frame with just what it lacks: first its header, then
                // (once split_frame has accepted the header) its body.
                let wanted = match self.pending.get(..FRAME_HEADER_LEN) {
                    None => FRAME_HEADER_LEN,
                    Some(header) => {
                        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                        FRAME_HEADER_LEN + len as usize
                    }
                };
                let take = wanted.saturating_sub(self.pending.len()).min(bytes.len());
                self.pending.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                let result = split_frame(&self.pending).map_err(ProtocolError::from).and_then(|frame| match frame {
                    Some((body, _)) => broker.handle(body, out).map(|()| true),
                    None => Ok(false),
                });
                match result {
                    Ok(false) => {}
                    Ok(true) => {
                        self.pending.clear();
                        self.pending.shrink_to(IDLE_BUFFER_CAPACITY);
                    }
                    Err(err) => {
                        self.pending = Vec::new();
                        return Err(err);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use wasmvisor_abi::capability::{LogLevel, Request, encode_request};

    use super::*;
    use crate::Capability;
    use crate::test_utils::{Res, TempDir, responses, spec};

    fn broker(dir: &TempDir) -> Broker {
        Broker::open(spec(dir.path(), "t", &Capability::ALL, &[("k", "v")])).unwrap()
    }

    fn stream() -> Vec<u8> {
        let requests = [
            Request::Noop,
            Request::ConfigGet { key: "k" },
            Request::Log { level: LogLevel::Debug, context: "c", message: "m" },
            Request::KvIncrement { bucket: "b", key: "n", delta: 1 },
            Request::KvSet { bucket: "b", key: "k", value: &[9; 300] },
            Request::KvGet { bucket: "b", key: "k" },
        ];
        let mut stream = Vec::new();
        for (id, request) in requests.iter().enumerate() {
            encode_request(id as u32, request, &mut stream).unwrap();
        }
        stream
    }

    #[test]
    fn frames_split_at_every_byte_boundary_reassemble() {
        let stream = stream();
        let dir = TempDir::new();
        let mut b = broker(&dir);
        let mut whole = Vec::new();
        Session::new().on_bytes(&mut b, &stream, &mut whole).unwrap();
        let want = responses(&whole);
        assert_eq!(want.len(), 6);
        assert_eq!(want[1], (1, Res::Text(Some("v".into()))));
        assert_eq!(want[5], (5, Res::Bytes(Some(vec![9; 300]))));
        for cut in 0..=stream.len() {
            let mut session = Session::new();
            let mut out = Vec::new();
            session.on_bytes(&mut b, &stream[..cut], &mut out).unwrap();
            session.on_bytes(&mut b, &stream[cut..], &mut out).unwrap();
            let mut got = responses(&out);
            // The counter goes up on every pass; everything else is the same.
            assert_eq!(got[3].0, 3);
            got[3] = want[3].clone();
            assert_eq!(got, want, "cut at {cut}");
        }
        let mut session = Session::new();
        let mut out = Vec::new();
        for byte in &stream {
            session.on_bytes(&mut b, std::slice::from_ref(byte), &mut out).unwrap();
        }
        assert_eq!(responses(&out).len(), 6);
        assert!(session.pending.is_empty());
        // Empty input is nothing.
        session.on_bytes(&mut b, &[], &mut out).unwrap();
    }

    #[test]
    fn a_garbage_body_is_a_protocol_error() {
        let dir = TempDir::new();
        let mut b = broker(&dir);
        for body in [&[][..], &[0xff; 12], &[1, 0, 200], &[1, 7, 99, 1, 2]] {
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(body);
            let mut out = Vec::new();
            assert_eq!(Session::new().on_bytes(&mut b, &frame, &mut out), Err(ProtocolError::Malformed), "{body:?}");
            assert!(out.is_empty());
            // Delivered in pieces, it is refused the same way.
            let mut session = Session::new();
            session.on_bytes(&mut b, &frame[..2], &mut out).unwrap();
            assert_eq!(session.on_bytes(&mut b, &frame[2..], &mut out), Err(ProtocolError::Malformed));
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
        let err = Session::new().on_bytes(&mut b, &frame, &mut Vec::new()).unwrap_err();
        assert_eq!(err, ProtocolError::Version(2));
        assert_eq!(err.to_string(), "capability request of protocol version 2, expected 1");
    }

    #[test]
    fn an_oversize_header_is_refused_before_its_body() {
        let dir = TempDir::new();
        let mut b = broker(&dir);
        let header = (MAX_FRAME_LEN + 1).to_le_bytes();
        let err = Session::new().on_bytes(&mut b, &header, &mut Vec::new()).unwrap_err();
        assert_eq!(err, ProtocolError::TooLong(MAX_FRAME_LEN + 1));
        assert_eq!(err.to_string(), "capability frame of 1048577 bytes exceeds the 1048576-byte limit");
        // After a good frame, and with the header split.
        let mut stream = Vec::new();
        encode_request(1, &Request::Noop, &mut stream).unwrap();
        stream.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut session = Session::new();
        let mut out = Vec::new();
        session.on_bytes(&mut b, &stream[..stream.len() - 1], &mut out).unwrap();
        assert_eq!(responses(&out), [(1, Res::Unit)]);
        assert_eq!(
            session.on_bytes(&mut b, &stream[stream.len() - 1..], &mut out),
            Err(ProtocolError::TooLong(u32::MAX))
        );
    }

    #[test]
    fn the_buffer_holds_at_most_one_frame() {
        let dir = TempDir::new();
        let mut b = broker(&dir);
        let value = vec![1u8; MAX_FRAME_LEN as usize - 64];
        let mut frame = Vec::new();
        encode_request(1, &Request::KvSet { bucket: "b", key: "k", value: &value }, &mut frame).unwrap();
        let mut twice = frame.clone();
        twice.extend_from_slice(&frame);
        let mut session = Session::new();
        let mut out = Vec::new();
        // The first frame and most of the second in one piece: only the second's start is kept.
        session.on_bytes(&mut b, &twice[..twice.len() - 10], &mut out).unwrap();
        assert_eq!(session.pending.len(), frame.len() - 10);
        session.on_bytes(&mut b, &twice[twice.len() - 10..], &mut out).unwrap();
        assert_eq!(responses(&out), [(1, Res::Unit), (1, Res::Unit)]);
        assert!(session.pending.is_empty() && session.pending.capacity() <= IDLE_BUFFER_CAPACITY);
    }
}
