//! KVM binary statistics (`KVM_GET_STATS_FD`) for the VM and its vCPUs.
