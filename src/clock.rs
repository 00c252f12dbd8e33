//! Time: tokio's clock and timers only.
//!
//! Every layer reads time through [`now`] and waits with tokio timers, never with
//! `std::time::Instant`, so tokio's paused clock (`#[tokio::test(start_paused = true)]`,
//! `tokio::time::advance`) drives every layer in tests. tokio rounds timer deadlines up to the
//! next millisecond: a deadline at 100.3 ms fires at the first timer tick at or after it.
//!
//! Reading the clock costs about 20 ns; layers read it on their happy path only where their
//! own semantics need it (or where the user opted into duration histograms).

pub use tokio::time::Instant;

/// The current instant on tokio's clock.
#[inline]
pub fn now() -> Instant {
    Instant::now()
}
