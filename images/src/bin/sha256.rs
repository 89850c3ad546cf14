//! A compute kernel: SHA-256 over N MiB (first argument, default 64) of generated data,
//! hashed in 1 MiB chunks. Prints the digest in hex.

use sha2::{Digest, Sha256};

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let mut chunk = vec![0u8; 1 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut hasher = Sha256::new();
    for _ in 0..mib {
        for b in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        hasher.update(&chunk);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    println!("sha256 of {mib} MiB: {hex}");
}
