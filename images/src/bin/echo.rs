//! Echoes its arguments (one per line, after `args:`) and its environment, sorted.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("args: {}", args.len());
    for a in &args {
        println!("arg: {a}");
    }
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.sort();
    for (k, v) in env {
        println!("env: {k}={v}");
    }
}
