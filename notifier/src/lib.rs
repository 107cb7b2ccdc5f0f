//! Range-based invalidation of guest-RAM mappings (placeholder; see issue 4).
