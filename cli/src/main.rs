//! The `wasmvisor` command line: `run`, `boot` and `cpu` work alone; `serve` is the daemon,
//! and `launch`, `ps`, `logs`, `rm` and `components` are its clients ([`client`]).

mod client;

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use wasmvisor::guest_cpu::{self, GuestCpu};
use wasmvisor::hypercall::GuestIo;
use wasmvisor::launch::{self, Component, Event, LaunchError};
use wasmvisor::snapshot::RamRestore;
use wasmvisor::vm::{self, Capabilities, EXIT_SETUP_FAILED, RunReport, VmConfig, VmError, VsockConfig};
use wasmvisor::wasm::{aot, inspect};
use wasmvisor_providers::{Capability, Preopen, TenantName, TenantSpec, default_data_dir, parse_config_pair};

#[derive(Parser)]
#[command(name = "wasmvisor", version, about = "A KVM micro-VM hypervisor for WebAssembly components")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a WASI 0.2 component (wasm32-wasip2) in its own micro-VM.
    ///
    /// stdin, stdout and stderr are the component's; the exit status is its exit code, or 124
    /// if it timed out, 125 if wasmvisor could not start it, 126 if the guest crashed, 134 if
    /// the component trapped.
    Run(RunArgs),
    /// Compile components for this host's guest ahead of time, into the artifact cache `run`
    /// and `serve` use, as `wasmtime compile` does (without an output file).
    ///
    /// Prints one line per component: the artifact, and whether it was compiled or found. Exit
    /// code 125 if one could not be compiled (the others still are).
    Compile(CompileArgs),
    /// Boot the guest unikernel, show its console, exit with its exit code.
    ///
    /// Exit codes: the guest's own (0-255), or 124 if it timed out, 125 if wasmvisor could not
    /// start it, 126 if it crashed (CPU exception, triple fault, invalid request).
    Boot(BootArgs),
    /// Show the CPU features the guest detects on this host (what components are compiled
    /// for), leaf by leaf against the host process's own CPUID.
    Cpu(CpuArgs),
    /// Run the daemon: launch and manage tenants through an API on a Unix socket, and serve
    /// HTTP tenants through the front door (`wasmvisor serve app.wasm` serves one component).
    Serve(ServeArgs),
    /// Upload a component to the daemon and start it as a tenant; prints the tenant's name.
    Launch(LaunchArgs),
    /// List the daemon's tenants and their state.
    Ps(ApiArgs),
    /// Show a tenant's log (stdout, stderr and log records, tagged).
    Logs(LogsArgs),
    /// Remove tenants (stops their VMs).
    Rm(RmArgs),
    /// List the components the daemon holds.
    Components(ApiArgs),
    /// Internal: run one VM for a supervisor, configured over the socket on fd 3.
    #[command(name = "__vmm", hide = true)]
    Vmm,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where the daemon keeps its state, components and tenants' data [default: as for `run`].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The API's Unix socket [default: $XDG_RUNTIME_DIR/wasmvisor/api.sock, else DATA/api.sock].
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Also serve the API on this TCP address (requires --api-token-file).
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<std::net::SocketAddr>,
    /// A file holding the bearer token TCP clients must send.
    #[arg(long, value_name = "PATH")]
    api_token_file: Option<PathBuf>,
    /// The compiled-artifact cache [default: the one `run` uses].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Guest image (x86-64 ELF); default: the built wasmvisor guest.
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// Largest component upload, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MiB")]
    max_component_mib: usize,
    /// Rotate a tenant's log once it reaches this size (it keeps one rotated file).
    #[arg(long, default_value_t = 8, value_name = "MiB")]
    log_limit_mib: u64,
    /// Run VMM children unjailed: no cgroup, namespaces, root or uid of their own (seccomp
    /// still applies). Without it the daemon refuses to start where it cannot jail them.
    #[arg(long)]
    insecure_no_jail: bool,
    /// The directory under which tenants' `dirs` may be (each spec names paths relative to
    /// it). Without it, a spec with `dirs` is refused.
    #[arg(long, value_name = "DIR")]
    dirs_root: Option<PathBuf>,
    /// The first uid (and gid) of jailed VMM children: each tenant's VMs run as one of their own.
    #[arg(long, default_value_t = 200_000, value_name = "UID", value_parser = clap::value_parser!(u32).range(1000..))]
    jail_uid_base: u32,
    /// Idle VMM child processes kept started, so that a launch does not wait for a process
    /// start (0: start one per launch).
    #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    pool_size: u16,
    /// Whether pooled VMM children also pre-boot a VM (of the default memory size), so that a
    /// launch that fits it skips the VM's creation and the guest's boot (each holds its guest's
    /// touched RAM, ~7 MiB, while it waits).
    #[arg(long, default_value_t = true, value_name = "BOOL", action = clap::ArgAction::Set)]
    pool_pre_boot: bool,
    /// Whether a launch starts from the snapshot of its component's ready state (engine
    /// built, component loaded and linked), made in the background after the component's
    /// first launch in that shape (memory size, HTTP or command). Off by default: on this kind
    /// of host the pool's pre-booted VMs started hello faster (README, "Cold starts").
    #[arg(long, default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    snapshots: bool,
    /// The front door's address, where HTTP tenants are reached (`none`: no front door).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR", value_parser = parse_listen)]
    http_listen: Listen,
    /// Largest request head (request line and headers) the front door reads, in KiB.
    #[arg(long, default_value_t = 64, value_name = "KiB", value_parser = clap::value_parser!(u32).range(8..=1024))]
    http_max_header_kib: u32,
    /// Largest request body the front door delivers, in MiB.
    #[arg(long, default_value_t = 16, value_name = "MiB", value_parser = clap::value_parser!(u64).range(1..=4096))]
    http_max_body_mib: u64,
    /// Longest a client may take to send a request head, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_header_timeout_s: u64,
    /// Most front-door connections open at once.
    #[arg(long, default_value_t = 4096, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    http_max_connections: u32,
    /// Log debug detail.
    #[arg(short, long)]
    verbose: bool,
    /// An HTTP component (`wasi:http/incoming-handler`) to serve as tenant `default` on every
    /// host, as `wasmtime serve app.wasm` does.
    #[arg(value_name = "COMPONENT")]
    component: Option<PathBuf>,
}

/// A listen address, or none.
#[derive(Clone, Copy, Debug)]
struct Listen(Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "none" {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|e| format!("{e} (an address such as 127.0.0.1:8080, or none)"))
}

/// How to reach the daemon.
#[derive(clap::Args)]
struct ApiArgs {
    /// The daemon's API socket [default: $XDG_RUNTIME_DIR/wasmvisor/api.sock, else DATA/api.sock].
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// The daemon's data directory (for the default socket path).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LaunchArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The tenant's name [default: the file's stem and a random suffix].
    #[arg(long, value_name = "NAME")]
    name: Option<TenantName>,
    /// Grant a capability (repeatable): logging, config or keyvalue.
    #[arg(long = "grant", value_name = "CAPABILITY")]
    grants: Vec<Capability>,
    /// A value the component reads through wasi:config (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config_pair)]
    config: Vec<(String, String)>,
    /// Environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_config_pair)]
    env: Vec<(String, String)>,
    /// Guest RAM in MiB [default: the daemon's, 128].
    #[arg(long, value_name = "MiB")]
    memory: Option<u64>,
    /// Stop a run after this many seconds [default: the daemon's, 30].
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// What follows the end of a run: never, on-failure or always.
    #[arg(long, default_value = "never", value_name = "POLICY")]
    restart: String,
    /// The component (.wasm).
    #[arg(value_name = "COMPONENT")]
    component: PathBuf,
    /// Arguments for the component.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(clap::Args)]
struct LogsArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Keep streaming new lines until the tenant settles.
    #[arg(short, long)]
    follow: bool,
    /// The tenant.
    #[arg(value_name = "NAME")]
    name: TenantName,
}

#[derive(clap::Args)]
struct RmArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Also delete the tenants' data (key-value store, log).
    #[arg(long)]
    purge: bool,
    /// The tenants.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<TenantName>,
}

#[derive(clap::Args)]
struct CompileArgs {
    /// Guest image (x86-64 ELF); default: the built wasmvisor guest.
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// The components (.wasm) to compile: commands or HTTP handlers.
    #[arg(value_name = "COMPONENT", required = true)]
    components: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct CpuArgs {
    /// Ask the guest again instead of using the cached report (forgets refused settings).
    #[arg(long)]
    refresh: bool,
    /// Guest image (x86-64 ELF); default: the built wasmvisor guest.
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
}

#[derive(clap::Args)]
struct VmArgs {
    /// Guest RAM in MiB (a multiple of 2, at most 3072).
    #[arg(long, value_name = "MiB")]
    memory: Option<u64>,
    /// Stop the guest after this many seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: f64,
    /// Environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Log what the VMM does (phases, exits, KVM flavor) and the guest's console to stderr.
    #[arg(short, long)]
    verbose: bool,
}

/// Who the guest runs for and what it may reach over vsock.
#[derive(clap::Args)]
struct TenantArgs {
    /// Grant a capability (repeatable): logging, config, keyvalue, http-outgoing or filesystem
    /// (which `--dir` implies). Nothing is granted by
    /// default; a component importing an ungranted capability is refused before boot.
    #[arg(long = "grant", value_name = "CAPABILITY")]
    grants: Vec<Capability>,
    /// A value the component reads through wasi:config (repeatable; needs `--grant config`).
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config_pair)]
    config: Vec<(String, String)>,
    /// The tenant whose key-value buckets and log the guest uses.
    #[arg(long, default_value = "default", value_name = "NAME")]
    tenant: TenantName,
    /// Where tenants' data lives [default: $WASMVISOR_DATA_DIR, else $XDG_DATA_HOME/wasmvisor,
    /// else ~/.local/share/wasmvisor].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Unix socket for host-initiated vsock connections (`CONNECT <port>\n`, answered with
    /// `OK <port>\n`); guest connections to host ports other than the capability broker's go
    /// to `<PATH>_<port>`.
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// A host directory the component sees through wasi:filesystem, read-write (repeatable):
    /// `HOST[::GUEST]`, as `wasmtime run --dir`; GUEST defaults to HOST. Nothing outside it is
    /// reachable, whatever path or symbolic link the component uses.
    #[arg(long = "dir", value_name = "HOST[::GUEST]", value_parser = parse_dir_rw)]
    dirs: Vec<Preopen>,
    /// As `--dir`, read-only: every change is refused (`not-permitted`).
    #[arg(long = "dir-ro", value_name = "HOST[::GUEST]", value_parser = parse_dir_ro)]
    dirs_ro: Vec<Preopen>,
}

/// `HOST[::GUEST]` as a preopen; the host directory must exist.
fn parse_dir(s: &str, readonly: bool) -> Result<Preopen, String> {
    let (host, guest) = match s.split_once("::") {
        Some((h, g)) => (h, g),
        None => (s, s),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(format!("{s:?}: expected HOST[::GUEST] with neither part empty"));
    }
    let meta = std::fs::metadata(host).map_err(|e| format!("{host}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("{host}: not a directory"));
    }
    Ok(Preopen { host: PathBuf::from(host), guest: guest.to_string(), readonly })
}

fn parse_dir_rw(s: &str) -> Result<Preopen, String> {
    parse_dir(s, false)
}

fn parse_dir_ro(s: &str) -> Result<Preopen, String> {
    parse_dir(s, true)
}

impl TenantArgs {
    fn granted(&self) -> BTreeSet<Capability> {
        self.grants.iter().copied().collect()
    }

    /// The vsock device for a guest that uses `used` capabilities: none if it uses none and no
    /// socket was asked for (a VM without capabilities pays nothing for them).
    fn vsock(self, used: &BTreeSet<Capability>) -> Result<Option<VsockConfig>, String> {
        let dirs: Vec<Preopen> = self.dirs.into_iter().chain(self.dirs_ro).collect();
        if used.is_empty() && self.vsock_socket.is_none() && dirs.is_empty() {
            return Ok(None);
        }
        let mut config = BTreeMap::new();
        for (k, v) in self.config {
            if config.insert(k.clone(), v).is_some() {
                return Err(format!("--config {k} is given more than once"));
            }
        }
        let data_dir = match self.data_dir {
            Some(d) => d,
            None => default_data_dir().map_err(|e| e.to_string())?,
        };
        let mut grants: BTreeSet<Capability> = self.grants.into_iter().collect();
        // `--dir` grants what it names, as under wasmtime.
        if !dirs.is_empty() {
            grants.insert(Capability::Filesystem);
        }
        // A user at a terminal sees what the component logs; the tenant log keeps it too.
        let tenant = TenantSpec {
            name: self.tenant,
            grants,
            config,
            data_dir,
            echo_log: true,
            http_allow: Vec::new(),
            kv_quota: None,
            dirs,
        };
        Ok(Some(VsockConfig {
            capabilities: Capabilities::InProcess(tenant),
            uds_path: self.vsock_socket,
            relay_preopens: false,
        }))
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    tenant: TenantArgs,
    /// Start from the snapshot of the component's ready state (engine built, component loaded
    /// and linked) in the cache, or make it on this run if there is none. Off by default: on
    /// this kind of host a restored run was not faster (README, "Cold starts").
    #[arg(long)]
    snapshot: bool,
    /// How a run started from a snapshot gets its RAM: `copied` into its own huge pages, or
    /// `shared`, mapped copy-on-write from the snapshot file so that runs of a component share
    /// its clean pages (a fault per 4 KiB page the guest touches).
    #[arg(long, value_enum, default_value = "copied", value_name = "HOW", requires = "snapshot")]
    snapshot_ram: SnapshotRam,
    /// The component (.wasm) to run.
    #[arg(value_name = "COMPONENT")]
    component: PathBuf,
    /// Arguments for the component (its argv[0] is COMPONENT's file name).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<String>,
}

/// `run --snapshot-ram`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SnapshotRam {
    Copied,
    Shared,
}

#[derive(clap::Args)]
struct BootArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    tenant: TenantArgs,
    /// Guest image (x86-64 ELF); default: the built wasmvisor guest.
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// Arguments for the guest.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn main() -> ExitCode {
    // The VMM child mode is on every daemon launch's path: straight there, no argument parsing.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(wasmvisor::child::CHILD_SUBCOMMAND)) {
        return ExitCode::from(wasmvisor::child::serve());
    }
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Command::Run(a) => a.vm.verbose,
        Command::Boot(a) => a.vm.verbose,
        Command::Serve(a) => a.verbose,
        _ => false,
    };
    // The daemon always logs (info); -v adds debug detail.
    let serving = matches!(cli.command, Command::Serve(_));
    if verbose || serving {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(if verbose { tracing::Level::DEBUG } else { tracing::Level::INFO })
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.command {
        Command::Run(args) => run(args),
        Command::Boot(args) => boot(args),
        Command::Cpu(args) => cpu(args),
        Command::Compile(args) => compile(args),
        Command::Vmm => ExitCode::from(wasmvisor::child::serve()),
        Command::Serve(args) => serve(args),
        Command::Launch(mut args) => {
            let api = std::mem::replace(&mut args.api, ApiArgs { api_socket: None, data_dir: None });
            client_command(&api, |c| launch(c, args))
        }
        Command::Ps(args) => client_command(&args, ps),
        Command::Logs(args) => client_command(&args.api, |c| {
            let follow = if args.follow { "?follow=true" } else { "" };
            c.print(&format!("/v1/tenants/{}/logs{follow}", args.name))
        }),
        Command::Rm(args) => client_command(&args.api, |c| {
            let purge = if args.purge { "?purge=true" } else { "" };
            for name in &args.names {
                c.call(hyper::Method::DELETE, &format!("/v1/tenants/{name}{purge}"), None)?;
                println!("{name}");
            }
            Ok(())
        }),
        Command::Components(args) => client_command(&args, components),
    }
}

fn data_dir_or_default(dir: Option<PathBuf>) -> Result<PathBuf, String> {
    match dir {
        Some(d) => Ok(d),
        None => default_data_dir().map_err(|e| e.to_string()),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("wasmvisor: error: {e}");
        ExitCode::from(EXIT_SETUP_FAILED)
    };
    let data_dir = match data_dir_or_default(args.data_dir) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find the wasmvisor binary for the VMM children: {e}")),
    };
    let options = wasmvisor_daemon::Options {
        api_socket: args.api_socket.unwrap_or_else(|| wasmvisor_daemon::default_api_socket(&data_dir)),
        data_dir,
        api_listen: args.api_listen,
        api_token_file: args.api_token_file,
        exe,
        guest: args.guest.unwrap_or_else(|| VmConfig::default().guest),
        cache_dir: args.cache_dir.unwrap_or_else(aot::default_cache_dir),
        max_component_bytes: args.max_component_mib.saturating_mul(1 << 20),
        log_limit: args.log_limit_mib.saturating_mul(1 << 20),
        pool_size: usize::from(args.pool_size),
        pool_pre_boot: args.pool_pre_boot,
        snapshots: args.snapshots,
        jail_uid_base: (!args.insecure_no_jail).then_some(args.jail_uid_base),
        dirs_root: args.dirs_root,
        http_listen: args.http_listen.0,
        http_limits: wasmvisor_daemon::frontdoor::Limits {
            max_header_bytes: args.http_max_header_kib as usize * 1024,
            max_body_bytes: args.http_max_body_mib << 20,
            header_read_timeout: std::time::Duration::from_secs(args.http_header_timeout_s),
            max_connections: args.http_max_connections as usize,
        },
        serve_component: args.component,
    };
    match wasmvisor_daemon::serve(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Runs a client command against the daemon; its errors print as `wasmvisor: error: ...`
/// and exit 1.
fn client_command(api: &ApiArgs, f: impl FnOnce(&client::Client) -> Result<(), client::ClientError>) -> ExitCode {
    let socket = match &api.api_socket {
        Some(s) => s.clone(),
        None => match data_dir_or_default(api.data_dir.clone()) {
            Ok(d) => wasmvisor_daemon::default_api_socket(&d),
            Err(e) => {
                eprintln!("wasmvisor: error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let result = client::Client::new(&socket).and_then(|c| f(&c));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A default tenant name: the file's stem (reduced to the allowed characters) and a random
/// suffix.
fn default_name(component: &std::path::Path) -> String {
    let stem = component.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut base: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
        .take(48)
        .collect();
    base = base.trim_start_matches(['.', '-']).to_owned();
    if base.is_empty() {
        base = "tenant".into();
    }
    let mut seed = [0u8; 4];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed)).is_err() {
        seed = std::process::id().to_le_bytes();
    }
    format!("{base}-{:08x}", u32::from_le_bytes(seed))
}

fn launch(c: &client::Client, args: LaunchArgs) -> Result<(), client::ClientError> {
    let bytes = std::fs::read(&args.component)
        .map_err(|e| client::ClientError::Transport(format!("cannot read {}: {e}", args.component.display())))?;
    let uploaded = c.json(hyper::Method::POST, "/v1/components", Some(("application/wasm", bytes)))?;
    let digest = uploaded["digest"].as_str().unwrap_or_default().to_owned();
    let name = match args.name {
        Some(n) => n.to_string(),
        None => default_name(&args.component),
    };
    let mut spec = serde_json::json!({
        "component": digest,
        "args": args.args,
        "env": args.env.into_iter().collect::<BTreeMap<_, _>>(),
        "grants": args.grants.iter().map(|g| g.name()).collect::<Vec<_>>(),
        "config": args.config.into_iter().collect::<BTreeMap<_, _>>(),
        "restart": args.restart,
    });
    if let Some(m) = args.memory {
        spec["memory_mib"] = m.into();
    }
    if let Some(t) = args.timeout {
        spec["timeout_s"] = t.into();
    }
    let body = serde_json::to_vec(&spec).expect("a JSON value serializes");
    c.call(hyper::Method::PUT, &format!("/v1/tenants/{name}"), Some(("application/json", body)))?;
    println!("{name}");
    Ok(())
}

fn ps(c: &client::Client) -> Result<(), client::ClientError> {
    let tenants = c.json(hyper::Method::GET, "/v1/tenants", None)?;
    println!("{:<32} {:<9} {:>4} {:>8} {:>8} COMPONENT", "NAME", "STATE", "EXIT", "LAUNCHES", "PID");
    for t in tenants.as_array().into_iter().flatten() {
        let status = &t["status"];
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let component = t["spec"]["component"].as_str().unwrap_or("");
        let short = component.strip_prefix("sha256:").map_or(component, |h| &h[..h.len().min(12)]);
        println!(
            "{:<32} {:<9} {:>4} {:>8} {:>8} {short}",
            text(&t["name"]),
            text(&status["state"]),
            text(&status["exit_code"]),
            text(&status["launches"]),
            text(&status["pid"]),
        );
        if let Some(reason) = status["reason"].as_str() {
            println!("  reason: {}", reason.lines().next().unwrap_or(""));
        }
    }
    Ok(())
}

fn components(c: &client::Client) -> Result<(), client::ClientError> {
    let list = c.json(hyper::Method::GET, "/v1/components", None)?;
    println!("{:<71} {:<7} {:>10} {:>10}", "DIGEST", "KIND", "SIZE", "COMPILE_MS");
    for r in list.as_array().into_iter().flatten() {
        println!(
            "{:<71} {:<7} {:>10} {:>10}",
            r["digest"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["size"],
            r["compile_ms"]
        );
    }
    Ok(())
}

fn compile(args: CompileArgs) -> ExitCode {
    let mut config = VmConfig::default();
    if let Some(guest) = args.guest {
        config.guest = guest;
    }
    let cache = aot::default_cache_dir();
    let mut code = ExitCode::SUCCESS;
    for path in &args.components {
        let progress = CompileProgress::new(path);
        let mut compiled = None;
        let events = |event: Event<'_>| match event {
            Event::Compiling { bytes } => progress.start(bytes),
            Event::Artifact { elapsed, .. } => {
                progress.done(elapsed);
                compiled = Some(elapsed);
            }
            _ => {}
        };
        let result = Component::identify(path, &cache)
            .map_err(LaunchError::from)
            .and_then(|c| inspect::check_any(path, &c.interfaces).map(|_| c).map_err(LaunchError::from))
            .and_then(|c| launch::compile(&c, &cache, &config, events));
        match result {
            Ok(artifact) if artifact.cache_hit => {
                println!("{}: already compiled: {}", path.display(), artifact.path.display());
            }
            Ok(artifact) => {
                let took = compiled.map_or(0.0, |d| d.as_secs_f64());
                println!("{}: compiled in {took:.1} s: {}", path.display(), artifact.path.display());
            }
            Err(e) => {
                eprintln!("wasmvisor: error: {e}");
                code = ExitCode::from(e.exit_code());
            }
        }
    }
    code
}

fn cpu(args: CpuArgs) -> ExitCode {
    let mut config = VmConfig::default();
    if let Some(guest) = args.guest {
        config.guest = guest;
    }
    let cache = aot::default_cache_dir();
    let found = if args.refresh { GuestCpu::refresh(&cache, &config) } else { GuestCpu::for_vm(&cache, &config) };
    match found {
        Ok(cpu) => {
            println!("KVM: {}", vm::kvm_flavor());
            println!("{}", guest_cpu::describe(&guest_cpu::host_table(), &cpu));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}

fn config(vm: VmArgs, default_memory_mib: u64, args: Vec<String>) -> VmConfig {
    VmConfig {
        memory_mib: vm.memory.unwrap_or(default_memory_mib),
        count_resident_pages: vm.verbose,
        kvm_exit_stats: vm.verbose,
        args,
        env: vm.env,
        timeout: Duration::from_secs_f64(vm.timeout),
        ..VmConfig::default()
    }
}

fn boot(args: BootArgs) -> ExitCode {
    let verbose = args.vm.verbose;
    let mut config = config(args.vm, 64, args.args);
    if let Some(guest) = args.guest {
        config.guest = guest;
    }
    // A bare guest gets the device when it was given capabilities or a socket.
    let granted = args.tenant.granted();
    config.vsock = match args.tenant.vsock(&granted) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    finish(vm::boot(&config, GuestIo::inherit(Box::new(std::io::stdout()))), verbose)
}

fn run(args: RunArgs) -> ExitCode {
    let verbose = args.vm.verbose;
    let path = args.component;
    let granted = args.tenant.granted();
    let tenant_name = args.tenant.tenant.to_string();
    let grants = inspect::Grants { tenant: &tenant_name, granted: &granted };
    // argv[0] is the file name, as `wasmtime run` passes it.
    let argv0 = path.file_name().map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy());
    let mut argv = vec![argv0.into_owned()];
    argv.extend(args.args);
    let mut config = config(args.vm, 128, argv);
    // Bad arguments are refused before the component is even read.
    if let Err(e) = vm::check(&config) {
        eprintln!("wasmvisor: error: {e}");
        return ExitCode::from(e.exit_code());
    }
    let cache = aot::default_cache_dir();
    let t = std::time::Instant::now();
    let component = match Component::open(&path, &grants, &cache) {
        Ok(c) => {
            if verbose {
                let how = if c.indexed { "known to the component index" } else { "read, hashed and inspected" };
                eprintln!(
                    "wasmvisor: component {} ({} bytes, blake3 {}): {how} in {:.3} ms",
                    path.display(),
                    c.size,
                    c.digest.hex(),
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            c
        }
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let vsock = match args.tenant.vsock(&component.capabilities) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    config.report_guest_phases = verbose;
    config.vsock = vsock;
    let console = || -> Box<dyn std::io::Write + Send> {
        if verbose { Box::new(std::io::stderr()) } else { Box::new(std::io::sink()) }
    };
    // A compile that takes more than a second says so on a terminal, and how long it took.
    let progress = CompileProgress::new(&path);
    let events = |event: Event<'_>| match event {
        Event::Compiling { bytes } => progress.start(bytes),
        Event::GuestCpu(cpu) if verbose => eprintln!(
            "wasmvisor: guest CPU features ({} in {:.3} ms, {}): {}",
            if cpu.probed { "asked the guest" } else { "cached report" },
            cpu.elapsed.as_secs_f64() * 1e3,
            cpu.path.display(),
            cpu.isa_flags().join(" ")
        ),
        Event::Artifact { artifact, elapsed } => {
            progress.done(elapsed);
            if verbose {
                let how = if artifact.cache_hit { "cached artifact" } else { "compiled artifact" };
                eprintln!("wasmvisor: {how} {} ({:.3} ms)", artifact.path.display(), elapsed.as_secs_f64() * 1e3);
            }
        }
        // Said once, with -v: the run goes on without the setting, and so do later runs.
        Event::Recompiling { reason, refused_setting: Some(flag) } if verbose => eprintln!(
            "wasmvisor: the guest {reason}; compiling {} again without {flag} (recorded for this host)",
            path.display()
        ),
        Event::SnapshotDiscarded { why } if verbose => {
            eprintln!("wasmvisor: the component's snapshot is not used ({why}); booting, and making it again");
        }
        Event::Recompiling { reason, refused_setting: None } => {
            eprintln!("wasmvisor: warning: {reason}; recompiling {}", path.display());
        }
        _ => {}
    };
    let snapshots = args.snapshot.then_some(match args.snapshot_ram {
        SnapshotRam::Copied => RamRestore::Copied,
        SnapshotRam::Shared => RamRestore::Shared,
    });
    let result = launch::run(&component, &cache, config, snapshots, || GuestIo::inherit(console()), events);
    match result {
        Ok(report) => finish(Ok(report), verbose),
        Err(LaunchError::Vm(e)) => finish(Err(e), verbose),
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn finish(result: Result<RunReport, VmError>, verbose: bool) -> ExitCode {
    match result {
        Ok(report) => {
            if verbose {
                let p = report.phases;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                eprintln!(
                    "wasmvisor: {} | exit {} | vm_create {:.3} ms, memory {:.3} ms, image_load {:.3} ms, \
                     vcpu_setup {:.3} ms, guest_run {:.3} ms, teardown {:.3} ms, total {:.3} ms | \
                     {} exits ({} hypercalls) | {} resident pages",
                    report.flavor,
                    report.exit_code,
                    ms(p.vm_create),
                    ms(p.memory),
                    ms(p.image_load),
                    ms(p.vcpu_setup),
                    ms(p.guest_run),
                    ms(p.teardown),
                    ms(p.total()),
                    report.exits.total,
                    report.exits.hypercall,
                    report.resident_pages,
                );
            }
            if verbose {
                if report.restored {
                    eprintln!("wasmvisor: started from the snapshot of the component's ready state");
                }
                match &report.snapshot {
                    Some(Ok(bytes)) => {
                        eprintln!("wasmvisor: made the snapshot of the component's ready state ({bytes} bytes of RAM)")
                    }
                    Some(Err(why)) => eprintln!("wasmvisor: made no snapshot: {why}"),
                    None => {}
                }
                if let Some(k) = report.kvm_exits {
                    eprintln!(
                        "wasmvisor: KVM counted {} exits ({} MMIO, {} port I/O), including those completed in the kernel",
                        k.exits, k.mmio_exits, k.io_exits
                    );
                }
                if let Some(v) = &report.vsock {
                    eprintln!("wasmvisor: vsock {:?}, {} refused register accesses", v.stats, v.refused_accesses);
                }
            }
            for fault in report.vsock.iter().flat_map(|v| &v.faults) {
                eprintln!("wasmvisor: warning: the guest broke its vsock device: {fault}");
            }
            ExitCode::from(report.exit_code)
        }
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The line a compile that takes more than a second shows on a terminal (`compiling app.wasm
/// (18.0 MB) for the guest...`, then how long it took); nothing when stderr is not a terminal.
struct CompileProgress {
    name: String,
    /// Whether the compile ended, and whether its line was shown (both under the lock).
    state: Arc<(Mutex<(bool, bool)>, Condvar)>,
}

impl CompileProgress {
    fn new(path: &Path) -> Self {
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        Self { name, state: Arc::new((Mutex::new((false, false)), Condvar::new())) }
    }

    /// A compile of `bytes` starts.
    fn start(&self, bytes: usize) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let (name, state) = (self.name.clone(), self.state.clone());
        std::thread::spawn(move || {
            let (lock, ended) = &*state;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (mut guard, _) = ended
                .wait_timeout_while(guard, Duration::from_secs(1), |(done, _)| !*done)
                .unwrap_or_else(|p| p.into_inner());
            if !guard.0 {
                eprintln!("wasmvisor: compiling {name} ({:.1} MB) for the guest...", bytes as f64 / 1e6);
                guard.1 = true;
            }
        });
    }

    /// The artifact is ready (compiled or found) after `elapsed`.
    fn done(&self, elapsed: Duration) {
        let (lock, ended) = &*self.state;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        guard.0 = true;
        ended.notify_all();
        if guard.1 {
            eprintln!("wasmvisor: compiled {} in {:.1} s", self.name, elapsed.as_secs_f64());
        }
    }
}
