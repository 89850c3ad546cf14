//! Walks the wasi:keyvalue API (store, atomics, batch) in one bucket (first argument, default
//! "probe"), printing one `STEP: RESULT` line per call. A failed call prints
//! `STEP: error: ERROR` and the probe goes on; the exit status is 1 if any call failed.

wasmvisor_examples::bindings!("wasmvisor:examples/kv-probe");

use wasi::keyvalue::store::{self, Bucket};
use wasi::keyvalue::{atomics, batch};

/// A `list-keys` walk gives up after this many pages, so a host whose cursor never runs out
/// cannot hang the probe.
const MAX_PAGES: usize = 10_000;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "probe".to_string());
    let mut probe = Probe { failed: false };
    let Some(bucket) = probe.step(&format!("open {name}"), store::open(&name), |_| "ok".into()) else {
        std::process::exit(1);
    };
    let b = &bucket;
    probe.step("set a=1", b.set("a", b"1"), ok);
    probe.step("get a", b.get("a"), |v| value(v.as_deref()));
    probe.step("exists a", b.exists("a"), |e| e.to_string());
    probe.step("exists missing", b.exists("missing"), |e| e.to_string());
    probe.step("get missing", b.get("missing"), |v| value(v.as_deref()));
    let pairs = [("b".to_string(), b"2".to_vec()), ("c".to_string(), b"3".to_vec())];
    probe.step("set-many b=2 c=3", batch::set_many(b, &pairs), ok);
    let keys = ["a", "b", "missing"].map(String::from);
    probe.step("get-many a b missing", batch::get_many(b, &keys), |found| {
        let found: Vec<String> = found
            .iter()
            .map(|pair| match pair {
                Some((key, v)) => format!("{key}={}", value(Some(v))),
                None => "none".to_string(),
            })
            .collect();
        found.join(" ")
    });
    probe.step("list-keys", list_keys(b), |keys| keys.join(" "));
    probe.step("increment n 5", atomics::increment(b, "n", 5), |n| n.to_string());
    probe.step("increment n 5", atomics::increment(b, "n", 5), |n| n.to_string());
    probe.step("delete a", b.delete("a"), ok);
    probe.step("exists a", b.exists("a"), |e| e.to_string());
    probe.step("delete-many b c", batch::delete_many(b, &["b", "c"].map(String::from)), ok);
    probe.step("list-keys", list_keys(b), |keys| keys.join(" "));
    if probe.failed {
        std::process::exit(1);
    }
}

struct Probe {
    failed: bool,
}

impl Probe {
    /// Prints one step's result (or its error) and hands the value on.
    fn step<T>(&mut self, step: &str, result: Result<T, store::Error>, show: impl FnOnce(&T) -> String) -> Option<T> {
        match result {
            Ok(v) => {
                println!("{step}: {}", show(&v));
                Some(v)
            }
            Err(e) => {
                self.failed = true;
                println!("{step}: error: {}", describe(&e));
                None
            }
        }
    }
}

/// Every key in the bucket, all pages, sorted.
fn list_keys(bucket: &Bucket) -> Result<Vec<String>, store::Error> {
    let mut keys = Vec::new();
    let mut cursor = None;
    for _ in 0..MAX_PAGES {
        let page = bucket.list_keys(cursor)?;
        keys.extend(page.keys);
        cursor = page.cursor;
        if cursor.is_none() {
            keys.sort();
            return Ok(keys);
        }
    }
    Err(store::Error::Other(format!("no last page after {MAX_PAGES} pages")))
}

fn ok(_: &()) -> String {
    "ok".to_string()
}

fn value(v: Option<&[u8]>) -> String {
    match v {
        Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        None => "none".to_string(),
    }
}

fn describe(error: &store::Error) -> String {
    match error {
        store::Error::NoSuchStore => "no-such-store".to_string(),
        store::Error::AccessDenied => "access-denied".to_string(),
        store::Error::Other(message) => format!("other: {message}"),
    }
}
