//! The commands that talk to a running VM: `zapvm stats`, `balloon`, `mem`, `pause`, `resume`,
//! `quit` (through its control socket; `stats` falls back to SIGUSR1 without one).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

/// Which running VM a control command talks to.
#[derive(clap::Args)]
pub struct Target {
    /// Process id of the `zapvm run` (default: the only one with a control socket).
    #[arg(long)]
    pub pid: Option<u32>,
    /// The VM's control socket (`zapvm run --api-socket PATH`), instead of --pid.
    #[arg(long, conflicts_with = "pid")]
    pub api_socket: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum BalloonCommand {
    /// Set the balloon's target: how much memory to take from the guest (e.g. 128M, 0).
    Set {
        /// The target size.
        size: String,
        #[command(flatten)]
        target: Target,
    },
    /// The balloon's target, actual size and statistics.
    Stats(Target),
}

#[derive(Subcommand)]
pub enum MemCommand {
    /// Set virtio-mem's requested size (e.g. 512M).
    Set {
        /// The requested size.
        size: String,
        #[command(flatten)]
        target: Target,
    },
    /// virtio-mem's requested and plugged sizes.
    State(Target),
}

/// Sends `op` to the control socket `--api-socket` names, or that of VM `--pid` (or the only
/// one), and prints the result.
pub fn control(target: Target, op: vmm::api::Op) -> Result<ExitCode, String> {
    let socket = match target.api_socket {
        Some(path) => vmm::client::socket_at(&path)?,
        None => vmm::api::find_socket(target.pid).map_err(|e| e.to_string())?,
    };
    control_at(&socket, op)
}

/// Prints the statistics of a running VM (`zapvm stats`): through the socket `--api-socket`
/// names when given.
pub fn stats(target: Target) -> Result<ExitCode, String> {
    if let Some(path) = target.api_socket {
        return control_at(&vmm::client::socket_at(&path)?, vmm::api::Op::Stats);
    }
    let pid = target.pid;
    // The control socket when the VM has one; SIGUSR1 otherwise (`zapvm run --no-api`).
    if let Ok(socket) = vmm::api::find_socket(pid) {
        return control_at(&socket, vmm::api::Op::Stats);
    }
    let pid = match pid {
        Some(pid) => pid,
        None => match vmm::stats::running_vms().as_slice() {
            [pid] => *pid,
            [] => return Err("no running `zapvm run` found; name one with --pid".into()),
            many => return Err(format!("several VMs run ({many:?}); choose one with --pid")),
        },
    };
    let json = vmm::stats::request(pid, Duration::from_secs(5))?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("bad statistics file: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&value).expect("value serialises"));
    Ok(ExitCode::SUCCESS)
}

fn control_at(socket: &std::path::Path, op: vmm::api::Op) -> Result<ExitCode, String> {
    let result = vmm::api::call(socket, op).map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string_pretty(&result).expect("value serialises"));
    Ok(ExitCode::SUCCESS)
}
