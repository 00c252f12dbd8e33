//! The GCRA arithmetic on one `AtomicU64` holding the theoretical arrival time (TAT), in
//! nanoseconds since the limiter's base instant. See the [module docs](super#the-algorithm).

#[cfg(all(loom, test))]
use loom::sync::atomic::AtomicU64;
#[cfg(not(all(loom, test)))]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

/// The parameters of one limiter, all in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gcra {
    /// Emission interval `T` = period / rate, rounded up to whole nanoseconds (>= 1).
    pub(super) interval: u64,
    /// Burst tolerance `tau` = `T * (burst - 1)`.
    pub(super) tau: u64,
    /// Longest wait a caller accepts; 0 in reject mode.
    pub(super) max_wait: u64,
}

/// How long (ns since the base instant) every TAT of a limiter is guaranteed to fit in a
/// `u64`: 100 years of 365 days. `build()` requires `T + tau + max_wait <= u64::MAX -
/// HORIZON`; a TAT never exceeds `t + tau + max_wait + T` for the `t` of the reservation that
/// set it, so for `t <= HORIZON` no reservation can overflow.
pub(super) const HORIZON: u64 = 100 * 365 * 86_400 * 1_000_000_000;

/// The result of one reservation attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reserve {
    /// Conforming at `t`: the slot is taken.
    Now,
    /// Conforming at `emission` > `t`, within the maximum wait: the slot is taken; the TAT
    /// this reservation set is `tat` and the one it replaced is `prev` (needed to give the
    /// slot back).
    Wait { emission: u64, tat: u64, prev: u64 },
    /// Not conforming within the maximum wait (or, past the [`HORIZON`], conforming but with
    /// a new TAT that does not fit in a `u64`); nothing changed. `wait` is the time from `t`
    /// until a call would conform.
    Reject { wait: u64 },
}

/// The state of one limiter (or of one key): the TAT.
#[derive(Debug, Default)]
pub(super) struct Cell {
    tat: AtomicU64,
}

impl Cell {
    /// The current TAT.
    #[inline]
    pub(super) fn tat(&self) -> u64 {
        self.tat.load(Ordering::Acquire)
    }

    /// Reserves the next slot for a call at `t` (ns since base).
    ///
    /// The emission time of a call at `t` is `e = max(t, TAT - tau)`; it is accepted when
    /// `e - t <= max_wait`, and then `TAT = max(TAT, t) + T` (one CAS; retried if another
    /// caller changed TAT in between). A rejected call changes nothing.
    ///
    /// Nothing saturates: a new TAT that does not fit in a `u64` (possible only for
    /// `t > HORIZON`, see [`HORIZON`]) rejects the call instead of clamping the TAT, which
    /// would put every later waiter on the same instant and break give-backs.
    #[inline]
    pub(super) fn reserve(&self, g: &Gcra, t: u64) -> Reserve {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let emission = t.max(tat.saturating_sub(g.tau));
            let wait = emission - t;
            if wait > g.max_wait {
                return Reserve::Reject { wait };
            }
            let Some(new) = tat.max(t).checked_add(g.interval) else {
                return Reserve::Reject { wait };
            };
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if wait == 0 => return Reserve::Now,
                Ok(prev) => {
                    return Reserve::Wait {
                        emission,
                        tat: new,
                        prev,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Gives back the slot of a reservation that replaced TAT `prev` by `tat`, if it is still
    /// the latest one (TAT unchanged since): TAT goes back to exactly `prev`, as if the
    /// reservation had never been made. Returns whether it did.
    pub(super) fn give_back(&self, tat: u64, prev: u64) -> bool {
        self.tat
            .compare_exchange(tat, prev, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

impl Gcra {
    /// Nanoseconds from `t` until a call would conform, for a limiter whose TAT is `tat`.
    #[inline]
    pub(super) fn wait_at(&self, tat: u64, t: u64) -> u64 {
        tat.saturating_sub(self.tau).saturating_sub(t)
    }

    /// Calls that would conform at once at `t`, back to back, for TAT `tat`: in `0..=burst`.
    /// One division (it runs on every call of a direct limiter whose metrics are on).
    #[inline]
    pub(super) fn available_at(&self, tat: u64, t: u64) -> u64 {
        // The k-th call (k >= 1) conforms when t >= TAT + (k - 1) T - tau, that is when
        // (k - 1) T <= slack = t + tau - TAT; and k <= burst = tau / T + 1.
        match t.saturating_add(self.tau).checked_sub(tat) {
            None => 0,
            // slack >= tau: at least burst conform (floor division is monotonic).
            Some(slack) if slack >= self.tau => self.tau / self.interval + 1,
            // slack < tau: slack / T <= tau / T, so this is at most the burst.
            Some(slack) => slack / self.interval + 1,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const G: Gcra = Gcra {
        interval: 10,
        tau: 20,
        max_wait: 0,
    };

    #[test]
    fn burst_then_spacing() {
        let c = Cell::default();
        // burst = tau / T + 1 = 3 conforming calls at t = 100.
        for _ in 0..3 {
            assert_eq!(c.reserve(&G, 100), Reserve::Now);
        }
        assert_eq!(c.tat(), 130);
        assert_eq!(c.reserve(&G, 100), Reserve::Reject { wait: 10 });
        assert_eq!(c.tat(), 130, "a rejection changes nothing");
        assert_eq!(c.reserve(&G, 109), Reserve::Reject { wait: 1 });
        assert_eq!(c.reserve(&G, 110), Reserve::Now);
        assert_eq!(G.available_at(c.tat(), 110), 0);
        assert_eq!(G.available_at(c.tat(), 120), 1);
        assert_eq!(G.available_at(c.tat(), 1_000), 3);
    }

    /// `available_at` is exactly the number of back-to-back reservations that conform.
    #[test]
    fn available_is_the_number_of_calls_that_would_conform() {
        for (interval, tau) in [(10, 20), (10, 25), (1, 0), (7, 0), (3, 299)] {
            let g = Gcra {
                interval,
                tau,
                max_wait: 0,
            };
            for tat in 0..200 {
                for t in 0..200 {
                    let c = Cell::default();
                    c.tat.store(tat, Ordering::Relaxed);
                    let mut n = 0;
                    while c.reserve(&g, t) == Reserve::Now {
                        n += 1;
                    }
                    assert_eq!(
                        g.available_at(tat, t),
                        n,
                        "T {interval} tau {tau} {tat} {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn waits_and_gives_back_only_the_latest_reservation() {
        let g = Gcra { max_wait: 25, ..G };
        let c = Cell::default();
        for _ in 0..3 {
            assert_eq!(c.reserve(&g, 0), Reserve::Now);
        }
        let a = c.reserve(&g, 0);
        assert_eq!(
            a,
            Reserve::Wait {
                emission: 10,
                tat: 40,
                prev: 30
            }
        );
        let b = c.reserve(&g, 0);
        assert_eq!(
            b,
            Reserve::Wait {
                emission: 20,
                tat: 50,
                prev: 40
            }
        );
        assert_eq!(c.reserve(&g, 0), Reserve::Reject { wait: 30 });
        // `a` is not the latest: its slot stays taken.
        assert!(!c.give_back(40, 30));
        // `b` then `a`, in reverse order: both come back.
        assert!(c.give_back(50, 40));
        assert!(c.give_back(40, 30));
        assert_eq!(c.tat(), 30);
    }

    #[test]
    fn a_tat_that_would_not_fit_rejects_and_never_saturates() {
        let g = Gcra {
            interval: u64::MAX / 2,
            tau: 0,
            max_wait: u64::MAX / 2,
        };
        let c = Cell::default();
        let t = 10;
        assert_eq!(c.reserve(&g, t), Reserve::Now);
        assert_eq!(c.tat(), t + u64::MAX / 2);
        // The next slot is T away (within max_wait), but its TAT would pass u64::MAX.
        assert_eq!(c.reserve(&g, t), Reserve::Reject { wait: u64::MAX / 2 });
        assert_eq!(c.tat(), t + u64::MAX / 2, "a rejection changes nothing");
    }
}

/// Model checks of the CAS protocol under every interleaving (loom):
/// `RUSTFLAGS="--cfg loom" cargo test --lib --features rate-limit rate_limit::gcra::loom`.
#[cfg(all(test, loom))]
mod loom_checks {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    const G: Gcra = Gcra {
        interval: 10,
        tau: 0,
        max_wait: 100,
    };

    /// Two concurrent calls at the same instant with burst 1: one is admitted now, the other
    /// is given the next emission time; never both now, never the same slot.
    #[test]
    fn concurrent_reservations_take_distinct_slots() {
        loom::model(|| {
            let cell = Arc::new(Cell::default());
            let c2 = cell.clone();
            let h = thread::spawn(move || c2.reserve(&G, 5));
            let a = cell.reserve(&G, 5);
            let b = h.join().unwrap();
            let mut got = [a, b];
            got.sort_by_key(|r| matches!(r, Reserve::Wait { .. }));
            assert_eq!(
                got,
                [
                    Reserve::Now,
                    Reserve::Wait {
                        emission: 15,
                        tat: 25,
                        prev: 15
                    }
                ]
            );
            assert_eq!(cell.tat(), 25);
        });
    }

    /// A waiter giving its slot back while another call reserves: either the give-back wins
    /// (the new call takes the freed slot) or the reservation wins (the give-back fails and
    /// the slot stays consumed); the TAT always matches the reservations in effect.
    #[test]
    fn a_give_back_racing_a_reservation_never_double_books() {
        loom::model(|| {
            let cell = Arc::new(Cell::default());
            assert_eq!(cell.reserve(&G, 0), Reserve::Now); // TAT 10
            let waiter = cell.reserve(&G, 0);
            assert_eq!(
                waiter,
                Reserve::Wait {
                    emission: 10,
                    tat: 20,
                    prev: 10
                }
            );
            let c2 = cell.clone();
            let h = thread::spawn(move || c2.give_back(20, 10));
            let newcomer = cell.reserve(&G, 0);
            let given = h.join().unwrap();
            if given {
                assert_eq!(
                    newcomer,
                    Reserve::Wait {
                        emission: 10,
                        tat: 20,
                        prev: 10
                    }
                );
            } else {
                assert_eq!(
                    newcomer,
                    Reserve::Wait {
                        emission: 20,
                        tat: 30,
                        prev: 20
                    }
                );
            }
            assert_eq!(cell.tat(), if given { 20 } else { 30 });
        });
    }
}
