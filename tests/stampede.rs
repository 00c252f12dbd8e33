//! Cache stampede on tokio's paused clock: a hot key under steady reads across several
//! expiries, in front of (a) a plain TTL cache without coalescing, (b) our cache with early
//! refresh off so that only coalescing acts, (c) our cache with XFetch and coalescing. The
//! simulation and its parameters are in `benches/common/stampede.rs` (shared with
//! `cargo bench --bench stampede`, which prints the table).
#![cfg(feature = "cache")]

#[path = "../benches/common/stampede.rs"]
mod sim;

use std::time::Duration;

use sim::{PARAMS, Report, SEED, Subject};

/// Reads every 2 ms for 5.232 s, 10 at a time.
const READS: u64 = 2_616 * 10;
/// Reads in one recomputation window: the ticks at 0, 2, .., 20 ms after a miss (the value
/// is stored at 21 ms), 10 reads each.
const READS_PER_WINDOW: u64 = 11 * 10;
/// A plain TTL cache's waves: the cold fill at 0 ms, then every 1,042 ms: the last miss of
/// a wave (20 ms after its first) stores last, 41 ms after the wave began, so the value
/// expires at 1,041 ms and the next even tick misses.
const PLAIN_WAVES_AT: [u64; 6] = [0, 1_042, 2_084, 3_126, 4_168, 5_210];
/// With coalescing, the one call of a wave stores at 21 ms and the value expires at
/// 1,021 ms: a wave every 1,022 ms.
const COALESCED_WAVES_AT: [u64; 6] = [0, 1_022, 2_044, 3_066, 4_088, 5_110];

fn ms(list: &[u64]) -> Vec<Duration> {
    list.iter().map(|&m| Duration::from_millis(m)).collect()
}

#[tokio::test(start_paused = true)]
async fn plain_ttl_cache_sends_every_miss_of_an_expiry_upstream() {
    let r = sim::simulate(Subject::PlainTtl, PARAMS).await;
    assert_eq!(
        r,
        Report {
            waves: vec![READS_PER_WINDOW; 6],
            wave_starts: ms(&PLAIN_WAVES_AT),
            reads: READS,
            cold_waits: READS_PER_WINDOW,
            waits: 5 * READS_PER_WINDOW,
            longest_wait: Duration::from_millis(21),
        }
    );
    assert_eq!(r.calls_per_expiry(), (110, 110));
}

#[tokio::test(start_paused = true)]
async fn coalescing_alone_makes_one_call_per_expiry_but_readers_wait() {
    let r = sim::simulate(Subject::CoalescedOnly, PARAMS).await;
    assert_eq!(
        r,
        Report {
            waves: vec![1; 6],
            wave_starts: ms(&COALESCED_WAVES_AT),
            reads: READS,
            cold_waits: READS_PER_WINDOW,
            waits: 5 * READS_PER_WINDOW,
            longest_wait: Duration::from_millis(21),
        }
    );
    assert_eq!(r.calls_per_expiry(), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn xfetch_refreshes_once_before_each_expiry_and_no_reader_waits() {
    let r = sim::simulate(Subject::XFetch { seed: SEED }, PARAMS).await;
    // Only the cold fill makes anyone wait; every later wave is one early refresh, started
    // while the value was fresh and answered from the cache meanwhile.
    assert_eq!(r.cold_waits, READS_PER_WINDOW);
    assert_eq!(r.waits, 0);
    assert_eq!(r.longest_wait, Duration::ZERO);
    assert_eq!(r.calls_per_expiry(), (1, 1));
    assert_eq!(r.reads, READS);
    // Seeded: the cold fill and five early refreshes, one upstream call each.
    assert_eq!(r.waves, vec![1; 6]);
    // Each refresh starts while the value it replaces is fresh: before its expiry, which is
    // the TTL after the previous call ended (a recomputation after it began).
    for pair in r.wave_starts.windows(2) {
        let expiry = pair[0] + PARAMS.recompute + PARAMS.ttl;
        assert!(
            pair[1] < expiry,
            "refresh at {:?}, expiry {expiry:?}",
            pair[1]
        );
    }
}
