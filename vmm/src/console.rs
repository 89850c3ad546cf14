//! The guest console: where console hypercalls and the UART write. It forwards bytes to the
//! host sink as they come and remembers the last lines, so that a failure report can show
//! what the guest said last.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Lines a failure report shows.
pub const TAIL_LINES: usize = 10;
/// Longest line kept in the tail; longer ones are cut.
const TAIL_LINE_MAX: usize = 300;

/// A console sink with a tail of recent lines.
pub struct Console {
    out: Box<dyn Write + Send>,
    tail: VecDeque<String>,
    partial: Vec<u8>,
    bytes: u64,
    broken: bool,
}

impl Console {
    /// A console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, tail: VecDeque::with_capacity(TAIL_LINES + 1), partial: Vec::new(), bytes: 0, broken: false }
    }

    /// Forwards `bytes` to the sink and records complete lines. If the sink fails (say, a
    /// closed pipe), output is dropped from then on; the guest keeps running.
    pub fn write(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        if !self.broken && self.out.write_all(bytes).and_then(|()| self.out.flush()).is_err() {
            self.broken = true;
            tracing::warn!("the console sink failed; dropping further guest console output");
        }
        for &b in bytes {
            if b == b'\n' {
                self.push_line();
            } else if self.partial.len() < TAIL_LINE_MAX {
                self.partial.push(b);
            }
        }
    }

    fn push_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The last lines written, oldest first, including an unterminated last line.
    pub fn tail(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.tail.iter().cloned().collect();
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        let skip = lines.len().saturating_sub(TAIL_LINES);
        lines.split_off(skip)
    }

    /// Total bytes the guest wrote.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A writer into shared memory: clone it, hand one clone to a VM as a sink, read the other.
/// For embedders that capture a guest's output in-process (and for tests and benchmarks).
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// What was written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// What was written so far, as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_and_keeps_a_tail() {
        let sink = SharedBuffer::default();
        let mut c = Console::new(Box::new(sink.clone()));
        for i in 0..15 {
            c.write(format!("line {i}\n").as_bytes());
        }
        c.write(b"partial");
        let tail = c.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.first().unwrap(), "line 6");
        assert_eq!(tail.last().unwrap(), "partial");
        assert!(sink.contents().ends_with(b"line 14\npartial"));
        c.write(&[b'x'; 1000]);
        assert!(c.tail().last().unwrap().len() <= TAIL_LINE_MAX);
    }

    #[test]
    fn a_broken_sink_does_not_stop_the_console() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Console::new(Box::new(Broken));
        c.write(b"a\nb\n");
        assert_eq!(c.tail(), ["a", "b"]);
        assert_eq!(c.bytes(), 4);
    }
}
