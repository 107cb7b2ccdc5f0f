//! The governor's decision: per-VM observations in, balloon targets and their reasons out. Pure
//! (no I/O, no clock), so that every rule is unit-tested here.
//!
//! # The rule
//! Each VM gets an *allowance*: the guest RAM it may keep outside its balloon (RAM minus
//! balloon). What it needs is its working set (the larger of what it has and what it wants, from
//! the phased guest's statistics; otherwise RAM minus available memory) plus headroom, never less
//! than the floor, never more than its RAM. The guests' share of the budget is the budget (cut
//! while the host reports memory pressure) minus each VM's resident memory beyond its guest RAM
//! (the VMM's own), which the balloon cannot take.
//!
//! - G1. A VM whose need rose above its allowance gets it at once (`Grow`): a guest that wants
//!   pages the balloon holds stalls, so giving back is never delayed. A growing working set
//!   needs what it will have grown by before the next decision reaches it as well
//!   (`growth_per_s` x `lookahead_s`).
//! - G2. A VM whose allowance exceeds its need by more than the hysteresis is cut to its need
//!   (`Reclaim`): memory it does not use goes back to the host. Within the hysteresis the
//!   target stays (`Hold`), so small changes of the working set do not move the balloon.
//! - G3. When the allowances together exceed the guests' share, they are cut (`Squeeze`): first
//!   the VMs with the most free memory (allowance above need) down to their need, then every VM
//!   in proportion to its need above the floor, never below the floor.
//! - G4. When even the floors exceed the share, every VM is at its floor (`Floor`) and the
//!   decision says so (`over_budget_floors`): the budget cannot be kept, and that is reported
//!   rather than hidden.
//! - G6. What the share leaves beyond a reserve (`reserve_fraction`) lets VMs that G2 or G3
//!   would cut keep what they hold, evenly, up to their current allowance: memory taken back
//!   costs a refault when the working set grows again, so it is taken only when the budget
//!   needs it for another VM (then G3 takes it, the most free first).
//! - G5. A VM that did not answer keeps its allowance (`Unreachable`): its resident memory is
//!   counted in the total and nothing is sent to it.

use serde::Serialize;

/// One MiB.
const MIB: u64 = 1 << 20;

/// What the governor knows about one VM at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VmObservation {
    /// The VM's name (its socket's).
    pub name: String,
    /// Whether it answered this round.
    pub reachable: bool,
    /// Guest RAM (the balloon's base), bytes.
    pub ram: u64,
    /// The VMM process's resident memory, bytes.
    pub resident: u64,
    /// The balloon's target and what the guest says it holds, bytes.
    pub balloon_target: u64,
    /// See `balloon_target`.
    pub balloon_actual: u64,
    /// The guest's working set (zapvm's statistics tag), bytes.
    pub working_set: Option<u64>,
    /// What the working set wants (above `working_set` while the guest stalls), bytes.
    pub wanted: Option<u64>,
    /// Free memory the guest reports, bytes.
    pub free: Option<u64>,
    /// Available memory the guest reports (free plus reclaimable cache), bytes.
    pub available: Option<u64>,
    /// Microseconds the guest stalled for memory (cumulative).
    pub stall_us: Option<u64>,
    /// How fast the working set grows, bytes per second (0 when it does not).
    pub growth_per_s: f64,
}

/// The policy's settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyConfig {
    /// The resident total to stay under, bytes.
    pub budget: u64,
    /// The least allowance any VM gets, bytes.
    pub floor: u64,
    /// Headroom over the working set: the larger of this many bytes...
    pub headroom: u64,
    /// ...and this fraction of the working set.
    pub headroom_fraction: f64,
    /// Allowance changes smaller than this are not made (G2), bytes.
    pub hysteresis: u64,
    /// A growing working set gets what it grows by in this many seconds on top (G1): the
    /// time its statistics and the next round take to show the growth.
    pub lookahead_s: f64,
    /// The fraction of the budget kept while the host reports memory pressure (PSI above
    /// `psi_threshold`).
    pub pressure_cut: f64,
    /// PSI `some avg10` (percent) above which the host counts as under pressure.
    pub psi_threshold: f64,
    /// The fraction of the guests' share G6 leaves unused, for growth between two rounds.
    pub reserve_fraction: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            budget: 0,
            floor: 64 * MIB,
            headroom: 32 * MIB,
            headroom_fraction: 0.08,
            hysteresis: 16 * MIB,
            lookahead_s: 1.5,
            pressure_cut: 0.9,
            psi_threshold: 10.0,
            reserve_fraction: 0.05,
        }
    }
}

/// What the host says about its memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HostObservation {
    /// PSI memory `some avg10`, percent (`/proc/pressure/memory`), where the host has it.
    pub psi_some_avg10: Option<f64>,
    /// The memory cgroup's limit, bytes, where one is watched.
    pub cgroup_limit: Option<u64>,
}

/// Why a VM's target is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// G1: its need rose above its allowance.
    Grow,
    /// G2: it kept more than it needs.
    Reclaim,
    /// G2: within the hysteresis.
    Hold,
    /// G3: cut to fit the budget.
    Squeeze,
    /// G4: at its floor, the floors exceed the budget.
    Floor,
    /// G5: it did not answer.
    Unreachable,
}

/// The decision for one VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmDecision {
    /// The VM.
    pub name: String,
    /// The balloon target, bytes (RAM minus allowance, whole MiB).
    pub balloon_target: u64,
    /// The allowance, bytes.
    pub allowance: u64,
    /// What the VM needs, bytes.
    pub need: u64,
    /// Why.
    pub reason: Reason,
    /// Whether the target differs from the current one (a command to send).
    pub changed: bool,
}

/// The decision for the fleet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// Per VM, in the observations' order.
    pub vms: Vec<VmDecision>,
    /// The budget in force (cut under pressure, capped by the cgroup), bytes.
    pub effective_budget: u64,
    /// What the guests may have together: the budget minus the VMMs' own memory.
    pub guest_share: u64,
    /// G4: the floors alone exceed the share.
    pub over_budget_floors: bool,
    /// The host counted as under memory pressure.
    pub host_pressure: bool,
}

/// Checks the settings against the fleet's size: a budget the floors of `vms` VMs exceed is an
/// error (the governor refuses to start with it).
pub fn check_config(config: &PolicyConfig, vms: usize) -> Result<(), String> {
    if config.budget == 0 {
        return Err("the budget is 0".into());
    }
    let floors = config.floor.saturating_mul(vms as u64);
    if floors > config.budget {
        return Err(format!(
            "the budget {} MiB is smaller than the floors of {vms} VMs ({} MiB each, {} MiB together)",
            config.budget / MIB,
            config.floor / MIB,
            floors / MIB
        ));
    }
    if !(config.headroom_fraction >= 0.0 && config.headroom_fraction < 1.0) {
        return Err(format!("headroom fraction {} is not in [0, 1)", config.headroom_fraction));
    }
    Ok(())
}

/// What `vm` needs: working set (or what it wants, if more) plus headroom, within [floor, RAM].
pub fn need(config: &PolicyConfig, vm: &VmObservation) -> Option<u64> {
    let ws = match (vm.working_set, vm.wanted) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => vm.ram.checked_sub(vm.balloon_actual)?.checked_sub(vm.available?)?,
    };
    let headroom = config.headroom.max((ws as f64 * config.headroom_fraction) as u64);
    let growth = (vm.growth_per_s.max(0.0) * config.lookahead_s) as u64;
    Some((ws + headroom + growth).max(config.floor).min(vm.ram))
}

/// The decision (see the module docs).
pub fn decide(config: &PolicyConfig, host: &HostObservation, vms: &[VmObservation]) -> Decision {
    let host_pressure = host.psi_some_avg10.is_some_and(|p| p > config.psi_threshold);
    let mut budget = config.budget;
    if let Some(limit) = host.cgroup_limit {
        budget = budget.min(limit);
    }
    if host_pressure {
        budget = (budget as f64 * config.pressure_cut) as u64;
    }
    // The VMMs' own memory: resident beyond the guest memory it may hold (its allowance).
    let current: Vec<u64> = vms.iter().map(|v| v.ram.saturating_sub(v.balloon_target)).collect();
    let overhead: u64 =
        vms.iter().zip(&current).map(|(v, a)| v.resident.saturating_sub(*a).min(256 * MIB)).sum();
    // Unreachable VMs keep what they hold (G5): their resident memory is out of the share.
    let fixed: u64 =
        vms.iter().zip(&current).filter(|(v, _)| !v.reachable).map(|(v, a)| v.resident.min(*a)).sum();
    let share = budget.saturating_sub(overhead).saturating_sub(fixed);

    let needs: Vec<u64> = vms
        .iter()
        .zip(&current)
        .map(|(v, cur)| need(config, v).unwrap_or(*cur).max(config.floor.min(v.ram)))
        .collect();
    let mut allowance = vec![0u64; vms.len()];
    let mut reason = vec![Reason::Hold; vms.len()];
    for i in 0..vms.len() {
        let (v, cur, n) = (&vms[i], current[i], needs[i]);
        (allowance[i], reason[i]) = if !v.reachable {
            (cur, Reason::Unreachable)
        } else if n > cur {
            (n, Reason::Grow) // G1
        } else if cur - n > config.hysteresis {
            (n, Reason::Reclaim) // G2
        } else {
            (cur, Reason::Hold)
        };
    }
    let live: Vec<usize> = (0..vms.len()).filter(|&i| vms[i].reachable).collect();
    let total = |a: &[u64]| live.iter().map(|&i| a[i]).sum::<u64>();
    let floors: u64 = live.iter().map(|&i| config.floor.min(vms[i].ram)).sum();
    let over_budget_floors = floors > share;
    if over_budget_floors {
        for &i in &live {
            allowance[i] = config.floor.min(vms[i].ram);
            reason[i] = Reason::Floor; // G4
        }
    } else if total(&allowance) > share {
        // G3, first: the most free memory (allowance above need) first, down to the need.
        let mut by_free: Vec<usize> = live.clone();
        by_free.sort_by_key(|&i| std::cmp::Reverse(allowance[i].saturating_sub(needs[i])));
        for &i in &by_free {
            let excess = total(&allowance).saturating_sub(share);
            if excess == 0 {
                break;
            }
            let spare = allowance[i].saturating_sub(needs[i]).min(excess);
            if spare > 0 {
                allowance[i] -= spare;
                reason[i] = Reason::Squeeze;
            }
        }
        // Then in proportion to the need above the floor.
        let excess = total(&allowance).saturating_sub(share);
        if excess > 0 {
            let above: u64 = live.iter().map(|&i| allowance[i] - config.floor.min(vms[i].ram)).sum();
            for &i in &live {
                let a = allowance[i] - config.floor.min(vms[i].ram);
                let cut = ((a as u128 * excess as u128).div_ceil(above.max(1) as u128) as u64).min(a);
                if cut > 0 {
                    allowance[i] -= cut;
                    reason[i] = Reason::Squeeze;
                }
            }
        }
    }
    // G6: what the share leaves (less the reserve) lets VMs that were to give memory back keep
    // it, evenly, up to what they have: memory taken back costs a refault when the working set
    // grows again, so it is taken only when the budget needs it.
    if !over_budget_floors {
        let room = share.saturating_sub((share as f64 * config.reserve_fraction) as u64);
        let mut spare = room.saturating_sub(total(&allowance));
        loop {
            let keen: Vec<usize> = live.iter().copied().filter(|&i| allowance[i] < current[i]).collect();
            if spare < MIB || keen.is_empty() {
                break;
            }
            let each = (spare / keen.len() as u64).max(MIB);
            for &i in &keen {
                let give = each.min(current[i] - allowance[i]).min(spare);
                allowance[i] += give;
                spare -= give;
                if allowance[i] == current[i] {
                    reason[i] = Reason::Hold;
                }
            }
        }
    }
    let decisions = vms
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // Whole MiB of balloon, rounded so that the allowance is not exceeded.
            let target = v.ram.saturating_sub(allowance[i]).div_ceil(MIB) * MIB;
            let target = if reason[i] == Reason::Unreachable { v.balloon_target } else { target.min(v.ram) };
            VmDecision {
                name: v.name.clone(),
                balloon_target: target,
                allowance: v.ram - target,
                need: needs[i],
                reason: reason[i],
                changed: reason[i] != Reason::Unreachable && target != v.balloon_target,
            }
        })
        .collect();
    Decision {
        vms: decisions,
        effective_budget: budget,
        guest_share: share,
        over_budget_floors,
        host_pressure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, ram_mib: u64, target_mib: u64, ws_mib: u64) -> VmObservation {
        VmObservation {
            name: name.into(),
            reachable: true,
            ram: ram_mib * MIB,
            resident: (ram_mib - target_mib).min(ws_mib + 40) * MIB + 10 * MIB,
            balloon_target: target_mib * MIB,
            balloon_actual: target_mib * MIB,
            working_set: Some(ws_mib * MIB),
            wanted: Some(ws_mib * MIB),
            free: None,
            available: None,
            stall_us: None,
            growth_per_s: 0.0,
        }
    }

    fn config(budget_mib: u64) -> PolicyConfig {
        PolicyConfig { budget: budget_mib * MIB, ..Default::default() }
    }

    #[test]
    fn spare_budget_lets_a_shrinking_vm_keep_its_memory_until_another_needs_it() {
        let c = config(2048);
        // Alone under a large budget: a keeps what it has (G6).
        let d = decide(&c, &HostObservation::default(), &[vm("a", 1024, 0, 100)]);
        assert_eq!((d.vms[0].reason, d.vms[0].changed), (Reason::Hold, false), "{d:?}");
        // b grows: a gives what b needs, no more (the reserve stays unused).
        let d = decide(&c, &HostObservation::default(), &[vm("a", 1024, 0, 100), vm("b", 1024, 1000, 900)]);
        assert_eq!(d.vms[1].reason, Reason::Grow);
        assert!(d.vms[0].allowance < 1024 * MIB && d.vms[0].allowance > 132 * MIB, "{d:?}");
        let total: u64 = d.vms.iter().map(|v| v.allowance).sum();
        let room = d.guest_share - (d.guest_share as f64 * c.reserve_fraction) as u64;
        assert!(total <= room + MIB && total + 4 * MIB >= room, "{total} vs {room}: {d:?}");
    }

    #[test]
    fn idle_memory_is_reclaimed_and_growth_is_given_back() {
        let c = PolicyConfig { reserve_fraction: 0.99, ..config(2048) };
        let d = decide(&c, &HostObservation::default(), &[vm("a", 1024, 0, 100), vm("b", 1024, 800, 400)]);
        assert_eq!(d.vms[0].reason, Reason::Reclaim);
        assert_eq!(d.vms[0].allowance, need(&c, &vm("a", 1024, 0, 100)).unwrap().div_ceil(MIB) * MIB);
        assert!(d.vms[0].balloon_target > 800 * MIB && d.vms[0].changed);
        assert_eq!(d.vms[1].reason, Reason::Grow);
        assert!(d.vms[1].allowance >= 400 * MIB + c.headroom);
        assert!(!d.over_budget_floors);
    }

    #[test]
    fn hysteresis_holds_small_changes() {
        let c = PolicyConfig { reserve_fraction: 0.99, ..config(2048) };
        // Need = 200 + 32 headroom = 232; allowance 240: within 16 MiB.
        let d = decide(&c, &HostObservation::default(), &[vm("a", 1024, 784, 200)]);
        assert_eq!(d.vms[0].reason, Reason::Hold);
        assert!(!d.vms[0].changed);
        // 300 MiB over: reclaimed.
        let d = decide(&c, &HostObservation::default(), &[vm("a", 1024, 484, 200)]);
        assert_eq!(d.vms[0].reason, Reason::Reclaim);
    }

    #[test]
    fn over_budget_takes_from_the_most_free_first_then_proportionally_above_floors() {
        let c = PolicyConfig { hysteresis: 1 << 40, ..config(1024) };
        // a holds 1024 with a need of ~140 (huge hysteresis: no Reclaim), b grows to 700.
        let vms = [vm("a", 1024, 0, 100), vm("b", 1024, 600, 700)];
        let d = decide(&c, &HostObservation::default(), &vms);
        assert_eq!(d.vms[0].reason, Reason::Squeeze);
        let total: u64 = d.vms.iter().map(|v| v.allowance).sum();
        assert!(total <= d.guest_share + 2 * MIB, "{d:?}");
        // a went down to its need before b lost anything.
        assert_eq!(d.vms[1].allowance, need(&c, &vms[1]).unwrap().div_ceil(MIB) * MIB, "{d:?}");
        // Both need more than the share: proportional cuts, never below the floor.
        let vms = [vm("a", 1024, 0, 900), vm("b", 1024, 0, 900)];
        let d = decide(&c, &HostObservation::default(), &vms);
        assert!(d.vms.iter().all(|v| v.reason == Reason::Squeeze && v.allowance >= c.floor), "{d:?}");
        let total: u64 = d.vms.iter().map(|v| v.allowance).sum();
        assert!(total <= d.guest_share + 2 * MIB && total + 4 * MIB >= d.guest_share, "{d:?}");
    }

    #[test]
    fn floors_above_the_budget_are_reported_not_hidden() {
        let c = config(150);
        assert!(check_config(&c, 3).unwrap_err().contains("smaller than the floors"));
        assert!(check_config(&c, 2).is_ok());
        // At run time (VMs that joined later, a cgroup limit that fell): reported, at the floors.
        let d =
            decide(&config(100), &HostObservation::default(), &[vm("a", 256, 0, 200), vm("b", 256, 0, 200)]);
        assert!(d.over_budget_floors);
        assert!(d.vms.iter().all(|v| v.reason == Reason::Floor && v.allowance == c.floor));
        assert!(check_config(&PolicyConfig { budget: 0, ..c }, 1).is_err());
    }

    #[test]
    fn an_unreachable_vm_keeps_its_target_and_counts() {
        let c = config(1024);
        let mut b = vm("b", 1024, 0, 600);
        b.reachable = false;
        b.resident = 700 * MIB;
        let d = decide(&c, &HostObservation::default(), &[vm("a", 1024, 0, 600), b]);
        assert_eq!(d.vms[1].reason, Reason::Unreachable);
        assert!(!d.vms[1].changed && d.vms[1].balloon_target == 0);
        // a gets what is left after b's 700 MiB.
        assert!(d.vms[0].allowance <= 1024 * MIB - 700 * MIB, "{d:?}");
    }

    #[test]
    fn host_pressure_and_the_cgroup_cut_the_budget() {
        let c = config(2048);
        let host = HostObservation { psi_some_avg10: Some(50.0), cgroup_limit: Some(1024 * MIB) };
        let d = decide(&c, &host, &[vm("a", 1024, 0, 100)]);
        assert!(d.host_pressure);
        assert_eq!(d.effective_budget, (1024.0 * MIB as f64 * 0.9) as u64);
        let d = decide(&c, &HostObservation { psi_some_avg10: Some(1.0), cgroup_limit: None }, &[]);
        assert!(!d.host_pressure && d.effective_budget == 2048 * MIB);
    }

    #[test]
    fn without_guest_statistics_the_need_comes_from_available_memory() {
        let c = config(2048);
        let mut v = vm("a", 1024, 0, 0);
        v.working_set = None;
        v.wanted = None;
        assert_eq!(need(&c, &v), None);
        v.available = Some(824 * MIB);
        assert_eq!(need(&c, &v), Some(232 * MIB));
        // Growing at 100 MiB/s: 1.5 s of growth on top.
        v.growth_per_s = 100.0 * MIB as f64;
        assert_eq!(need(&c, &v), Some(382 * MIB));
    }
}
