//! Honest vsock behaviours for the tests and benchmarks: capability round trips timed with the
//! TSC next to bare exits, a guest port that echoes host-initiated connections, and a guest
//! that waits on a connection without spinning.

use alloc::vec::Vec;

use wasmvisor_guest::abi::capability::{Reply, Request};
use wasmvisor_guest::abi::hypercall::Hypercall;
use wasmvisor_guest::boot::Boot;
use wasmvisor_guest::vsock::{CapabilityClient, Vsock};
use wasmvisor_guest::{hypercall, println};

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions and runs at CPL 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Connects to the broker. The client is never dropped (see `wasm::caps`): tearing the device
/// down costs ~27 register exits the VM's end makes pointless.
fn client(boot: &Boot) -> Option<&'static mut CapabilityClient> {
    match CapabilityClient::connect(wasmvisor_guest::vsock::present(boot), boot.tsc_khz()) {
        Ok(c) => Some(alloc::boxed::Box::leak(alloc::boxed::Box::new(c))),
        Err(e) => {
            println!("vsock: cannot reach the broker: {e}");
            None
        }
    }
}

/// Initialises the device, kept for the guest's life like [`client`]'s.
fn device(boot: &Boot) -> Option<&'static mut Vsock> {
    match Vsock::init(wasmvisor_guest::vsock::present(boot), boot.tsc_khz()) {
        Ok(v) => Some(alloc::boxed::Box::leak(alloc::boxed::Box::new(v))),
        Err(e) => {
            println!("vsock: {e}");
            None
        }
    }
}

/// `n` no-op round trips.
pub fn noop(boot: &Boot, n: u64) -> u8 {
    let Some(c) = client(boot) else { return 1 };
    for i in 0..n {
        if !matches!(c.call(&Request::Noop, |r| r.is_ok()), Ok(true)) {
            println!("noop {i} failed");
            return 1;
        }
    }
    println!("noop round trips: {n}");
    0
}

/// Times `n` of each: a bare exit (Nop hypercall), a no-op round trip, a key-value get and a
/// key-value increment; prints p50/p99 in nanoseconds.
pub fn bench(boot: &Boot, n: u64) -> u8 {
    let khz = boot.tsc_khz().max(1);
    let ns = |ticks: u64| ticks * 1_000_000 / khz;
    let report = |name: &str, samples: &mut Vec<u64>| {
        samples.sort_unstable();
        let at = |q: f64| ns(samples[((samples.len() - 1) as f64 * q) as usize]);
        println!("{name} p50_ns={} p99_ns={} n={}", at(0.5), at(0.99), samples.len());
    };
    let time = |f: &mut dyn FnMut() -> bool| -> Option<Vec<u64>> {
        let mut samples = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let t = rdtsc();
            if !f() {
                return None;
            }
            samples.push(rdtsc() - t);
        }
        Some(samples)
    };
    // Setup, timed in two parts: device initialisation, then the connection to the broker.
    let t0 = rdtsc();
    let Ok(mut v) = Vsock::init(wasmvisor_guest::vsock::present(boot), boot.tsc_khz()) else { return 1 };
    let t1 = rdtsc();
    let Ok(conn) = v.connect(wasmvisor_guest::abi::vsock::CAPABILITY_PORT) else { return 1 };
    let t2 = rdtsc();
    println!("device-init p50_ns={0} p99_ns={0} n=1", ns(t1 - t0));
    println!("connect p50_ns={0} p99_ns={0} n=1", ns(t2 - t1));
    let c = alloc::boxed::Box::leak(alloc::boxed::Box::new(CapabilityClient::over(v, conn)));
    // Warm up: the first calls touch fresh pages on both sides.
    for _ in 0..10 {
        let _ = c.call(&Request::Noop, |_| ());
    }
    let Some(mut exits) = time(&mut || hypercall::call(Hypercall::Nop).is_ok()) else { return 1 };
    let Some(mut noops) = time(&mut || matches!(c.call(&Request::Noop, |r| r.is_ok()), Ok(true))) else {
        println!("noop failed");
        return 1;
    };
    let set = Request::KvSet { bucket: "bench", key: "k", value: b"12345678" };
    if !matches!(c.call(&set, |r| r.is_ok()), Ok(true)) {
        println!("kv set failed");
        return 1;
    }
    let get = Request::KvGet { bucket: "bench", key: "k" };
    let Some(mut gets) = time(&mut || matches!(c.call(&get, |r| matches!(r, Ok(Reply::Bytes(Some(_))))), Ok(true)))
    else {
        println!("kv get failed");
        return 1;
    };
    let inc = Request::KvIncrement { bucket: "bench", key: "n", delta: 1 };
    let start = rdtsc();
    let Some(mut incs) = time(&mut || matches!(c.call(&inc, |r| matches!(r, Ok(Reply::U64(_)))), Ok(true))) else {
        println!("kv increment failed");
        return 1;
    };
    let total_ns = ns(rdtsc() - start).max(1);
    report("exit", &mut exits);
    report("noop", &mut noops);
    report("kv-get", &mut gets);
    report("kv-increment", &mut incs);
    println!("kv-increment per_sec={}", n * 1_000_000_000 / total_ns);
    0
}

/// Listens on `port`, echoes one host-initiated connection until the host closes it.
pub fn echo(boot: &Boot, port: u32) -> u8 {
    let Some(v) = device(boot) else { return 1 };
    v.listen(port);
    println!("listening on {port}");
    let Ok(conn) = v.accept() else { return 1 };
    let mut buf = Vec::new();
    let mut echoed = 0usize;
    loop {
        buf.clear();
        match v.recv_some(conn, &mut buf) {
            Ok(()) => {
                echoed += buf.len();
                if v.send(conn, &buf).is_err() {
                    return 1;
                }
            }
            Err(_) => break,
        }
    }
    println!("echoed {echoed} bytes");
    0
}

/// Connects to host `port` and waits (in `WaitDevice`) for a line, then prints it.
pub fn idle(boot: &Boot, port: u32) -> u8 {
    let Some(v) = device(boot) else { return 1 };
    let conn = match v.connect(port) {
        Ok(c) => c,
        Err(e) => {
            println!("connect to host port {port}: {e}");
            return 1;
        }
    };
    println!("connected to host port {port}; waiting");
    let mut buf = Vec::new();
    while !buf.ends_with(b"\n") {
        if v.recv_some(conn, &mut buf).is_err() {
            println!("the host closed the connection");
            return 1;
        }
    }
    println!("got: {}", core::str::from_utf8(&buf).unwrap_or("?").trim_end());
    0
}

/// A hostile HTTP VM: connects to the front door like a real one, then answers each request
/// with a response head whose payload does not decode (`http-garbage`), or never (`http-silent`).
pub fn http_hostile(boot: &Boot, kind: &str) -> u8 {
    let Some(v) = device(boot) else { return 1 };
    let Ok(conn) = v.connect(wasmvisor_guest::abi::vsock::HTTP_PORT) else { return 1 };
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if v.recv_some(conn, &mut buf).is_err() {
            return 0;
        }
        if kind == "http-garbage" {
            // A response-head frame of three bytes that are no postcard head.
            let _ = v.send(conn, &[2, 3, 0, 0, 0, 0xff, 0xff, 0xff]);
        }
    }
}
