//! Copies stdin to stdout, then reports the byte count on stderr.

use std::io::{Read, Write};

fn main() {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = stdin.read(&mut buf).expect("read stdin");
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n]).expect("write stdout");
        total += n as u64;
    }
    stdout.flush().expect("flush stdout");
    eprintln!("cat: {total} bytes");
}
