//! Exits with the code given as its first argument (default 3), after writing to both streams.

fn main() {
    let code: i32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    println!("exiting with {code}");
    eprintln!("to stderr");
    std::process::exit(code);
}
