//! A `wasi:http/incoming-handler` that keeps its state in `wasi:keyvalue` (it needs the
//! `keyvalue` grant): `GET /incr?key=K` atomically increments K in the bucket "default" and
//! answers `K = N` with the new value; `GET /get?key=K` answers `K = N` or `K = none`. A
//! response is only sent once the store has answered, so a client that saw `K = N` knows the
//! increment to N is committed. Errors answer 500 with the store's message.

// The generated bindings are the module `wasi` (wasi::keyvalue); the crate is `::wasi`. The
// same WIT as the other examples (see images/src/lib.rs), from this crate's directory.
wit_bindgen::generate!({
    world: "wasmvisor:examples/kv-counter",
    path: [
        "../../guest/wit/deps/keyvalue.wit",
        "../../guest/wit/deps/config.wit",
        "../../guest/wit/deps/logging.wit",
        "../wit",
    ],
    generate_all,
});

use self::wasi::keyvalue::{atomics, store};
use ::wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Counter;

fn describe(error: &store::Error) -> String {
    match error {
        store::Error::NoSuchStore => "no-such-store".to_string(),
        store::Error::AccessDenied => "access-denied".to_string(),
        store::Error::Other(message) => format!("other: {message}"),
    }
}

fn answer(request: &IncomingRequest) -> Result<String, String> {
    let target = request.path_with_query().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let key = query.split('&').find_map(|kv| kv.strip_prefix("key=")).unwrap_or("counter");
    let bucket = store::open("default").map_err(|e| describe(&e))?;
    match path {
        "/incr" => atomics::increment(&bucket, key, 1).map(|n| format!("{key} = {n}\n")).map_err(|e| describe(&e)),
        "/get" => match bucket.get(key).map_err(|e| describe(&e))? {
            Some(v) => Ok(format!("{key} = {}\n", String::from_utf8_lossy(v.as_slice()))),
            None => Ok(format!("{key} = none\n")),
        },
        other => Err(format!("no route {other}")),
    }
}

impl ::wasi::exports::http::incoming_handler::Guest for Counter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, text) = match answer(&request) {
            Ok(text) => (200, text),
            Err(e) => (500, format!("{e}\n")),
        };
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).unwrap();
        let response = OutgoingResponse::new(headers);
        response.set_status_code(status).unwrap();
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().unwrap();
        stream.blocking_write_and_flush(text.as_bytes()).unwrap();
        drop(stream);
        OutgoingBody::finish(body, None).unwrap();
    }
}

::wasi::http::proxy::export!(Counter);
