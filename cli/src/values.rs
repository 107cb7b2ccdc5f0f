//! The command line's names for the library's enums. The libraries know nothing of clap: each
//! enum an option takes has a mirror here that derives `clap::ValueEnum` (the value names are the
//! mirror's variant names in kebab case, or a `#[value(name)]`) and converts to the library's
//! type. The conversions are exhaustive matches, so a variant added on either side does not
//! compile until both agree.

use clap::ValueEnum;
use harness::bench_pressure::PressureBacking;
use vmm::memory::MemoryBackend;
use vmm::teardown::TeardownPolicy;

/// `--mem-backend`: [`MemoryBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MemoryBackendArg {
    /// Private anonymous memory.
    Anonymous,
    /// A memfd mapped shared.
    Memfd,
    /// A memfd of 2 MiB hugetlb pages mapped shared.
    Hugetlb,
}

impl From<MemoryBackendArg> for MemoryBackend {
    fn from(a: MemoryBackendArg) -> Self {
        match a {
            MemoryBackendArg::Anonymous => MemoryBackend::Anonymous,
            MemoryBackendArg::Memfd => MemoryBackend::Memfd,
            MemoryBackendArg::Hugetlb => MemoryBackend::Hugetlb,
        }
    }
}

/// `--on-external-unmap`: [`TeardownPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TeardownPolicyArg {
    /// Re-back the range with fresh zeroed memory at the same address and continue.
    Reback,
    /// Stop the VM with an error naming the range.
    Stop,
}

impl From<TeardownPolicyArg> for TeardownPolicy {
    fn from(a: TeardownPolicyArg) -> Self {
        match a {
            TeardownPolicyArg::Reback => TeardownPolicy::Reback,
            TeardownPolicyArg::Stop => TeardownPolicy::Stop,
        }
    }
}

/// `zapvm bench pressure --backings`: [`PressureBacking`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PressureBackingArg {
    /// Private anonymous memory in 4 KiB pages (THP not requested).
    #[value(name = "4k")]
    Small,
    /// Private anonymous memory with `MADV_HUGEPAGE`.
    Thp,
}

impl From<PressureBackingArg> for PressureBacking {
    fn from(a: PressureBackingArg) -> Self {
        match a {
            PressureBackingArg::Small => PressureBacking::Small,
            PressureBackingArg::Thp => PressureBacking::Thp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line's value names are the names the libraries give the same values (the
    /// JSON reports' lowercase names), so a name seen in a report can be typed back.
    #[test]
    fn value_names_match_the_libraries_names() {
        for a in MemoryBackendArg::value_variants() {
            let name = a.to_possible_value().unwrap().get_name().to_string();
            let lib = serde_json::to_value(MemoryBackend::from(*a)).unwrap();
            assert_eq!(lib, serde_json::json!(name));
        }
        for a in TeardownPolicyArg::value_variants() {
            let name = a.to_possible_value().unwrap().get_name().to_string();
            let lib = serde_json::to_value(TeardownPolicy::from(*a)).unwrap();
            assert_eq!(lib, serde_json::json!(name));
        }
        for a in PressureBackingArg::value_variants() {
            let name = a.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(PressureBacking::from(*a).name(), name);
        }
        assert_eq!(MemoryBackend::from(MemoryBackendArg::Anonymous), MemoryBackend::default());
        assert_eq!(TeardownPolicy::from(TeardownPolicyArg::Reback), TeardownPolicy::default());
    }
}
