//! The console: buffered writes over the console hypercall, `print!`-style macros and the
//! `log` backend. A record or a `println!` is one exit unless it exceeds the buffer.

use core::fmt;

use crate::hypercall;

/// Size of a [`Console`]'s buffer: the longest line that costs a single exit.
const BUFFER: usize = 512;

/// A console writer that buffers up to 512 bytes and flushes on drop. It writes to the guest
/// console, or (`to_stderr`) to the tenant's stderr.
pub struct Console {
    buf: [u8; BUFFER],
    len: usize,
    stderr: bool,
}

impl Console {
    /// An empty writer to the console.
    pub const fn new() -> Self {
        Self { buf: [0; BUFFER], len: 0, stderr: false }
    }

    /// An empty writer to the tenant's stderr (no allocation: usable from the panic handler).
    pub const fn to_stderr() -> Self {
        Self { buf: [0; BUFFER], len: 0, stderr: true }
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) {
        if self.len > 0 {
            let bytes = &self.buf[..self.len];
            if self.stderr {
                let call = wasmvisor_abi::hypercall::Hypercall::StdWrite {
                    stream: wasmvisor_abi::hypercall::StdStream::Stderr,
                    gpa: bytes.as_ptr() as u64,
                    len: bytes.len() as u64,
                };
                let _ = hypercall::call(call);
            } else {
                write_bytes(bytes);
            }
            self.len = 0;
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            if self.len == BUFFER {
                self.flush();
            }
            let n = bytes.len().min(BUFFER - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Writes bytes to the console unbuffered. Errors are dropped: the console is the last
/// resort for reporting them.
pub fn write_bytes(bytes: &[u8]) {
    let _ = hypercall::console_write(bytes);
}

/// Implementation of [`print!`] and [`println!`].
#[doc(hidden)]
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let _ = fmt::write(&mut Console::new(), args);
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            print_fmt(format_args!("[{:<5} {}] {}\n", record.level(), record.target(), record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the console as the `log` backend (level `Info`).
pub fn init_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
