//! Reads configuration through wasi:config: prints `KEY=VALUE` or `KEY is not set` for each
//! argument, or with no arguments every `key=value` pair sorted by key. A config error goes to
//! stderr with exit status 1.

wasmvisor_examples::bindings!("wasmvisor:examples/config-reader");

use wasi::config::store;

fn main() {
    let keys: Vec<String> = std::env::args().skip(1).collect();
    if keys.is_empty() {
        let mut pairs = store::get_all().unwrap_or_else(|e| fail("get-all", &e));
        pairs.sort();
        for (key, value) in pairs {
            println!("{key}={value}");
        }
        return;
    }
    for key in keys {
        match store::get(&key) {
            Ok(Some(value)) => println!("{key}={value}"),
            Ok(None) => println!("{key} is not set"),
            Err(e) => fail(&format!("get {key}"), &e),
        }
    }
}

fn fail(step: &str, error: &store::Error) -> ! {
    let error = match error {
        store::Error::Upstream(message) => format!("upstream: {message}"),
        store::Error::Io(message) => format!("io: {message}"),
    };
    eprintln!("config-reader: {step}: error: {error}");
    std::process::exit(1);
}
