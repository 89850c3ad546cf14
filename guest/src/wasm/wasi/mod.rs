//! WASI 0.2 for components, inside the guest: bindings generated from the WASI WIT
//! (`guest/wit`) by wasmtime's component `bindgen!`, and the context they run against.
//!
//! cli, io, clocks, random and filesystem (the tenant's preopened directories, served by
//! the host) are implemented; sockets (every call denied) are present so that components
//! built by stock toolchains link, and fail the way WASI says when they try. The tenant's stdio goes to the VMM by
//! hypercall, one exit per buffer.

mod cli;
mod clocks;
mod filesystem;
mod io;
mod random;
mod sockets;

use alloc::string::String;
use alloc::vec::Vec;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};

pub use self::cli::Exit;
pub use self::clocks::Clock;
pub use self::filesystem::{Descriptor, DirEntries, FsState};
pub use self::io::{InputStream, IoError, OutputStream, Pollable, StdOutput};
pub use self::random::Rng;

wasmtime::component::bindgen!({
    path: "wit",
    world: "wasi:cli/command",
    imports: { default: trappable },
    with: {
        "wasi:io/error.error": IoError,
        "wasi:io/poll.pollable": Pollable,
        "wasi:io/streams.input-stream": InputStream,
        "wasi:io/streams.output-stream": OutputStream,
        "wasi:cli/terminal-input.terminal-input": Never,
        "wasi:cli/terminal-output.terminal-output": Never,
        "wasi:filesystem/types.descriptor": Descriptor,
        "wasi:filesystem/types.directory-entry-stream": DirEntries,
        "wasi:sockets/network.network": Network,
        "wasi:sockets/tcp.tcp-socket": Never,
        "wasi:sockets/udp.udp-socket": Never,
        "wasi:sockets/udp.incoming-datagram-stream": Never,
        "wasi:sockets/udp.outgoing-datagram-stream": Never,
        "wasi:sockets/ip-name-lookup.resolve-address-stream": Never,
    },
});

/// A resource type of which the guest never creates an instance (no file is ever opened, no
/// socket created, no terminal present): the component cannot hold a handle to one, so its
/// methods are unreachable.
pub enum Never {}

/// The `network` resource: one per request of `instance-network`; every use is denied.
pub struct Network;

/// The error a method of a [`Never`] resource returns should it ever run: a trap.
pub(super) fn unreachable_resource() -> wasmtime::Error {
    wasmtime::format_err!("wasmvisor: a handle to a resource the guest never creates was used")
}

/// Everything WASI needs for one component instance.
pub struct Ctx {
    /// Resources handed to the component.
    pub table: ResourceTable,
    /// argv, argv[0] first.
    pub args: Vec<String>,
    /// The environment.
    pub env: Vec<(String, String)>,
    /// The tenant's stdout, buffered.
    pub stdout: StdOutput,
    /// The tenant's stderr, buffered.
    pub stderr: StdOutput,
    /// Monotonic and wall clocks from the TSC.
    pub clock: Clock,
    /// The CSPRNG behind `wasi:random`.
    pub rng: Rng,
    /// The seed `insecure-seed` returns (fixed per instance, as WASI asks).
    pub insecure_seed: (u64, u64),
    /// Linear-memory bytes the component may still grow by, and what it was refused.
    pub limits: Limits,
    /// The capability broker, reached over vsock on first use.
    pub caps: super::caps::BrokerConn,
    /// The HTTP exchange this instance serves (an HTTP VM's).
    pub http: Option<super::http::Exchange>,
    /// Outgoing request bodies finished and not yet sent, by their handle.
    pub finished_bodies: alloc::collections::BTreeMap<u32, Vec<u8>>,
    /// Preopens, open files' gathered writes, what this instance opened.
    pub fs: FsState,
}

/// Memory accounting for the component's linear memories and tables.
pub struct Limits {
    /// Bytes of guest RAM.
    pub ram: u64,
    /// The largest growth that was refused, for the out-of-memory report.
    pub refused: Option<usize>,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // The heap is guest RAM; a growth that cannot fit in it is refused up front. Growths
        // that fit the RAM but not the free heap fail in the allocator instead and come back
        // through `memory_grow_failed`.
        if desired as u64 > self.ram {
            self.refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refused = Some(self.refused.unwrap_or(0).max(1));
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok((desired as u64).saturating_mul(16) <= self.ram)
    }
}

/// Adds to `linker` the WASI 0.2 interfaces that `component` imports (and only those:
/// defining the ~150 functions of all of WASI costs a few hundred microseconds per boot, and
/// a stock Rust component imports 13 interfaces). The host has already refused components
/// that import anything the guest does not implement.
pub fn add_to_linker(linker: &mut Linker<Ctx>, component: &Component) -> wasmtime::Result<()> {
    let engine = linker.engine().clone();
    let imports: Vec<String> =
        component.component_type().imports(&engine).map(|(name, _)| String::from(name)).collect();
    let wants = |iface: &str| imports.iter().any(|i| i.split('@').next() == Some(iface));
    macro_rules! link {
        ($($name:literal => $($module:ident)::+),* $(,)?) => {
            $(
                if wants($name) {
                    wasi::$($module)::+::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, |ctx| ctx)?;
                }
            )*
        };
    }
    link! {
        "wasi:cli/environment" => cli::environment,
        "wasi:cli/exit" => cli::exit,
        "wasi:cli/stdin" => cli::stdin,
        "wasi:cli/stdout" => cli::stdout,
        "wasi:cli/stderr" => cli::stderr,
        "wasi:cli/terminal-input" => cli::terminal_input,
        "wasi:cli/terminal-output" => cli::terminal_output,
        "wasi:cli/terminal-stdin" => cli::terminal_stdin,
        "wasi:cli/terminal-stdout" => cli::terminal_stdout,
        "wasi:cli/terminal-stderr" => cli::terminal_stderr,
        "wasi:io/error" => io::error,
        "wasi:io/poll" => io::poll,
        "wasi:io/streams" => io::streams,
        "wasi:clocks/monotonic-clock" => clocks::monotonic_clock,
        "wasi:clocks/wall-clock" => clocks::wall_clock,
        "wasi:random/random" => random::random,
        "wasi:random/insecure" => random::insecure,
        "wasi:random/insecure-seed" => random::insecure_seed,
        "wasi:filesystem/types" => filesystem::types,
        "wasi:filesystem/preopens" => filesystem::preopens,
        "wasi:sockets/instance-network" => sockets::instance_network,
        "wasi:sockets/ip-name-lookup" => sockets::ip_name_lookup,
        "wasi:sockets/tcp" => sockets::tcp,
        "wasi:sockets/tcp-create-socket" => sockets::tcp_create_socket,
        "wasi:sockets/udp" => sockets::udp,
        "wasi:sockets/udp-create-socket" => sockets::udp_create_socket,
    }
    super::caps::add_to_linker(linker, wants)?;
    super::http::add_to_linker(linker, &wants)?;
    if wants("wasi:sockets/network") {
        wasi::sockets::network::add_to_linker::<Ctx, HasSelf<Ctx>>(linker, &LinkOptions::default().into(), |ctx| ctx)?;
    }
    Ok(())
}
