//! Prints a greeting.

fn main() {
    println!("Hello, world!");
}
