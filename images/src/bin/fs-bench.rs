//! Filesystem workloads for `cargo bench --bench fs`, timed inside the component so that
//! `wasmvisor run --dir` and `wasmtime run --dir` are compared on the calls alone. Each mode
//! prints `<name> <microseconds> [<count>]`.
//!
//! - `meta DIR N`: N times open+stat+close of `DIR/f`;
//! - `write DIR MIB`: writes `DIR/big`, MIB MiB in 64 KiB writes, then `sync_all`;
//! - `read DIR [KIB]`: reads `DIR/big` to the end in reads of KIB (64) KiB;
//! - `readdir DIR/SUB`: lists every entry.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let dir = args.get(2).expect("usage: fs-bench MODE DIR [N]");
    let t = Instant::now();
    match mode {
        "meta" => {
            let n: u32 = args[3].parse().unwrap();
            let path = format!("{dir}/f");
            fs::write(&path, b"x").unwrap();
            let t = Instant::now();
            for _ in 0..n {
                let f = File::open(&path).unwrap();
                let m = f.metadata().unwrap();
                assert_eq!(m.len(), 1);
                drop(f);
            }
            println!("meta {} {n}", t.elapsed().as_micros());
            return;
        }
        "write" => {
            let mib: usize = args[3].parse().unwrap();
            let chunk = vec![0x5au8; 64 * 1024];
            let mut f = File::create(format!("{dir}/big")).unwrap();
            for _ in 0..mib * 16 {
                f.write_all(&chunk).unwrap();
            }
            f.sync_all().unwrap();
            println!("write {} {}", t.elapsed().as_micros(), mib << 20);
        }
        "read" => {
            let mut f = File::open(format!("{dir}/big")).unwrap();
            let kib: usize = args.get(3).map_or(64, |k| k.parse().unwrap());
            let mut buf = vec![0u8; kib * 1024];
            let mut total = 0usize;
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            println!("read {} {total}", t.elapsed().as_micros());
        }
        "readdir" => {
            let n = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().len()).filter(|l| *l > 0).count();
            println!("readdir {} {n}", t.elapsed().as_micros());
        }
        other => panic!("unknown mode {other:?}"),
    }
}
