//! x86_64 machine setup: descriptor tables, identity page tables, vCPU registers.

pub mod cpu;
pub mod gdt;
pub mod paging;
