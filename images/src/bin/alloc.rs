//! Allocates and touches N MiB (first argument, default 16) in 1 MiB blocks, then reports.

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(16);
    let mut blocks = Vec::new();
    for i in 0..mib {
        let mut block = vec![0u8; 1 << 20];
        block[i % (1 << 20)] = 1;
        blocks.push(block);
    }
    println!("allocated {} MiB", blocks.len());
}
