//! Fuzzes the capability protocol decoder: any byte stream, split into frames and decoded as
//! requests and responses, must decode or fail cleanly, and whatever decodes must re-encode to
//! a body that decodes to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmvisor_abi::capability::{
    FRAME_HEADER_LEN, decode_request, decode_response, encode_request, encode_response, split_frame,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((body, used))) = split_frame(rest) {
        if let Ok(env) = decode_request(body) {
            let mut again = Vec::new();
            encode_request(env.id, &env.request, &mut again).expect("a decoded request re-encodes");
            assert_eq!(decode_request(&again[FRAME_HEADER_LEN..]).expect("round trip"), env);
        }
        if let Ok(env) = decode_response(body) {
            let mut again = Vec::new();
            encode_response(env.id, &env.result, &mut again).expect("a decoded response re-encodes");
            assert_eq!(decode_response(&again[FRAME_HEADER_LEN..]).expect("round trip"), env);
        }
        rest = &rest[used..];
    }
});
