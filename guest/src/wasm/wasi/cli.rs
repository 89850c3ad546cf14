//! `wasi:cli`: arguments and environment from BootInfo, exit, the stdio streams, and no
//! terminals (the tenant's stdio is a byte stream through the VMM).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use wasmtime::component::Resource;

use super::wasi::cli::{
    environment, exit, stderr, stdin, stdout, terminal_input, terminal_output, terminal_stderr, terminal_stdin,
    terminal_stdout,
};
use super::{Ctx, InputStream, Never, OutputStream};

/// The component asked to exit with this code; carried out of the Wasm call as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit(pub u8);

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit with code {}", self.0)
    }
}

impl core::error::Error for Exit {}

impl environment::Host for Ctx {
    fn get_environment(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.env.clone())
    }

    fn get_arguments(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.args.clone())
    }

    fn initial_cwd(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(None)
    }
}

impl exit::Host for Ctx {
    fn exit(&mut self, status: Result<(), ()>) -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(Exit(if status.is_ok() { 0 } else { 1 })))
    }

    fn exit_with_code(&mut self, code: u8) -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(Exit(code)))
    }
}

impl stdin::Host for Ctx {
    fn get_stdin(&mut self) -> wasmtime::Result<Resource<InputStream>> {
        Ok(self.table.push(InputStream::Stdin)?)
    }
}

impl stdout::Host for Ctx {
    fn get_stdout(&mut self) -> wasmtime::Result<Resource<OutputStream>> {
        Ok(self.table.push(OutputStream::Stdout)?)
    }
}

impl stderr::Host for Ctx {
    fn get_stderr(&mut self) -> wasmtime::Result<Resource<OutputStream>> {
        Ok(self.table.push(OutputStream::Stderr)?)
    }
}

impl terminal_input::Host for Ctx {}

impl terminal_input::HostTerminalInput for Ctx {
    fn drop(&mut self, _t: Resource<Never>) -> wasmtime::Result<()> {
        Err(super::unreachable_resource())
    }
}

impl terminal_output::Host for Ctx {}

impl terminal_output::HostTerminalOutput for Ctx {
    fn drop(&mut self, _t: Resource<Never>) -> wasmtime::Result<()> {
        Err(super::unreachable_resource())
    }
}

impl terminal_stdin::Host for Ctx {
    fn get_terminal_stdin(&mut self) -> wasmtime::Result<Option<Resource<Never>>> {
        Ok(None)
    }
}

impl terminal_stdout::Host for Ctx {
    fn get_terminal_stdout(&mut self) -> wasmtime::Result<Option<Resource<Never>>> {
        Ok(None)
    }
}

impl terminal_stderr::Host for Ctx {
    fn get_terminal_stderr(&mut self) -> wasmtime::Result<Option<Resource<Never>>> {
        Ok(None)
    }
}
