//! Cache stampede simulation on tokio's paused clock (virtual time: the run is instant and
//! its counts are exact): upstream calls per expiry and reads that waited, for a plain TTL
//! cache, our cache with coalescing only, and our cache with XFetch plus coalescing. Prints a
//! markdown table. `cargo bench --bench stampede`; the same counts are asserted in
//! `tests/stampede.rs`.

#[path = "common/stampede.rs"]
mod sim;

use sim::{PARAMS, SEED, Subject};

fn main() {
    // `cargo bench` passes `--bench`; a filter or other options are not used here.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let rows: Vec<_> = [
        Subject::PlainTtl,
        Subject::CoalescedOnly,
        Subject::XFetch { seed: SEED },
    ]
    .into_iter()
    .map(|s| (s, rt.block_on(sim::simulate(s, PARAMS))))
    .collect();
    println!("{}", sim::table(PARAMS, &rows));
    if let Some((_, xfetch)) = rows.last() {
        println!(
            "XFetch refresh instants (ms): {:?}",
            xfetch
                .wave_starts
                .iter()
                .map(|d| d.as_millis())
                .collect::<Vec<_>>()
        );
    }
}
