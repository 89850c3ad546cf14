//! Counts with wasi:keyvalue: atomically increments KEY (first argument, default "counter") in the
//! bucket "default" and prints `KEY = N`, the new value.

wasmvisor_examples::bindings!("wasmvisor:examples/kv-counter");

use wasi::keyvalue::{atomics, store};

fn main() {
    let key = std::env::args().nth(1).unwrap_or_else(|| "counter".to_string());
    let bucket = store::open("default").unwrap_or_else(|e| fail("open", &e));
    let value = atomics::increment(&bucket, &key, 1).unwrap_or_else(|e| fail("increment", &e));
    println!("{key} = {value}");
}

fn fail(step: &str, error: &store::Error) -> ! {
    let error = match error {
        store::Error::NoSuchStore => "no-such-store".to_string(),
        store::Error::AccessDenied => "access-denied".to_string(),
        store::Error::Other(message) => format!("other: {message}"),
    };
    eprintln!("kv-counter: {step}: error: {error}");
    std::process::exit(1);
}
