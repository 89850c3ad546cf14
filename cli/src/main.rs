//! The `wasmvisor` command line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wasmvisor::guest_cpu::{self, GuestCpu};
use wasmvisor::hypercall::GuestIo;
use wasmvisor::launch::{self, Component, Event, LaunchError};
use wasmvisor::vm::{self, Capabilities, EXIT_SETUP_FAILED, RunReport, VmConfig, VmError, VsockConfig};
use wasmvisor::wasm::{aot, inspect};
use wasmvisor_providers::{Capability, TenantName, TenantSpec, default_data_dir, parse_config_pair};

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
    /// Boot the guest unikernel, show its console, exit with its exit code.
    ///
    /// Exit codes: the guest's own (0-255), or 124 if it timed out, 125 if wasmvisor could not
    /// start it, 126 if it crashed (CPU exception, triple fault, invalid request).
    Boot(BootArgs),
    /// Show the CPU features the guest detects on this host (what components are compiled
    /// for), leaf by leaf against the host process's own CPUID.
    Cpu(CpuArgs),
    /// Internal: run one VM for a supervisor, configured over the socket on fd 3.
    #[command(name = "__vmm", hide = true)]
    Vmm,
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
    /// Grant a capability (repeatable): logging, config or keyvalue. Nothing is granted by
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
}

impl TenantArgs {
    fn granted(&self) -> BTreeSet<Capability> {
        self.grants.iter().copied().collect()
    }

    /// The vsock device for a guest that uses `used` capabilities: none if it uses none and no
    /// socket was asked for (a VM without capabilities pays nothing for them).
    fn vsock(self, used: &BTreeSet<Capability>) -> Result<Option<VsockConfig>, String> {
        if used.is_empty() && self.vsock_socket.is_none() {
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
        let grants = self.grants.into_iter().collect();
        // A user at a terminal sees what the component logs; the tenant log keeps it too.
        let tenant = TenantSpec { name: self.tenant, grants, config, data_dir, echo_log: true };
        Ok(Some(VsockConfig { capabilities: Capabilities::InProcess(tenant), uds_path: self.vsock_socket }))
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    tenant: TenantArgs,
    /// The component (.wasm) to run.
    #[arg(value_name = "COMPONENT")]
    component: PathBuf,
    /// Arguments for the component (its argv[0] is COMPONENT's file name).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<String>,
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
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Command::Run(a) => a.vm.verbose,
        Command::Boot(a) => a.vm.verbose,
        Command::Cpu(_) | Command::Vmm => false,
    };
    if verbose {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .with_target(false)
            .init();
    }
    match cli.command {
        Command::Run(args) => run(args),
        Command::Boot(args) => boot(args),
        Command::Cpu(args) => cpu(args),
        Command::Vmm => ExitCode::from(wasmvisor::child::serve()),
    }
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
    let component = match Component::open(&path, &grants) {
        Ok(c) => c,
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
    // argv[0] is the file name, as `wasmtime run` passes it.
    let argv0 = path.file_name().map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy());
    let mut argv = vec![argv0.into_owned()];
    argv.extend(args.args);
    let mut config = config(args.vm, 128, argv);
    config.report_guest_phases = verbose;
    config.vsock = vsock;
    let console = || -> Box<dyn std::io::Write + Send> {
        if verbose { Box::new(std::io::stderr()) } else { Box::new(std::io::sink()) }
    };
    let events = |event: Event<'_>| match event {
        Event::GuestCpu(cpu) if verbose => eprintln!(
            "wasmvisor: guest CPU features ({} in {:.3} ms, {}): {}",
            if cpu.probed { "asked the guest" } else { "cached report" },
            cpu.elapsed.as_secs_f64() * 1e3,
            cpu.path.display(),
            cpu.isa_flags().join(" ")
        ),
        Event::Artifact { artifact, elapsed } if verbose => {
            let how = if artifact.cache_hit { "cached artifact" } else { "compiled artifact" };
            eprintln!("wasmvisor: {how} {} ({:.3} ms)", artifact.path.display(), elapsed.as_secs_f64() * 1e3);
        }
        // Said once, with -v: the run goes on without the setting, and so do later runs.
        Event::Recompiling { reason, refused_setting: Some(flag) } if verbose => eprintln!(
            "wasmvisor: the guest {reason}; compiling {} again without {flag} (recorded for this host)",
            path.display()
        ),
        Event::Recompiling { reason, refused_setting: None } => {
            eprintln!("wasmvisor: warning: {reason}; recompiling {}", path.display());
        }
        _ => {}
    };
    let result = launch::run(&component, &aot::default_cache_dir(), config, || GuestIo::inherit(console()), events);
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
