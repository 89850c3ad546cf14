//! Exercises the WASI interfaces beyond stdio: clocks, random, filesystem and sockets (which
//! wasmvisor provides but denies). Prints one line per check.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn main() {
    let t0 = Instant::now();
    let mut spin = 0u64;
    while t0.elapsed().as_micros() < 2000 {
        spin = std::hint::black_box(spin + 1);
    }
    let elapsed = t0.elapsed();
    println!("monotonic: advanced {}", elapsed.as_micros() >= 2000);
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("after the epoch");
    println!("wall clock: after 2020 {}", since_epoch.as_secs() > 1_577_836_800);
    std::thread::sleep(std::time::Duration::from_millis(20));
    println!("sleep: at least 20 ms {}", t0.elapsed().as_millis() >= 22);
    let mut map = std::collections::HashMap::new();
    map.insert("random keys", 1);
    println!("hashmap: {}", map.len());
    match std::fs::read("/etc/hostname") {
        Ok(_) => println!("filesystem: read a host file!"),
        Err(e) => println!("filesystem: denied ({:?})", e.kind()),
    }
    match std::net::TcpStream::connect("127.0.0.1:9") {
        Ok(_) => println!("sockets: connected!"),
        Err(e) => println!("sockets: denied ({:?})", e.kind()),
    }
    match std::net::UdpSocket::bind("0.0.0.0:0") {
        Ok(_) => println!("udp: bound!"),
        Err(e) => println!("udp: denied ({:?})", e.kind()),
    }
}
