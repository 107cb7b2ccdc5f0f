//! x86_64 machine setup: the guest-physical map ([`layout`]), descriptor tables, identity page
//! tables, vCPU registers.

pub mod cpu;
pub mod gdt;
pub mod layout;
pub mod paging;
