//! The `zapvm` command.
//!
//! This crate is the command line only: it parses the arguments (every clap derive of the
//! project is here) and hands them, converted to the libraries' plain types, to the VMM
//! (`vmm`) or to the stress test and the benchmarks (`harness`). One module per family of
//! subcommands:
//! - [`run`]: `zapvm run`, and [`config`] its `--config FILE`;
//! - [`stress`]: `zapvm stress`;
//! - [`bench`]: `zapvm bench ...`;
//! - [`control`]: `zapvm stats`, `balloon`, `mem`, `pause`, `resume`, `quit`, `qmp`, `events`
//!   (a running VM, through its QMP socket);
//! - [`governor`]: `zapvm governor` and `zapvm bench overcommit`;
//! - [`values`]: the command line's mirrors of the libraries' enums.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::Value;

mod bench;
mod config;
mod control;
mod governor;
mod metrics;
mod run;
mod stress;
mod values;

use bench::BenchCommand;
use control::{control, Action, BalloonCommand, MemCommand, Target};
use run::RunArgs;

#[derive(Parser)]
#[command(
    name = "zapvm",
    version,
    about = "A minimal KVM hypervisor whose memory layer is a secondary MMU done right"
)]
struct Cli {
    /// What to log on standard error: a level (error, warn, info, debug, trace) or a tracing
    /// filter (e.g. `notifier=debug,vmm=info`). Default: $ZAPVM_LOG, else $RUST_LOG, else warn.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The log filter: `--log-level`, else `$ZAPVM_LOG`, else `$RUST_LOG`, else `warn`; a filter
/// that does not parse is an error naming where it came from.
fn log_filter(flag: Option<&str>) -> Result<tracing_subscriber::EnvFilter, String> {
    let (text, from) = match flag {
        Some(f) => (f.to_string(), "--log-level"),
        None => match (std::env::var("ZAPVM_LOG"), std::env::var("RUST_LOG")) {
            (Ok(v), _) => (v, "ZAPVM_LOG"),
            (_, Ok(v)) => (v, "RUST_LOG"),
            _ => ("warn".to_string(), "the default"),
        },
    };
    tracing_subscriber::EnvFilter::try_new(&text)
        .map_err(|e| format!("{from} {text:?} is not a log filter: {e}"))
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM: the built-in test guest by default, or a Linux kernel.
    Run(RunArgs),
    /// Measure.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Stress the memory layer: the Stress guest verifies its pages while host scenarios
    /// (discards, external chaos, mprotect phases) tear guest RAM down, or (--linux) Linux's
    /// balloon driver follows a storm of targets while memtester and seedcheck check its memory;
    /// JSON summary, non-zero exit on any broken invariant.
    Stress(stress::StressArgs),
    /// Keep a fleet of VMs under a memory budget: watch their control sockets, set their
    /// balloon targets (take from guests with free memory, give back to growing ones), log each
    /// decision with its reason.
    Governor(governor::GovernorArgs),
    /// Print the statistics of a running VM: KVM's, the table's, the notifier's, the balloon's.
    Stats(Target),
    /// The balloon of a running VM (through its control socket).
    #[command(subcommand)]
    Balloon(BalloonCommand),
    /// The virtio-mem device of a running VM (through its control socket).
    #[command(subcommand)]
    Mem(MemCommand),
    /// Stop every vCPU of a running VM.
    Pause(Target),
    /// Let a paused VM run again.
    Resume(Target),
    /// End a running VM.
    Quit(Target),
    /// Run any QMP command on a running VM and print what it returns (e.g. `zapvm qmp
    /// query-status`, `zapvm qmp balloon '{"value": 536870912}'`).
    Qmp {
        /// The command (`zapvm qmp query-commands` lists them).
        command: String,
        /// Its arguments, a JSON object.
        arguments: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Print a running VM's QMP events (BALLOON_CHANGE, MEMORY_DEVICE_SIZE_CHANGE, STOP,
    /// RESUME, SHUTDOWN, ...) as JSON lines as they happen.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds without an event.
        #[arg(long)]
        timeout: Option<f64>,
        #[command(flatten)]
        target: Target,
    },
}

/// The command line, with `zapvm run --config FILE`'s settings added where it sets nothing (see
/// [`config`]). A usage error on the command line as typed is clap's (its message and help, exit
/// status 2); a problem with the file is one line for `Err`.
fn parse_command_line() -> Result<Cli, String> {
    let command = Cli::command();
    let typed = command.clone().get_matches();
    let file = match typed.subcommand() {
        Some(("run", run)) => {
            run.get_one::<std::path::PathBuf>(config::CONFIG_OPTION).map(|path| (run, path))
        }
        _ => None,
    };
    let matches = match file {
        None => typed.clone(),
        Some((run_matches, path)) => {
            let run = command.find_subcommand("run").expect("zapvm run exists");
            let from_file = config::options_from_file(run, run_matches, path)?;
            // `zapvm run` has no positional argument: options appended at the end are its own.
            let argv = std::env::args_os().chain(from_file);
            command
                .clone()
                .try_get_matches_from(argv)
                .map_err(|e| format!("--config {}: {}", path.display(), config::first_line(&e)))?
        }
    };
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn main() -> ExitCode {
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(message) => {
            eprintln!("zapvm: error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let filter = match log_filter(cli.log_level.as_deref()) {
        Ok(f) => f,
        Err(message) => {
            eprintln!("zapvm: error: {message}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = vmm::stats::install_signal_handler() {
        eprintln!("zapvm: warning: no SIGUSR1 handler, `zapvm stats` will not work: {e}");
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(command) => bench::bench(command),
        Command::Stats(target) => control::stats(target),
        Command::Balloon(BalloonCommand::Set { size, target }) => control(target, Action::BalloonSize(size)),
        Command::Balloon(BalloonCommand::Stats(target)) => {
            control(target, Action::Execute("__org.zapvm_query-balloon", Value::Null))
        }
        Command::Mem(MemCommand::Set { size, target }) => control(target, Action::RequestedSize(size)),
        Command::Mem(MemCommand::State(target)) => {
            control(target, Action::Execute("__org.zapvm_query-virtio-mem", Value::Null))
        }
        Command::Pause(target) => control(target, Action::Execute("stop", Value::Null)),
        Command::Resume(target) => control(target, Action::Execute("cont", Value::Null)),
        Command::Quit(target) => control(target, Action::Execute("quit", Value::Null)),
        Command::Qmp { command, arguments, target } => control::qmp(target, command, arguments),
        Command::Events { count, timeout, target } => control::events(target, count, timeout),
        Command::Stress(args) => stress::stress(args),
        Command::Governor(args) => governor::governor(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("zapvm: error: {message}");
            ExitCode::FAILURE
        }
    }
}
