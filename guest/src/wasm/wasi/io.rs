//! `wasi:io`: streams over the tenant's stdio and an HTTP exchange's bodies (served by
//! `wasm::http`), pollables over the clock, errors.
//!
//! Output is buffered in the guest and sent with one hypercall per flush: when a write
//! contains a newline (interactive output shows up line by line), when the buffer reaches
//! 64 KiB, on an explicit flush, before stdin is read, and at exit. A stdin read blocks in
//! the VMM until input arrives, so stdin's pollable is always ready.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use wasmtime::component::Resource;
use wasmvisor_abi::hypercall::{BUFFER_MAX, Hypercall, HypercallError, StdStream};

use super::Ctx;
use super::wasi::io::{error, poll, streams};
use crate::hypercall;

/// `wasi:io/streams.input-stream`.
pub enum InputStream {
    /// The tenant's stdin.
    Stdin,
    /// The body of the HTTP request being served.
    RequestBody,
    /// A file, read ahead in large chunks.
    File(super::filesystem::FileReader),
    /// Bytes held whole (an outgoing request's response body).
    Bytes {
        /// The bytes.
        data: Vec<u8>,
        /// How many were read.
        pos: usize,
    },
}

/// `wasi:io/streams.output-stream`.
pub enum OutputStream {
    /// The tenant's stdout.
    Stdout,
    /// The tenant's stderr.
    Stderr,
    /// The body of an `outgoing-body` (its handle's representation).
    Body(u32),
    /// A file: its gathered writes, by id (`FsState`).
    File(u32),
}

/// `wasi:io/poll.pollable`.
pub enum Pollable {
    /// Always ready (streams: writes never block for long, reads block in the VMM).
    Ready,
    /// Ready at this monotonic-clock instant (ns).
    Until(u64),
}

/// `wasi:io/error.error`: its text, and the filesystem error it stands for, if any.
pub struct IoError(pub String, pub Option<wasmvisor_abi::fs::FsError>);

/// One of the tenant's output streams, buffered in the guest.
pub struct StdOutput {
    stream: StdStream,
    buf: Vec<u8>,
    failed: bool,
}

impl StdOutput {
    /// An empty buffer for `stream`.
    pub fn new(stream: StdStream) -> Self {
        Self { stream, buf: Vec::new(), failed: false }
    }

    /// Buffers `bytes`, flushing on a newline or a full buffer.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), HypercallError> {
        if self.failed {
            return Err(HypercallError::Io);
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BUFFER_MAX as usize || bytes.contains(&b'\n') {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is buffered, one hypercall per 64 KiB.
    pub fn flush(&mut self) -> Result<(), HypercallError> {
        let result = self.buf.chunks(BUFFER_MAX as usize).try_for_each(|chunk| {
            let call = Hypercall::StdWrite { stream: self.stream, gpa: chunk.as_ptr() as u64, len: chunk.len() as u64 };
            hypercall::call(call).map(drop)
        });
        self.buf.clear();
        if result.is_err() {
            self.failed = true;
        }
        result
    }
}

fn stream_failed(ctx: &mut Ctx, what: &str) -> wasmtime::Result<streams::StreamError> {
    let err = ctx.table.push(IoError(what.to_string(), None))?;
    Ok(streams::StreamError::LastOperationFailed(err))
}

impl Ctx {
    fn output(&mut self, stream: &Resource<OutputStream>) -> wasmtime::Result<Result<&mut StdOutput, OutputStream>> {
        Ok(match self.table.get(stream)? {
            OutputStream::Stdout => Ok(&mut self.stdout),
            OutputStream::Stderr => Ok(&mut self.stderr),
            OutputStream::Body(rep) => Err(OutputStream::Body(*rep)),
            OutputStream::File(id) => Err(OutputStream::File(*id)),
        })
    }

    /// Flushes both output streams (before blocking on input, and at exit).
    pub fn flush_outputs(&mut self) {
        let _ = self.stdout.flush();
        let _ = self.stderr.flush();
        self.flush_file_writers();
        if let Some(exchange) = &self.http {
            exchange.push_deferred();
        }
    }

    fn read_stdin(&mut self, len: u64) -> wasmtime::Result<Result<Vec<u8>, streams::StreamError>> {
        self.flush_outputs();
        let len = len.min(BUFFER_MAX);
        if len == 0 {
            return Ok(Ok(Vec::new()));
        }
        let mut buf = vec![0u8; len as usize];
        match hypercall::call(Hypercall::StdRead { gpa: buf.as_mut_ptr() as u64, len }) {
            Ok(0) => Ok(Err(streams::StreamError::Closed)),
            Ok(n) => {
                buf.truncate(n as usize);
                Ok(Ok(buf))
            }
            Err(_) => Ok(Err(stream_failed(self, "reading stdin failed on the host")?)),
        }
    }

    fn write_output(
        &mut self,
        stream: &Resource<OutputStream>,
        bytes: &[u8],
        flush: bool,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        let out = match self.output(stream)? {
            Ok(out) => out,
            Err(OutputStream::File(id)) => {
                return match self.write_file_stream(id, bytes) {
                    Ok(()) => Ok(Ok(())),
                    Err(e) => {
                        let err = self.table.push(super::filesystem::io_error(e))?;
                        Ok(Err(streams::StreamError::LastOperationFailed(err)))
                    }
                };
            }
            Err(OutputStream::Body(body)) => return self.write_outgoing_body(body, bytes, flush),
            Err(_) => unreachable!("output() returns stdio as Ok"),
        };
        let mut result = out.write(bytes);
        if flush && result.is_ok() {
            result = out.flush();
        }
        match result {
            Ok(()) => Ok(Ok(())),
            Err(_) => Ok(Err(stream_failed(self, "the host stream is closed")?)),
        }
    }

    /// Whether `p` is ready now.
    fn is_ready(&self, p: &Pollable) -> bool {
        match p {
            Pollable::Ready => true,
            Pollable::Until(t) => self.clock.monotonic_ns() >= *t,
        }
    }
}

/// Stdin and stdout accept this much per write (WASI's `check-write` permit).
const WRITE_PERMIT: u64 = BUFFER_MAX;

impl error::Host for Ctx {}

impl error::HostError for Ctx {
    fn to_debug_string(&mut self, err: Resource<IoError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&err)?.0.clone())
    }

    fn drop(&mut self, err: Resource<IoError>) -> wasmtime::Result<()> {
        self.table.delete(err)?;
        Ok(())
    }
}

impl poll::Host for Ctx {
    fn poll(&mut self, pollables: Vec<Resource<Pollable>>) -> wasmtime::Result<Vec<u32>> {
        if pollables.is_empty() {
            wasmtime::bail!("wasi:io/poll.poll called with an empty list");
        }
        loop {
            let mut ready = Vec::new();
            let mut earliest = u64::MAX;
            for (i, p) in pollables.iter().enumerate() {
                let p = self.table.get(p)?;
                if self.is_ready(p) {
                    ready.push(i as u32);
                } else if let Pollable::Until(t) = p {
                    earliest = earliest.min(*t);
                }
            }
            if !ready.is_empty() {
                return Ok(ready);
            }
            self.flush_outputs();
            self.clock.sleep_until(earliest);
        }
    }
}

impl poll::HostPollable for Ctx {
    fn ready(&mut self, p: Resource<Pollable>) -> wasmtime::Result<bool> {
        let p = self.table.get(&p)?;
        Ok(self.is_ready(p))
    }

    fn block(&mut self, p: Resource<Pollable>) -> wasmtime::Result<()> {
        if let Pollable::Until(t) = *self.table.get(&p)? {
            self.flush_outputs();
            self.clock.sleep_until(t);
        }
        Ok(())
    }

    fn drop(&mut self, p: Resource<Pollable>) -> wasmtime::Result<()> {
        self.table.delete(p)?;
        Ok(())
    }
}

impl streams::Host for Ctx {}

impl streams::HostInputStream for Ctx {
    fn read(&mut self, s: Resource<InputStream>, len: u64) -> wasmtime::Result<Result<Vec<u8>, streams::StreamError>> {
        if let InputStream::File(reader) = self.table.get_mut(&s)? {
            // Taken out for the round trip (the table and the connection are both `self`'s).
            let mut r = core::mem::replace(reader, super::filesystem::FileReader::placeholder());
            let got = self.read_file_stream(&mut r, len);
            if let InputStream::File(slot) = self.table.get_mut(&s)? {
                *slot = r;
            }
            return match got {
                Ok(bytes) if bytes.is_empty() && len > 0 => Ok(Err(streams::StreamError::Closed)),
                Ok(bytes) => Ok(Ok(bytes)),
                Err(e) => {
                    let err = self.table.push(super::filesystem::io_error(e))?;
                    Ok(Err(streams::StreamError::LastOperationFailed(err)))
                }
            };
        }
        match self.table.get_mut(&s)? {
            InputStream::File(_) => unreachable!("handled above"),
            InputStream::Stdin => self.read_stdin(len),
            InputStream::RequestBody => self.read_request_body(len),
            InputStream::Bytes { data, pos } => {
                if *pos >= data.len() {
                    return Ok(Err(streams::StreamError::Closed));
                }
                let end = data.len().min(*pos + len.min(BUFFER_MAX) as usize);
                let bytes = data[*pos..end].to_vec();
                *pos = end;
                Ok(Ok(bytes))
            }
        }
    }

    fn blocking_read(
        &mut self,
        s: Resource<InputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<Vec<u8>, streams::StreamError>> {
        streams::HostInputStream::read(self, s, len)
    }

    fn skip(&mut self, s: Resource<InputStream>, len: u64) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        Ok(streams::HostInputStream::read(self, s, len)?.map(|bytes| bytes.len() as u64))
    }

    fn blocking_skip(
        &mut self,
        s: Resource<InputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        self.skip(s, len)
    }

    fn subscribe(&mut self, _s: Resource<InputStream>) -> wasmtime::Result<Resource<Pollable>> {
        Ok(self.table.push(Pollable::Ready)?)
    }

    fn drop(&mut self, s: Resource<InputStream>) -> wasmtime::Result<()> {
        self.table.delete(s)?;
        Ok(())
    }
}

impl streams::HostOutputStream for Ctx {
    fn check_write(&mut self, s: Resource<OutputStream>) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        // Every stream takes a full permit: stdio flushes per buffer, bodies queue frames.
        let _ = self.output(&s)?;
        Ok(Ok(WRITE_PERMIT))
    }

    fn write(
        &mut self,
        s: Resource<OutputStream>,
        contents: Vec<u8>,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        if contents.len() as u64 > WRITE_PERMIT {
            wasmtime::bail!("wasi:io/streams write of {} bytes exceeds the check-write permit", contents.len());
        }
        self.write_output(&s, &contents, false)
    }

    fn blocking_write_and_flush(
        &mut self,
        s: Resource<OutputStream>,
        contents: Vec<u8>,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        if contents.len() > 4096 {
            wasmtime::bail!("wasi:io/streams blocking-write-and-flush of {} bytes exceeds 4096", contents.len());
        }
        self.write_output(&s, &contents, true)
    }

    fn flush(&mut self, s: Resource<OutputStream>) -> wasmtime::Result<Result<(), streams::StreamError>> {
        self.write_output(&s, &[], true)
    }

    fn blocking_flush(&mut self, s: Resource<OutputStream>) -> wasmtime::Result<Result<(), streams::StreamError>> {
        self.flush(s)
    }

    fn subscribe(&mut self, _s: Resource<OutputStream>) -> wasmtime::Result<Resource<Pollable>> {
        Ok(self.table.push(Pollable::Ready)?)
    }

    fn write_zeroes(
        &mut self,
        s: Resource<OutputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        if len > WRITE_PERMIT {
            wasmtime::bail!("wasi:io/streams write-zeroes of {len} bytes exceeds the check-write permit");
        }
        self.write_output(&s, &vec![0; len as usize], false)
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        s: Resource<OutputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        if len > 4096 {
            wasmtime::bail!("wasi:io/streams blocking-write-zeroes-and-flush of {len} bytes exceeds 4096");
        }
        self.write_output(&s, &vec![0; len as usize], true)
    }

    fn splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        let bytes = match streams::HostInputStream::read(self, src, len.min(WRITE_PERMIT))? {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        Ok(self.write_output(&dst, &bytes, false)?.map(|()| bytes.len() as u64))
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        self.splice(dst, src, len)
    }

    fn drop(&mut self, s: Resource<OutputStream>) -> wasmtime::Result<()> {
        if let OutputStream::File(id) = self.table.delete(s)? {
            self.drop_file_stream(id);
        }
        Ok(())
    }
}
