//! Traps on request: `unreachable`, `oob` (out-of-bounds load), `div` (integer division by
//! zero), `stack` (unbounded recursion). Prints what it is about to do first.

fn main() {
    let kind = std::env::args().nth(1).unwrap_or_else(|| "unreachable".into());
    println!("about to trap: {kind}");
    match kind.as_str() {
        "unreachable" => core::arch::wasm32::unreachable(),
        "oob" => {
            let p = std::hint::black_box(0xffff_fff0usize) as *const u64;
            // SAFETY: deliberately out of bounds; the Wasm sandbox turns it into a trap.
            let v = unsafe { core::ptr::read_volatile(p) };
            println!("read {v}");
        }
        "div" => {
            let d: i32 = std::hint::black_box(0);
            // Drop Rust's own zero check so that the Wasm `i32.div_s` itself traps.
            // SAFETY: deliberately false: the division traps in the Wasm sandbox.
            unsafe { std::hint::assert_unchecked(d != 0) };
            println!("{}", std::hint::black_box(7) / d);
        }
        "stack" => println!("{}", recurse(std::hint::black_box(1))),
        other => {
            eprintln!("unknown trap kind {other}");
            std::process::exit(2);
        }
    }
}

#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let pad = std::hint::black_box([n; 16]);
    recurse(n + 1) + pad[1]
}
