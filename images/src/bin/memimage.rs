//! A component whose linear memory starts with 3 MiB of initialised data (a 2 MiB table and a
//! 1 MiB writable buffer), large enough that wasmvisor maps it copy-on-write from the
//! artifact. It checks every byte of the table, writes the buffer and reads it back, grows its
//! memory by N MiB (first argument, default 48: past the reservation, so the memory moves)
//! checking that every new byte reads zero, then checks table and buffer again.
//! Prints `memimage ok: ...`; exits 2 on any mismatch, naming it.

const TABLE_LEN: usize = 256 * 1024;

/// 2 MiB of pseudo-random words, none zero: a data segment no page of which is empty.
static TABLE: [u64; TABLE_LEN] = table();

/// 1 MiB, initialised non-zero, written at run time.
static mut BUFFER: [u8; 1 << 20] = [0x5a; 1 << 20];

const fn next(x: u64) -> u64 {
    let x = x ^ (x << 13);
    let x = x ^ (x >> 7);
    x ^ (x << 17)
}

const fn table() -> [u64; TABLE_LEN] {
    let mut t = [0u64; TABLE_LEN];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut i = 0;
    while i < TABLE_LEN {
        x = next(x);
        t[i] = x | 1;
        i += 1;
    }
    t
}

fn fail(what: &str) -> ! {
    eprintln!("memimage: {what}");
    std::process::exit(2);
}

fn check_table() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    // Read through a black box so that the compiler cannot fold the comparison away.
    let table = std::hint::black_box(&TABLE);
    for (i, &word) in table.iter().enumerate() {
        x = next(x);
        if word != x | 1 {
            fail(&format!("table word {i} is {word:#x}, expected {:#x}", x | 1));
        }
    }
}

fn main() {
    let grow_mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(48);
    check_table();
    // SAFETY: single-threaded; the only access to BUFFER is through this reference.
    let buffer = unsafe { &mut *std::ptr::addr_of_mut!(BUFFER) };
    if buffer.iter().any(|&b| b != 0x5a) {
        fail("the buffer does not hold its initial bytes");
    }
    for (i, b) in buffer.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }

    let mut blocks = Vec::new();
    for n in 0..grow_mib {
        let mut block = vec![0u8; 1 << 20];
        if std::hint::black_box(&block).iter().any(|&b| b != 0) {
            fail(&format!("grown memory (MiB {n}) does not read zero"));
        }
        block.fill(0xff);
        blocks.push(block);
    }

    check_table();
    if buffer.iter().enumerate().any(|(i, &b)| b != (i % 251) as u8) {
        fail("the buffer lost what was written to it");
    }
    println!("memimage ok: 2 MiB table and 1 MiB buffer intact, grew by {} MiB", blocks.len());
}
