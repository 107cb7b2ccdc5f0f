//! zapvm VMM (placeholder)
