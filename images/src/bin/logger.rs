//! Logs through wasi:logging: one record at each level (context "logger", message
//! "record at LEVEL"), then one `info` record per argument (context "args"). Prints how many
//! records it logged.

wasmvisor_examples::bindings!("wasmvisor:examples/logger");

use wasi::logging::logging::{Level, log};

const LEVELS: [(Level, &str); 6] = [
    (Level::Trace, "trace"),
    (Level::Debug, "debug"),
    (Level::Info, "info"),
    (Level::Warn, "warn"),
    (Level::Error, "error"),
    (Level::Critical, "critical"),
];

fn main() {
    let mut records = 0;
    for (level, name) in LEVELS {
        log(level, "logger", &format!("record at {name}"));
        records += 1;
    }
    for arg in std::env::args().skip(1) {
        log(Level::Info, "args", &arg);
        records += 1;
    }
    println!("logged {records} records");
}
