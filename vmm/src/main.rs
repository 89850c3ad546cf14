//! The `wasmvisor` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use wasmvisor::hypercall::GuestIo;
use wasmvisor::vm::{self, EXIT_SETUP_FAILED, RunReport, VmConfig, VmError};
use wasmvisor::wasm::{WasmError, aot, inspect};

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

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
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
    }
}

fn config(vm: VmArgs, default_memory_mib: u64, args: Vec<String>) -> VmConfig {
    VmConfig {
        memory_mib: vm.memory.unwrap_or(default_memory_mib),
        count_resident_pages: vm.verbose,
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
    finish(vm::boot(&config, GuestIo::inherit(Box::new(std::io::stdout()))), verbose)
}

fn run(args: RunArgs) -> ExitCode {
    let verbose = args.vm.verbose;
    let path = args.component;
    let t = Instant::now();
    let artifact = match prepare_component(&path) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    if verbose {
        let how = if artifact.cache_hit { "cached artifact" } else { "compiled artifact" };
        eprintln!("wasmvisor: {how} {} ({:.3} ms)", artifact.path.display(), t.elapsed().as_secs_f64() * 1e3);
    }
    // argv[0] is the file name, as `wasmtime run` passes it.
    let argv0 = path.file_name().map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy());
    let mut argv = vec![argv0.into_owned()];
    argv.extend(args.args);
    let mut config = config(args.vm, 128, argv);
    config.component = Some(artifact.path.clone());
    config.report_guest_phases = verbose;
    let console = || -> Box<dyn std::io::Write + Send> {
        if verbose { Box::new(std::io::stderr()) } else { Box::new(std::io::sink()) }
    };
    let result = vm::boot(&config, GuestIo::inherit(console()));
    // A cached artifact the guest cannot load (damaged, or from a build whose settings the
    // cache key did not capture) is compiled afresh, once.
    if let Err(VmError::Guest(failure)) = &result
        && failure.reason.is_artifact_rejected()
        && artifact.cache_hit
    {
        eprintln!("wasmvisor: warning: {}; recompiling {}", failure.reason, path.display());
        let _ = std::fs::remove_file(&artifact.path);
        return match prepare_component(&path) {
            Ok(fresh) => {
                config.component = Some(fresh.path);
                finish(vm::boot(&config, GuestIo::inherit(console())), verbose)
            }
            Err(e) => {
                eprintln!("wasmvisor: error: {e}");
                ExitCode::from(EXIT_SETUP_FAILED)
            }
        };
    }
    finish(result, verbose)
}

/// Reads and checks the component, then compiles it or finds it in the cache.
fn prepare_component(path: &std::path::Path) -> Result<aot::Artifact, WasmError> {
    let bytes = std::fs::read(path).map_err(|source| WasmError::Read { path: path.to_owned(), source })?;
    let interfaces = inspect::interfaces(path, &bytes)?;
    inspect::check(path, &interfaces)?;
    aot::compile_cached(path, &bytes, &aot::default_cache_dir())
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
            ExitCode::from(report.exit_code)
        }
        Err(e) => {
            eprintln!("wasmvisor: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
