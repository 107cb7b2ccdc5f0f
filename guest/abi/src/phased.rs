//! The contract of [`crate::Workload::Phased`]: a working set that grows and shrinks over time.
//!
//! The host chooses the shape in [`PhaseParams`] (in [`crate::BootInfo::phase`]); both sides
//! compute the working set the guest wants at a given time with [`wanted_pages`], so that the
//! host can judge what the guest reports (and plot what it should have done). The guest reports
//! its state through the balloon's statistics queue: the standard tags (free memory, available
//! memory, disk caches, total memory) and the zapvm tags of [`tag`], which the VMM's balloon
//! passes through (`query-balloon`'s and `qom-get balloon0 guest-stats`' `stats` map, under
//! the names of [`tag_name`]).
//!
//! # The guest's pages
//! vCPU 0 drives the balloon over its slice (other vCPUs idle). Its slice is laid out as
//! [`phased_layout`] says: the carved pages of the balloon driver (queues, PFN arrays, the
//! statistics buffer), then one state byte per pool page, then the pool. The pool's pages are
//! always in four contiguous regions, in index order:
//!
//! | region | pages | content |
//! |---|---|---|
//! | used | `[0, U)` | the working set: holds [`crate::pattern`], verified pass after pass |
//! | cache | `[U, U + C)` | left the working set, kept (like a page cache): still the pattern |
//! | free | `[U + C, P - B)` | each either dirty (the pattern, not reported yet) or zero (reported, deflated, or never used) |
//! | balloon | `[P - B, P)` | given to the host |
//!
//! - The working set shrinks into the cache (`C` grows); the cache beyond
//!   [`PhaseParams::cache_pages`] overflows into free dirty pages, which the guest reports
//!   through free page reporting once the first of them has been free for
//!   [`PhaseParams::report_delay_ms`] (Linux reports after 2 s); reported pages must read zero
//!   when next used.
//! - The working set grows from the cache first (each page must still hold the pattern), then
//!   from free pages (dirty ones must hold the pattern, zero ones must read zero). When neither
//!   is left, the balloon holds the pages it wants: with DEFLATE_ON_OOM negotiated the guest
//!   deflates what it needs (counted in [`tag::OOM_DEFLATED_PAGES`]); without, it stalls (no
//!   work, only polls) until the host lowers the target, and counts the time in
//!   [`tag::STALL_US`].
//! - The balloon inflates from free pages first (the highest), then evicts cache pages; it
//!   never takes working-set pages, so `actual` stays below a target that would need them.
//!   Deflated pages are free and must read zero when used.
//! - Any page in the wrong state is a Failure ucall naming its address.

/// The working set's shape (all zero: not a phased guest).
///
/// The working set goes `low_pages` → `high_pages` over `ramp_ms`, stays high until half the
/// period, goes back down over `ramp_ms`, and stays low until the period ends; the guest's
/// clock starts `offset_ms` into the period.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseParams {
    /// Working set at the low phase, in pages.
    pub low_pages: u64,
    /// Working set at the high phase, in pages.
    pub high_pages: u64,
    /// Length of one cycle, milliseconds (0: always `high_pages`).
    pub period_ms: u64,
    /// Where in the cycle the guest starts, milliseconds.
    pub offset_ms: u64,
    /// Time of each ramp, milliseconds (at most half the period).
    pub ramp_ms: u64,
    /// Most pages kept in the cache after they left the working set.
    pub cache_pages: u64,
    /// How long free dirty pages wait before they are reported, milliseconds.
    pub report_delay_ms: u64,
    /// The guest's TSC frequency, kHz (the host fills it in).
    pub tsc_khz: u64,
}

/// The working set in pages that a guest of `params` wants `t_ms` milliseconds after it
/// started (see [`PhaseParams`]).
pub fn wanted_pages(params: &PhaseParams, t_ms: u64) -> u64 {
    let (low, high) = (params.low_pages, params.high_pages.max(params.low_pages));
    if params.period_ms == 0 {
        return high;
    }
    let period = params.period_ms;
    let half = period / 2;
    let ramp = params.ramp_ms.min(half);
    let x = (t_ms % period + params.offset_ms % period) % period;
    let span = high - low;
    let along = |done: u64| (span * done.min(ramp)).checked_div(ramp).unwrap_or(span);
    if x < half {
        low + along(x)
    } else {
        high - along(x - half)
    }
}

/// Where the pages of a phased vCPU's slice go (indices in the slice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhasedLayout {
    /// First state page (one byte per pool page).
    pub state_first: u64,
    /// State pages.
    pub state_pages: u64,
    /// First pool page.
    pub pool_first: u64,
    /// Pool pages (`P`).
    pub pool_pages: u64,
}

/// Pages the balloon driver keeps at the start of a phased slice (queues, PFN arrays, stats).
pub const PHASED_DRIVER_PAGES: u64 = 6;

/// The layout of a phased slice of `pages` pages (`None` when it has no room for a pool).
pub fn phased_layout(pages: u64) -> Option<PhasedLayout> {
    let rest = pages.checked_sub(PHASED_DRIVER_PAGES)?;
    // s state pages cover s * 4096 pool pages: the smallest s with s * 4096 >= rest - s.
    let state_pages = rest.div_ceil(crate::PAGE_SIZE + 1);
    let pool_pages = rest - state_pages;
    (pool_pages > 0).then_some(PhasedLayout {
        state_first: PHASED_DRIVER_PAGES,
        state_pages,
        pool_first: PHASED_DRIVER_PAGES + state_pages,
        pool_pages,
    })
}

/// zapvm's statistics tags (beyond the virtio specification's; the VMM passes every tag
/// through). Values are cumulative since boot unless they say otherwise.
pub mod tag {
    /// Bytes in the working set now (`U`).
    pub const WORKING_SET: u16 = 0x5a00;
    /// Bytes the working set wants now ([`super::wanted_pages`]); above `WORKING_SET` while the
    /// guest stalls.
    pub const WANTED: u16 = 0x5a01;
    /// Microseconds the guest wanted pages the balloon held (cumulative).
    pub const STALL_US: u16 = 0x5a02;
    /// Pages verified (cumulative): the guest's work.
    pub const VERIFIED_PAGES: u16 = 0x5a03;
    /// Pages the guest deflated on its own to grow its working set (cumulative).
    pub const OOM_DEFLATED_PAGES: u16 = 0x5a04;
    /// Pages reported through free page reporting (cumulative).
    pub const REPORTED_PAGES: u16 = 0x5a05;
    /// Pages in the balloon now, as the guest counts them.
    pub const BALLOON_PAGES: u16 = 0x5a06;
}

/// The name the VMM shows for a [`tag`] (`None` for any other tag).
pub fn tag_name(t: u16) -> Option<&'static str> {
    Some(match t {
        tag::WORKING_SET => "zapvm_working_set",
        tag::WANTED => "zapvm_wanted",
        tag::STALL_US => "zapvm_stall_us",
        tag::VERIFIED_PAGES => "zapvm_verified_pages",
        tag::OOM_DEFLATED_PAGES => "zapvm_oom_deflated_pages",
        tag::REPORTED_PAGES => "zapvm_reported_pages",
        tag::BALLOON_PAGES => "zapvm_balloon_pages",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_set_ramps_holds_and_falls() {
        let p = PhaseParams {
            low_pages: 100,
            high_pages: 300,
            period_ms: 1000,
            ramp_ms: 100,
            ..Default::default()
        };
        assert_eq!(wanted_pages(&p, 0), 100);
        assert_eq!(wanted_pages(&p, 50), 200);
        assert_eq!(wanted_pages(&p, 100), 300);
        assert_eq!(wanted_pages(&p, 499), 300);
        assert_eq!(wanted_pages(&p, 550), 200);
        assert_eq!(wanted_pages(&p, 600), 100);
        assert_eq!(wanted_pages(&p, 999), 100);
        assert_eq!(wanted_pages(&p, 1050), 200);
        let shifted = PhaseParams { offset_ms: 500, ..p };
        assert_eq!(wanted_pages(&shifted, 0), 300);
        assert_eq!(wanted_pages(&shifted, 100), 100);
        assert_eq!(wanted_pages(&PhaseParams { period_ms: 0, ..p }, 7), 300);
        assert_eq!(wanted_pages(&PhaseParams { ramp_ms: 0, ..p }, 1), 300);
    }

    #[test]
    fn the_layout_covers_the_slice_and_the_states_fit() {
        // The driver's pages, then one state page and one pool page at least.
        assert_eq!(phased_layout(PHASED_DRIVER_PAGES), None);
        assert_eq!(phased_layout(PHASED_DRIVER_PAGES + 1), None);
        for pages in [8u64, 100, 4103, 4104, 4105, 262_144, 1 << 20] {
            let l = phased_layout(pages).unwrap();
            assert_eq!(l.state_first, PHASED_DRIVER_PAGES);
            assert_eq!(l.state_first + l.state_pages, l.pool_first, "{pages}: {l:?}");
            assert_eq!(l.pool_first + l.pool_pages, pages);
            assert!(l.state_pages * crate::PAGE_SIZE >= l.pool_pages, "{pages}: {l:?}");
            // No larger pool fits: one state page fewer would not cover the pages left over.
            let fewer = l.state_pages - 1;
            assert!(fewer * crate::PAGE_SIZE < pages - PHASED_DRIVER_PAGES - fewer, "{pages}: {l:?}");
        }
        assert_eq!(tag_name(tag::STALL_US), Some("zapvm_stall_us"));
        assert_eq!(tag_name(3), None);
    }
}
