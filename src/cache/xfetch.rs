//! The XFetch decision and its default random source.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand_xoshiro::SplitMix64;
use rand_xoshiro::rand_core::{RngCore, SeedableRng};

use crate::clock::Instant;

/// A function returning `u`, uniform in `(0.0, 1.0]`.
pub(crate) type RandomFn = Arc<dyn Fn() -> f64 + Send + Sync>;

/// The default random source: the SplitMix64 sequence (Steele, Lea, Flood, "Fast Splittable
/// Pseudorandom Number Generators", OOPSLA 2014, as implemented by `rand_xoshiro`) of a seed,
/// advanced with one atomic add per draw (no lock).
pub(crate) fn splitmix(seed: u64) -> RandomFn {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    let state = AtomicU64::new(seed);
    Arc::new(move || {
        let s = state.fetch_add(GAMMA, Ordering::Relaxed);
        let x = SplitMix64::seed_from_u64(s).next_u64();
        // 53 random bits, shifted into (0, 1].
        ((x >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    })
}

/// The largest `-ln(u)` over every positive `f64` `u` is 744.44 (`u` = 4.9e-324, the
/// smallest subnormal), so with `r` left a read can refresh early only if
/// `r <= 745 * beta * delta`.
const MAX_MINUS_LN_U: f64 = 745.0;

/// XFetch (Vattani, Chierichetti, Lowenstein, PVLDB 2015): whether a read at `now`, before
/// `expiry`, refreshes early: `now - delta * beta * ln(u) >= expiry`.
///
/// `u` is drawn only when some `u` in `(0, 1]` can trigger a refresh
/// (`r <= 745 * beta * delta`), so reads far from expiry cost no draw. A drawn `u` outside
/// `(0, 1]` (zero, negative, NaN, above 1) counts as `u = 1`: no early refresh.
#[inline]
pub(crate) fn xfetch(
    now: Instant,
    expiry: Instant,
    delta: Duration,
    beta: f64,
    random: &RandomFn,
) -> bool {
    if delta.is_zero() || now >= expiry {
        return false;
    }
    let r = (expiry - now).as_secs_f64();
    let scale = delta.as_secs_f64() * beta;
    if r > scale * MAX_MINUS_LN_U {
        return false;
    }
    let u = random();
    if !(u > 0.0 && u <= 1.0) {
        return false;
    }
    -scale * u.ln() >= r
}

/// The first instant at which a read of an entry stored at `stored`, expiring at `expiry`,
/// with `delta`, can refresh early: `expiry - 746 * beta * delta` (one unit of
/// `beta * delta` beyond [`xfetch`]'s bound, so float rounding never skips a read that could
/// refresh); `expiry` when `delta` is zero. Reads before it skip XFetch entirely; reads after
/// it run [`xfetch`], whose decision is exact.
///
/// Not clamped at `stored`: a read may come at an instant before the entry was stored (each
/// paused tokio runtime has its own clock), and XFetch's condition holds for it too. When
/// the subtraction leaves the clock's range, the window opens at the earliest instant found
/// below `stored` (halving steps), before any read a clock can give in practice.
pub(crate) fn window_start(
    stored: Instant,
    expiry: Instant,
    delta: Duration,
    beta: f64,
) -> Instant {
    if delta.is_zero() {
        return expiry;
    }
    let span = Duration::try_from_secs_f64(delta.as_secs_f64() * beta * (MAX_MINUS_LN_U + 1.0))
        .unwrap_or(Duration::MAX);
    expiry.checked_sub(span).unwrap_or_else(|| {
        (0..64)
            .rev()
            .find_map(|s| stored.checked_sub(Duration::from_secs(1 << s)))
            .unwrap_or(stored)
    })
}

/// `at + d`, saturating at about 30 years after `at` (tokio's own "far future") instead of
/// overflowing.
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests;
