//! Fuzzes the HTTP transport decoder: any byte stream, split into frames and fed to the
//! sequence check in both directions, must decode or fail cleanly, and every head that decodes
//! must re-encode to the same frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmvisor_abi::http::{Direction, Frame, Order, encode_request_head, encode_response_head, split};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut orders = [Order::new(Direction::Request), Order::new(Direction::Response)];
    while let Ok(Some((frame, used))) = split(rest) {
        for order in &mut orders {
            let _ = order.accept(&frame);
        }
        let mut again = Vec::new();
        match &frame {
            Frame::RequestHead(h) => encode_request_head(h, &mut again).expect("a checked head re-encodes"),
            Frame::ResponseHead(h) => encode_response_head(h, &mut again).expect("a checked head re-encodes"),
            _ => {}
        }
        if !again.is_empty() {
            assert_eq!(split(&again).expect("round trip").map(|(f, _)| f), Some(frame.clone()));
        }
        rest = &rest[used..];
    }
});
