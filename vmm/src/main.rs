//! The `wasmvisor` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wasmvisor::vm::{self, VmConfig};

#[derive(Parser)]
#[command(name = "wasmvisor", version, about = "A KVM micro-VM hypervisor for WebAssembly components")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the guest unikernel, show its console, exit with its exit code.
    ///
    /// Exit codes: the guest's own (0-255), or 124 if it timed out, 125 if wasmvisor could not
    /// start it, 126 if it crashed (CPU exception, triple fault, invalid request).
    Boot(BootArgs),
}

#[derive(clap::Args)]
struct BootArgs {
    /// Guest RAM in MiB (a multiple of 2, at most 3072).
    #[arg(long, default_value_t = 64, value_name = "MiB")]
    memory: u64,
    /// Guest image (x86-64 ELF); default: the built wasmvisor guest.
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// Stop the guest after this many seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: f64,
    /// Environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Log what the VMM does (phases, exits, KVM flavor) to stderr.
    #[arg(short, long)]
    verbose: bool,
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
    match cli.command {
        Command::Boot(args) => boot(args),
    }
}

fn boot(args: BootArgs) -> ExitCode {
    if args.verbose {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .with_target(false)
            .init();
    }
    let mut config = VmConfig {
        memory_mib: args.memory,
        args: args.args,
        env: args.env,
        timeout: Duration::from_secs_f64(args.timeout),
        ..VmConfig::default()
    };
    if let Some(guest) = args.guest {
        config.guest = guest;
    }
    match vm::boot(&config, Box::new(std::io::stdout())) {
        Ok(report) => {
            if args.verbose {
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
