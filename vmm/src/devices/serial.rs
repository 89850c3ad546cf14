//! COM1: a vm-superio 16550 UART as a debug console.
//!
//! Every register access is an exit (~25 us under PVM), so the UART is for debugging only;
//! the console hypercall carries a whole buffer per exit. The guest has no interrupts, so the
//! interrupt line goes nowhere. Output is collected per line and sent to the console.

use vm_superio::Serial;
use vm_superio::serial::NoEvents;

use crate::console::Console;

/// The UART's interrupt line: the guest runs without interrupts.
pub struct NoInterrupt;

impl vm_superio::Trigger for NoInterrupt {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Flush the line buffer when it reaches this size even without a newline.
const LINE_MAX: usize = 256;

/// The UART and its pending output.
pub struct SerialConsole {
    uart: Serial<NoInterrupt, NoEvents, Vec<u8>>,
}

impl Default for SerialConsole {
    fn default() -> Self {
        Self::new()
    }
}

impl SerialConsole {
    /// A UART with an empty line buffer.
    pub fn new() -> Self {
        Self { uart: Serial::new(NoInterrupt, Vec::new()) }
    }

    /// A guest write to register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8, console: &mut Console) {
        // The only error is the interrupt trigger's, which cannot fail.
        let _ = self.uart.write(offset, value);
        let pending = self.uart.writer_mut();
        if pending.last() == Some(&b'\n') || pending.len() >= LINE_MAX {
            console.write(pending);
            pending.clear();
        }
    }

    /// A guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Sends what is pending (at VM exit).
    pub fn flush(&mut self, console: &mut Console) {
        let pending = self.uart.writer_mut();
        if !pending.is_empty() {
            console.write(pending);
            pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_console() {
        let mut console = Console::new(Box::new(std::io::sink()));
        let mut uart = SerialConsole::new();
        for b in b"hi\nthere" {
            uart.write(0, *b, &mut console);
        }
        assert_eq!(console.tail(), ["hi"]);
        uart.flush(&mut console);
        assert_eq!(console.tail(), ["hi", "there"]);
        // Line status register: transmitter empty.
        assert_ne!(uart.read(5) & 0x20, 0);
    }
}
