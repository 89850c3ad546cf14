//! Times wasi:keyvalue calls: N `get`s of an 8-byte value and N atomic `increment`s in the
//! bucket "bench". Prints the median and 99th-percentile latency of each, and the increment rate.

wasmvisor_examples::bindings!("wasmvisor:examples/kv-bench");

use std::time::Instant;

use wasi::keyvalue::{atomics, store};

const VALUE: &[u8; 8] = b"01234567";

fn main() {
    let Some(n) = std::env::args().nth(1).and_then(|s| s.parse::<usize>().ok()).filter(|&n| n > 0) else {
        eprintln!("usage: kv-bench N (N >= 1)");
        std::process::exit(1);
    };
    let bucket = store::open("bench").unwrap_or_else(|e| fail("open", &e));
    bucket.set("k", VALUE).unwrap_or_else(|e| fail("set k", &e));

    let mut get_ns = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let value = bucket.get("k").unwrap_or_else(|e| fail("get k", &e));
        get_ns.push(start.elapsed().as_nanos() as u64);
        if value.as_deref() != Some(VALUE.as_slice()) {
            eprintln!("kv-bench: get k: returned {value:?}, not the value set");
            std::process::exit(1);
        }
    }

    let mut increment_ns = Vec::with_capacity(n);
    let loop_start = Instant::now();
    for _ in 0..n {
        let start = Instant::now();
        atomics::increment(&bucket, "n", 1).unwrap_or_else(|e| fail("increment n", &e));
        increment_ns.push(start.elapsed().as_nanos() as u64);
    }
    let per_sec = n as f64 / loop_start.elapsed().as_secs_f64();

    let (p50, p99) = percentiles(&mut get_ns);
    println!("get p50_ns={p50} p99_ns={p99} n={n}");
    let (p50, p99) = percentiles(&mut increment_ns);
    println!("increment p50_ns={p50} p99_ns={p99} per_sec={per_sec:.0} n={n}");
}

/// The 50th and 99th percentiles (nearest rank) of a non-empty sample.
fn percentiles(sample: &mut [u64]) -> (u64, u64) {
    sample.sort_unstable();
    let rank = |p: usize| sample[(sample.len() * p).div_ceil(100).max(1) - 1];
    (rank(50), rank(99))
}

fn fail(step: &str, error: &store::Error) -> ! {
    let error = match error {
        store::Error::NoSuchStore => "no-such-store".to_string(),
        store::Error::AccessDenied => "access-denied".to_string(),
        store::Error::Other(message) => format!("other: {message}"),
    };
    eprintln!("kv-bench: {step}: error: {error}");
    std::process::exit(1);
}
