//! The commands that talk to a running VM through its control socket (QMP): `zapvm stats`,
//! `balloon`, `mem`, `pause`, `resume`, `quit`, `qmp` (any command) and `events` (`stats`
//! falls back to SIGUSR1 for a VM without a socket).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};
use vmm::api::{client::DEFAULT_TIMEOUT, QmpClient};

/// Which running VM a control command talks to.
#[derive(clap::Args)]
pub struct Target {
    /// Process id of the `zapvm run` (default: the only one with a control socket).
    #[arg(long, conflicts_with_all = ["api_socket", "id"])]
    pub pid: Option<u32>,
    /// The id the VM was started with (`zapvm run --id NAME`).
    #[arg(long, conflicts_with = "api_socket")]
    pub id: Option<String>,
    /// The VM's control socket (`zapvm run --api-socket PATH`).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> Result<PathBuf, String> {
        if let Some(path) = &self.api_socket {
            return vmm::api::socket_at(path);
        }
        let target = match (&self.pid, &self.id) {
            (Some(pid), _) => vmm::api::Target::Pid(*pid),
            (None, Some(id)) => vmm::api::Target::Id(id.clone()),
            (None, None) => vmm::api::Target::Only,
        };
        vmm::api::find_socket(&target).map_err(|e| e.to_string())
    }

    fn connect(&self) -> Result<QmpClient, String> {
        QmpClient::connect(&self.socket()?, DEFAULT_TIMEOUT).map_err(|e| e.to_string())
    }
}

#[derive(Subcommand)]
pub enum BalloonCommand {
    /// Set the balloon's size: how much memory to take from the guest (e.g. 128M, 0). QMP's
    /// `balloon` with the guest's memory minus SIZE.
    Set {
        /// The balloon's size.
        size: String,
        #[command(flatten)]
        target: Target,
    },
    /// The balloon's target, actual size, counters and the guest's statistics.
    Stats(Target),
}

#[derive(Subcommand)]
pub enum MemCommand {
    /// Set virtio-mem's requested size (e.g. 512M; whole blocks). QMP's `qom-set` of
    /// `vmem0`'s `requested-size`.
    Set {
        /// The requested size.
        size: String,
        #[command(flatten)]
        target: Target,
    },
    /// virtio-mem's region, requested and plugged sizes and counters.
    State(Target),
}

/// What a control command does, in QMP terms.
pub enum Action {
    /// Run one command and print what it returns.
    Execute(&'static str, Value),
    /// `zapvm balloon set SIZE`.
    BalloonSize(String),
    /// `zapvm mem set SIZE`.
    RequestedSize(String),
}

/// Runs `action` on the VM `target` names and prints the result (pretty JSON).
pub fn control(target: Target, action: Action) -> Result<ExitCode, String> {
    let mut vm = target.connect()?;
    let result = match action {
        Action::Execute(command, arguments) => vm.execute(command, arguments),
        Action::BalloonSize(size) => {
            let bytes = vmm::memory::parse_size(&size)?;
            let summary = vm.execute("query-memory-size-summary", Value::Null).map_err(|e| e.to_string())?;
            let base = summary["base-memory"].as_u64().ok_or("the VM reported no base memory")?;
            if bytes >= base {
                return Err(format!(
                    "a balloon of {size} ({bytes} bytes) leaves the guest nothing: it has {base} bytes"
                ));
            }
            vm.execute("balloon", json!({ "value": base - bytes }))
                .and_then(|_| vm.execute("__org.zapvm_query-balloon", Value::Null))
        }
        Action::RequestedSize(size) => {
            let bytes = vmm::memory::parse_size(&size)?;
            vm.execute(
                "qom-set",
                json!({ "path": "/machine/peripheral/vmem0", "property": "requested-size", "value": bytes }),
            )
            .and_then(|_| vm.execute("__org.zapvm_query-virtio-mem", Value::Null))
        }
    }
    .map_err(|e| e.to_string())?;
    print_json(&result);
    Ok(ExitCode::SUCCESS)
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}

/// `zapvm qmp COMMAND [ARGUMENTS]`: any QMP command, its arguments a JSON object.
pub fn qmp(target: Target, command: String, arguments: Option<String>) -> Result<ExitCode, String> {
    let arguments = match arguments {
        Some(text) => {
            let value: Value = serde_json::from_str(&text).map_err(|e| format!("arguments {text:?}: {e}"))?;
            if !value.is_object() {
                return Err(format!(
                    "arguments {text:?}: give a JSON object, e.g. '{{\"value\": 536870912}}'"
                ));
            }
            value
        }
        None => Value::Null,
    };
    let result = target.connect()?.execute(&command, arguments).map_err(|e| e.to_string())?;
    print_json(&result);
    Ok(ExitCode::SUCCESS)
}

/// `zapvm events`: prints the VM's QMP events, one JSON line each, as they arrive, until the VM
/// ends, `--count` events were printed, or `--timeout` passed without one.
pub fn events(target: Target, count: Option<u64>, timeout: Option<f64>) -> Result<ExitCode, String> {
    let mut vm = target.connect()?;
    let wait = timeout.map(Duration::from_secs_f64).unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
    let mut printed = 0u64;
    while count.is_none_or(|c| printed < c) {
        match vm.next_event(wait) {
            Ok(Some(event)) => {
                println!("{event}");
                printed += 1;
            }
            Ok(None) => break,
            // The VM ended (after its SHUTDOWN, which was printed).
            Err(vmm::api::ClientError::BadReply { .. }) if printed > 0 => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the statistics of a running VM (`zapvm stats`): through its control socket, or by
/// SIGUSR1 for a VM run with `--no-api`.
pub fn stats(target: Target) -> Result<ExitCode, String> {
    if target.api_socket.is_some() || target.id.is_some() {
        return control(target, Action::Execute("__org.zapvm_query-memory-layer", Value::Null));
    }
    if target.socket().is_ok() {
        return control(target, Action::Execute("__org.zapvm_query-memory-layer", Value::Null));
    }
    let pid = match target.pid {
        Some(pid) => pid,
        None => match vmm::stats::running_vms().as_slice() {
            [pid] => *pid,
            [] => return Err("no running `zapvm run` found; name one with --pid".into()),
            many => return Err(format!("several VMs run ({many:?}); choose one with --pid")),
        },
    };
    let json = vmm::stats::request(pid, Duration::from_secs(5))?;
    let value: Value = serde_json::from_str(&json).map_err(|e| format!("bad statistics file: {e}"))?;
    print_json(&value);
    Ok(ExitCode::SUCCESS)
}
