//! `zapvm governor`: keeps a fleet of zapvm VMs under a memory budget by setting their balloon
//! targets.
//!
//! The decision is [`policy`]'s (pure, unit-tested); this module is its I/O: [`Governor::tick`]
//! finds the VMs ([`Fleet`]: a directory of control sockets, or a list), reads each one over its
//! QMP socket (the balloon's target, `actual` and guest statistics, guest RAM, the VMM's pid,
//! then its resident memory from `/proc/PID/smaps_rollup`), drains its events, reads the host
//! ([`HostObservation`]: PSI from `/proc/pressure/memory`, a memory cgroup's limit), decides, and
//! sends the `balloon` commands whose target changed. Every changed decision is logged with its
//! reason; [`GovernorMetrics`] counts what happened (written as JSON by the command).
//!
//! Robustness (each case counted, never a panic):
//! - a socket that cannot be reached or does not answer within the timeout: the VM is
//!   `unreachable` for the round (its resident memory, read through its pid, still counts, G5),
//!   and the connection is made again next round;
//! - a VM that went away (its socket is gone from the directory, its process ended, or it sent
//!   SHUTDOWN) is dropped from the fleet;
//! - a command that fails is counted and retried next round (the decision is made again).

pub mod cgroup;
pub mod policy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use vmm::api::client::QmpClient;

pub use policy::{decide, Decision, HostObservation, PolicyConfig, Reason, VmObservation};

/// Where the VMs' control sockets are.
#[derive(Clone, Debug)]
pub enum Fleet {
    /// Every `*.sock` in this directory, looked for again each round.
    Dir(PathBuf),
    /// These sockets.
    Sockets(Vec<PathBuf>),
}

/// What the governor does with the targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// [`policy::decide`].
    Govern,
    /// Every balloon at RAM minus the budget's equal share (the static split).
    Static,
    /// Watch only (no policy).
    Observe,
}

/// Counters of a governor's life.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GovernorMetrics {
    /// Rounds.
    pub ticks: u64,
    /// VMs in the fleet now.
    pub vms: u64,
    /// VMs that joined / left the fleet.
    pub vms_joined: u64,
    /// See `vms_joined`.
    pub vms_left: u64,
    /// VM-rounds in which a VM did not answer.
    pub unreachable: u64,
    /// `balloon` commands sent, and those that failed.
    pub commands: u64,
    /// See `commands`.
    pub command_failures: u64,
    /// Rounds in which the resident total was above the budget.
    pub over_budget_ticks: u64,
    /// Rounds in which the floors alone exceeded the budget (G4).
    pub floor_ticks: u64,
    /// Rounds with host memory pressure.
    pub pressure_ticks: u64,
    /// Events seen, by name.
    pub events: BTreeMap<String, u64>,
    /// The resident total of the last round, bytes.
    pub resident_total: u64,
    /// The budget in force in the last round, bytes.
    pub effective_budget: u64,
}

/// One round: what was seen and what was decided.
#[derive(Clone, Debug, Serialize)]
pub struct Tick {
    /// Per VM, by name.
    pub vms: Vec<VmObservation>,
    /// The host.
    pub host: HostObservation,
    /// The decision (targets as sent in [`Mode::Govern`] and [`Mode::Static`]).
    pub decision: Option<Decision>,
    /// The resident total, bytes.
    pub resident_total: u64,
}

struct Conn {
    name: String,
    client: Option<QmpClient>,
    pid: Option<u32>,
    ram: u64,
    gone: bool,
    /// The last change of the guest's wanted working set seen: (bytes, when), and the growth
    /// rate it showed (bytes/s).
    last_wanted: Option<(u64, std::time::Instant)>,
    growth: f64,
}

/// The governor (see the module docs).
pub struct Governor {
    fleet: Fleet,
    mode: Mode,
    config: PolicyConfig,
    cgroup: Option<cgroup::Cgroup>,
    timeout: Duration,
    conns: BTreeMap<PathBuf, Conn>,
    /// Counters.
    pub metrics: GovernorMetrics,
}

/// The VM name of a control socket: `zapvm-NAME.sock` → NAME, else the file stem.
pub fn vm_name(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.strip_prefix("zapvm-").map(str::to_string).unwrap_or(stem)
}

/// Resident memory of process `pid`, bytes (`Rss` of `/proc/PID/smaps_rollup`).
pub fn resident_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Rss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// PSI `some avg10` of `/proc/pressure/memory`, where the host has it.
pub fn psi_some_avg10() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    parse_psi(&text)
}

/// The `some avg10=` value of a PSI file's text.
pub fn parse_psi(text: &str) -> Option<f64> {
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace().find_map(|f| f.strip_prefix("avg10="))?.parse().ok()
}

fn stat(stats: &Value, name: &str) -> Option<u64> {
    stats.get(name)?.as_u64()
}

impl Governor {
    /// A governor of `fleet` with `config` (checked by [`policy::check_config`] against the
    /// fleet's size once it is known, at every round) and an optional cgroup to watch.
    pub fn new(
        fleet: Fleet,
        mode: Mode,
        config: PolicyConfig,
        cgroup: Option<cgroup::Cgroup>,
    ) -> Result<Self, String> {
        if config.budget == 0 {
            return Err("--budget must be more than 0".into());
        }
        if let Fleet::Sockets(list) = &fleet {
            policy::check_config(&config, list.len())?;
        }
        if let Fleet::Dir(dir) = &fleet {
            if !dir.is_dir() {
                return Err(format!("{}: not a directory of control sockets", dir.display()));
            }
        }
        Ok(Self {
            fleet,
            mode,
            config,
            cgroup,
            timeout: Duration::from_millis(1500),
            conns: BTreeMap::new(),
            metrics: GovernorMetrics::default(),
        })
    }

    /// The sockets of the fleet now.
    fn sockets(&self) -> Vec<PathBuf> {
        match &self.fleet {
            Fleet::Sockets(list) => list.clone(),
            Fleet::Dir(dir) => {
                let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                            .collect()
                    })
                    .unwrap_or_default();
                found.sort();
                found
            }
        }
    }

    /// Reads one VM; `Err` when it did not answer.
    fn observe(
        conn: &mut Conn,
        path: &Path,
        timeout: Duration,
        in_dir: bool,
        metrics: &mut GovernorMetrics,
    ) -> Result<(VmObservation, Value), String> {
        if conn.client.is_none() {
            let mut client = QmpClient::connect(path, timeout).map_err(|e| {
                // A socket file nobody listens on: the VMM that made it is gone. (One named on
                // the command line only once it was read: it may not be listening yet.)
                if let vmm::api::client::ClientError::Connect { source, .. } = &e {
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && (conn.pid.is_some() || in_dir)
                    {
                        conn.gone = true;
                    }
                }
                e.to_string()
            })?;
            if conn.pid.is_none() {
                let layer = client
                    .execute("__org.zapvm_query-memory-layer", Value::Null)
                    .map_err(|e| e.to_string())?;
                conn.pid = layer.get("pid").and_then(Value::as_u64).map(|p| p as u32);
            }
            let size = client.execute("query-memory-size-summary", Value::Null).map_err(|e| e.to_string())?;
            conn.ram = size.get("base-memory").and_then(Value::as_u64).unwrap_or(0);
            conn.client = Some(client);
        }
        let client = conn.client.as_mut().expect("connected above");
        let balloon = client.execute("__org.zapvm_query-balloon", Value::Null).map_err(|e| e.to_string())?;
        while let Ok(Some(event)) = client.next_event(Duration::ZERO) {
            let name = event.get("event").and_then(Value::as_str).unwrap_or("?").to_string();
            if name == "SHUTDOWN" {
                conn.gone = true;
            }
            *metrics.events.entry(name).or_default() += 1;
        }
        let page = 4096;
        let stats = balloon.get("guest_stats").cloned().unwrap_or(Value::Null);
        let o = VmObservation {
            name: conn.name.clone(),
            reachable: true,
            ram: conn.ram,
            resident: conn.pid.and_then(resident_of).unwrap_or(0),
            balloon_target: balloon.get("target_pages").and_then(Value::as_u64).unwrap_or(0) * page,
            balloon_actual: balloon.get("actual_pages").and_then(Value::as_u64).unwrap_or(0) * page,
            working_set: stat(&stats, "zapvm_working_set"),
            wanted: stat(&stats, "zapvm_wanted"),
            free: stat(&stats, "free_memory"),
            available: stat(&stats, "available_memory"),
            stall_us: stat(&stats, "zapvm_stall_us"),
            growth_per_s: 0.0,
        };
        // The working set's growth rate: between two changes of what it wants (statistics
        // arrive every stats interval), forgotten after 1.5 s without a change.
        let now = std::time::Instant::now();
        let mut o = o;
        if let Some(w) = o.wanted {
            match conn.last_wanted {
                Some((old, at)) if old != w => {
                    let dt = now.duration_since(at).as_secs_f64().max(0.1);
                    conn.growth = (w as f64 - old as f64) / dt;
                    conn.last_wanted = Some((w, now));
                }
                Some((_, at)) if now.duration_since(at).as_secs_f64() > 1.5 => conn.growth = 0.0,
                Some(_) => {}
                None => conn.last_wanted = Some((w, now)),
            }
            o.growth_per_s = conn.growth.max(0.0);
        }
        Ok((o, balloon))
    }

    /// One round (see the module docs). `extra` gets each reachable VM's name and its
    /// `__org.zapvm_query-balloon` reply (for the benchmark's records).
    pub fn tick(&mut self, mut extra: impl FnMut(&str, &Value)) -> Tick {
        self.metrics.ticks += 1;
        let sockets = self.sockets();
        // Join new sockets; drop the ones that went away.
        for path in &sockets {
            if !self.conns.contains_key(path) {
                let name = vm_name(path);
                tracing::info!(vm = %name, socket = %path.display(), "governor: VM joined");
                self.metrics.vms_joined += 1;
                self.conns.insert(
                    path.clone(),
                    Conn {
                        name,
                        client: None,
                        pid: None,
                        ram: 0,
                        gone: false,
                        last_wanted: None,
                        growth: 0.0,
                    },
                );
            }
        }
        let mut observations = Vec::new();
        let mut paths = Vec::new();
        let keys: Vec<PathBuf> = self.conns.keys().cloned().collect();
        for path in keys {
            let conn = self.conns.get_mut(&path).expect("key from the map");
            if !sockets.contains(&path) {
                if !conn.gone {
                    tracing::info!(vm = %conn.name, "governor: VM left (its socket is gone)");
                    self.metrics.vms_left += 1;
                }
                self.conns.remove(&path);
                continue;
            }
            if conn.gone {
                // Left earlier; its socket file stayed behind (a VMM that was killed).
                continue;
            }
            if !conn.pid.is_none_or(process_alive) {
                tracing::info!(vm = %conn.name, "governor: VM left (its process ended)");
                self.metrics.vms_left += 1;
                conn.gone = true;
                continue;
            }
            match Self::observe(
                conn,
                &path,
                self.timeout,
                matches!(self.fleet, Fleet::Dir(_)),
                &mut self.metrics,
            ) {
                Ok(_) if conn.gone => {
                    tracing::info!(vm = %conn.name, "governor: VM left (SHUTDOWN)");
                    self.metrics.vms_left += 1;
                }
                Ok((o, balloon)) => {
                    extra(&conn.name, &balloon);
                    observations.push(o);
                    paths.push(path);
                }
                Err(e) if conn.gone => {
                    tracing::info!(vm = %conn.name, error = %e, "governor: VM left (shut down, or nobody listens on its socket)");
                    self.metrics.vms_left += 1;
                }
                Err(e) => {
                    self.metrics.unreachable += 1;
                    tracing::warn!(vm = %conn.name, error = %e, "governor: VM did not answer; counting its resident memory and retrying next round");
                    conn.client = None;
                    if conn.ram == 0 {
                        // Never read: nothing to count it by.
                        continue;
                    }
                    let resident = conn.pid.and_then(resident_of).unwrap_or(0);
                    observations.push(VmObservation {
                        name: conn.name.clone(),
                        reachable: false,
                        ram: conn.ram,
                        resident,
                        balloon_target: conn.ram.saturating_sub(resident),
                        ..Default::default()
                    });
                    paths.push(path);
                }
            }
        }
        self.metrics.vms = self.conns.values().filter(|c| !c.gone).count() as u64;
        let host = HostObservation {
            psi_some_avg10: psi_some_avg10(),
            cgroup_limit: self.cgroup.as_ref().and_then(|c| c.limit().ok()),
        };
        let resident_total: u64 = observations.iter().map(|o| o.resident).sum();
        self.metrics.resident_total = resident_total;
        let decision = match self.mode {
            Mode::Observe => None,
            Mode::Govern => Some(decide(&self.config, &host, &observations)),
            Mode::Static => Some(self.static_split(&host, &observations)),
        };
        if let Some(d) = &decision {
            self.metrics.effective_budget = d.effective_budget;
            self.metrics.floor_ticks += u64::from(d.over_budget_floors);
            self.metrics.pressure_ticks += u64::from(d.host_pressure);
            if d.over_budget_floors {
                tracing::warn!(
                    budget = d.effective_budget,
                    "governor: the VMs' floors exceed the budget; every VM is at its floor"
                );
            }
            for (vd, path) in d.vms.iter().zip(&paths) {
                if !vd.changed {
                    continue;
                }
                tracing::info!(
                    vm = %vd.name, reason = ?vd.reason, balloon_mib = vd.balloon_target >> 20,
                    allowance_mib = vd.allowance >> 20, need_mib = vd.need >> 20,
                    "governor: new balloon target"
                );
                self.metrics.commands += 1;
                let conn = self.conns.get_mut(path).expect("observed above");
                let sent = conn
                    .client
                    .as_mut()
                    .map(|c| c.execute("balloon", json!({ "value": vd.allowance.max(1) })));
                if !matches!(sent, Some(Ok(_))) {
                    self.metrics.command_failures += 1;
                    tracing::warn!(vm = %vd.name, result = ?sent.map(|r| r.map_err(|e| e.to_string())), "governor: balloon command failed");
                    conn.client = None;
                }
            }
        } else {
            self.metrics.effective_budget = self.config.budget;
        }
        if resident_total > self.metrics.effective_budget {
            self.metrics.over_budget_ticks += 1;
        }
        Tick { vms: observations, host, decision, resident_total }
    }

    /// [`Mode::Static`]: each reachable VM's allowance is the budget's equal share.
    fn static_split(&self, host: &HostObservation, vms: &[VmObservation]) -> Decision {
        let budget = self.config.budget.min(host.cgroup_limit.unwrap_or(u64::MAX));
        let n = vms.len().max(1) as u64;
        let share = (budget / n) >> 20 << 20;
        Decision {
            vms: vms
                .iter()
                .map(|v| {
                    let allowance = share.min(v.ram);
                    let target = v.ram - allowance;
                    policy::VmDecision {
                        name: v.name.clone(),
                        balloon_target: target,
                        allowance,
                        need: allowance,
                        reason: Reason::Hold,
                        changed: v.reachable && target != v.balloon_target,
                    }
                })
                .collect(),
            effective_budget: budget,
            guest_share: budget,
            over_budget_floors: false,
            host_pressure: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_psi_and_rss_parse() {
        assert_eq!(vm_name(Path::new("/run/zapvm-web.1.sock")), "web.1");
        assert_eq!(vm_name(Path::new("/x/other.sock")), "other");
        let psi = "some avg10=1.50 avg60=0.00 avg300=0.00 total=12\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=3\n";
        assert_eq!(parse_psi(psi), Some(1.5));
        assert_eq!(parse_psi("garbage"), None);
        assert!(resident_of(std::process::id()).is_some_and(|r| r > 0));
        assert_eq!(resident_of(u32::MAX), None);
    }

    #[test]
    fn bad_input_is_an_error_not_a_crash() {
        let c = PolicyConfig { budget: 100 << 20, ..Default::default() };
        let err = Governor::new(Fleet::Dir("/nonexistent-dir".into()), Mode::Govern, c.clone(), None)
            .err()
            .unwrap();
        assert!(err.contains("not a directory"), "{err}");
        let socks = (0..3).map(|i| PathBuf::from(format!("/tmp/x{i}.sock"))).collect();
        let err = Governor::new(Fleet::Sockets(socks), Mode::Govern, c.clone(), None).err().unwrap();
        assert!(err.contains("smaller than the floors"), "{err}");
        assert!(Governor::new(Fleet::Sockets(vec![]), Mode::Govern, PolicyConfig { budget: 0, ..c }, None)
            .is_err());
    }

    #[test]
    fn stale_and_unreachable_sockets_are_counted_not_fatal() {
        let dir = std::env::temp_dir().join(format!("zapvm-gov-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A socket file nobody listens on (a VMM that was killed left it behind).
        let path = dir.join("zapvm-dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let c = PolicyConfig { budget: 1 << 30, ..Default::default() };
        // In a directory: the VM is gone, and stays out while its file is there.
        let mut g = Governor::new(Fleet::Dir(dir.clone()), Mode::Govern, c.clone(), None).unwrap();
        let t = g.tick(|_, _| {});
        assert!(t.vms.is_empty());
        g.tick(|_, _| {});
        assert_eq!((g.metrics.vms, g.metrics.vms_left, g.metrics.vms_joined), (0, 1, 1), "{:?}", g.metrics);
        // Named on the command line: unreachable, counted every round.
        let mut g = Governor::new(Fleet::Sockets(vec![path.clone()]), Mode::Govern, c, None).unwrap();
        g.tick(|_, _| {});
        g.tick(|_, _| {});
        assert_eq!((g.metrics.vms, g.metrics.unreachable, g.metrics.vms_left), (1, 2, 0), "{:?}", g.metrics);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
