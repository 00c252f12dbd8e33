//! Unit tests of XFetch's decision, its window and the random source.

use super::*;

/// With the seeded default source, the per-read refresh frequency at remaining time `r`
/// matches `exp(-r / (beta * delta))` within 5 binomial standard deviations
/// (`5 * sqrt(p (1 - p) / n)`, n = 20,000 reads per point; a false failure has
/// probability below 1e-6 per point).
#[test]
fn refresh_frequency_matches_exp_minus_r_over_beta_delta() {
    let delta = Duration::from_secs(2);
    let expiry = Instant::now() + Duration::from_secs(100);
    let n = 20_000u32;
    for beta in [1.0, 2.0] {
        let random = splitmix(42);
        for r_ms in [250u64, 1_000, 2_000, 4_000, 8_000] {
            let now = expiry - Duration::from_millis(r_ms);
            let hits = (0..n)
                .filter(|_| xfetch(now, expiry, delta, beta, &random))
                .count() as f64;
            let p = (-(r_ms as f64 / 1000.0) / (beta * 2.0)).exp();
            let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
            let freq = hits / n as f64;
            assert!(
                (freq - p).abs() <= tol,
                "beta {beta}, r {r_ms} ms: {freq} vs {p} ± {tol}"
            );
        }
    }
}

#[test]
fn u_is_in_the_half_open_unit_interval_and_seeded_sources_repeat() {
    let (a, b) = (splitmix(7), splitmix(7));
    for _ in 0..10_000 {
        let u = a();
        assert!(u > 0.0 && u <= 1.0);
        assert_eq!(u.to_bits(), b().to_bits());
    }
}

/// The precomputed window never skips a read that some `u` could refresh: with the
/// smallest positive `u` (-ln u = 744.4), a read 744 * beta * delta before expiry
/// refreshes, and it lies inside the window; 746 * beta * delta before, nothing can, and
/// the window opens about there.
#[test]
fn the_window_holds_every_read_that_could_refresh() {
    let tiny: RandomFn = Arc::new(|| f64::from_bits(1));
    let stored = Instant::now();
    let delta = Duration::from_millis(1_500);
    for beta in [0.001, 1.0, 3.0] {
        let scale = delta.mul_f64(beta);
        let expiry = stored + scale * 1_000;
        let window = window_start(stored, expiry, delta, beta);
        let could = expiry - scale * 744;
        assert!(window <= could, "beta {beta}");
        assert!(xfetch(could, expiry, delta, beta, &tiny), "beta {beta}");
        let never = expiry - scale * 746;
        assert!(!xfetch(never, expiry, delta, beta, &tiny), "beta {beta}");
        assert!(
            window > expiry - scale * 747,
            "beta {beta}: not needlessly early"
        );
    }
    // A window longer than the entry's life opens before it was stored: a read on
    // another runtime's clock, earlier, still runs XFetch.
    let expiry = stored + Duration::from_secs(10);
    assert_eq!(
        window_start(stored, expiry, delta, 1.0),
        expiry - delta * 746
    );
    // Past the clock's range: before any instant a read can have here.
    assert!(window_start(stored, expiry, delta, f64::MAX) < stored);
    assert_eq!(window_start(stored, expiry, Duration::ZERO, 1.0), expiry);
}

#[test]
fn far_from_expiry_or_zero_delta_draws_nothing() {
    let drawn = Arc::new(AtomicU64::new(0));
    let d = drawn.clone();
    let random: RandomFn = Arc::new(move || {
        d.fetch_add(1, Ordering::Relaxed);
        f64::MIN_POSITIVE
    });
    let expiry = Instant::now() + Duration::from_secs(1_000);
    let now = Instant::now();
    assert!(!xfetch(now, expiry, Duration::from_secs(1), 1.0, &random));
    assert!(!xfetch(now, expiry, Duration::ZERO, 1.0, &random));
    assert_eq!(drawn.load(Ordering::Relaxed), 0);
    assert!(xfetch(now, expiry, Duration::from_secs(2), 1.0, &random));
    assert_eq!(drawn.load(Ordering::Relaxed), 1);
}
