//! Unit tests of the core: the detached mode and joining.

use super::*;
use crate::clock::Instant;
use parking_lot::Mutex;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

#[derive(Default)]
struct Counting {
    leaders: AtomicU64,
    ended: Mutex<Vec<(End, u64)>>,
}

impl Hooks<u32, u32> for Arc<Counting> {
    fn joined(&self, role: Role) {
        if role == Role::Leader {
            self.leaders.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn ended(&self, end: End, followers: u64) {
        self.ended.lock().push((end, followers));
    }
    fn complete(&self, out: u32) -> u32 {
        out
    }
    fn panicked(&self) -> u32 {
        u32::MAX
    }
}

type TestTable = Table<u8, u32, u32, Arc<Counting>>;

fn table() -> (Arc<TestTable>, Arc<Counting>) {
    let hooks = Arc::new(Counting::default());
    (Arc::new(Table::new(hooks.clone())), hooks)
}

async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Polls `fut` once (joining the table), then returns it.
async fn poll_once<F: Future + Unpin>(mut fut: F) -> F {
    std::future::poll_fn(|cx| {
        assert!(Pin::new(&mut fut).poll(cx).is_pending());
        Poll::Ready(())
    })
    .await;
    fut
}

#[tokio::test(start_paused = true)]
async fn detached_call_runs_to_completion_without_callers() {
    let (t, hooks) = table();
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let task = t.spawn_detached(
        1,
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.fetch_add(1, Ordering::SeqCst);
            7
        },
        None,
    );
    settle().await;
    // A foreground caller attaches, then leaves: the call goes on.
    let join = poll_once(t.join(1, std::future::pending())).await;
    drop(join);
    settle().await;
    assert_eq!(t.stats().in_flight, 1);
    task.await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        t.stats(),
        Stats {
            leaders: 1,
            followers: 1,
            panics: 0,
            abandoned: 0,
            in_flight: 0
        }
    );
    assert_eq!(*hooks.ended.lock(), vec![(End::Completed, 1)]);
    assert_eq!(hooks.leaders.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn detached_call_is_dropped_at_its_deadline_when_nobody_else_waits() {
    let (t, hooks) = table();
    let start = Instant::now();
    let task = t.spawn_detached(
        2,
        async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            1
        },
        Some(start + Duration::from_millis(100)),
    );
    task.await.unwrap();
    assert_eq!(Instant::now() - start, Duration::from_millis(100));
    assert_eq!(t.stats().in_flight, 0);
    assert_eq!(t.stats().abandoned, 1);
    assert_eq!(*hooks.ended.lock(), vec![(End::Abandoned, 0)]);
}

#[tokio::test(start_paused = true)]
async fn detached_deadline_leaves_the_call_to_attached_callers() {
    let (t, _) = table();
    let start = Instant::now();
    let task = t.spawn_detached(
        3,
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            9
        },
        Some(start + Duration::from_millis(100)),
    );
    settle().await;
    let waiter = tokio::spawn(t.join(3, std::future::pending()));
    task.await.unwrap();
    assert_eq!(t.stats().in_flight, 1, "still running for the waiter");
    assert_eq!(waiter.await.unwrap(), 9);
    assert_eq!(Instant::now() - start, Duration::from_millis(300));
    assert_eq!(t.stats().abandoned, 0);
}

#[tokio::test(start_paused = true)]
async fn detached_panic_is_caught_and_shared() {
    let (t, hooks) = table();
    let task = t.spawn_detached(
        4,
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("upstream bug")
        },
        None,
    );
    settle().await;
    let waiter = tokio::spawn(t.join(4, std::future::pending()));
    task.await.expect("the detached task does not unwind");
    assert_eq!(waiter.await.unwrap(), u32::MAX);
    assert_eq!(t.stats().panics, 1);
    assert_eq!(t.stats().in_flight, 0);
    assert_eq!(*hooks.ended.lock(), vec![(End::Panicked, 1)]);
}

#[tokio::test(start_paused = true)]
async fn an_unpolled_share_never_joins() {
    let (t, hooks) = table();
    drop(t.join(5, async { 1 }));
    assert_eq!(t.stats(), Stats::default());
    assert!(hooks.ended.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn detached_call_with_a_deadline_already_passed_never_starts() {
    let (t, hooks) = table();
    let polls = Arc::new(AtomicU64::new(0));
    for deadline in [Instant::now(), Instant::now() - Duration::from_millis(1)] {
        let p = polls.clone();
        let task = t.spawn_detached(
            6,
            std::future::poll_fn(move |_| {
                p.fetch_add(1, Ordering::SeqCst);
                Poll::Ready(1)
            }),
            Some(deadline),
        );
        task.await.unwrap();
    }
    assert_eq!(
        polls.load(Ordering::SeqCst),
        0,
        "the upstream call never started"
    );
    assert_eq!(t.stats(), Stats::default());
    assert_eq!(hooks.leaders.load(Ordering::SeqCst), 0);
    assert!(hooks.ended.lock().is_empty());
}

/// What the value's `Clone` saw: clones made, and clones made while the slot's lock was held.
#[derive(Default)]
struct Watch {
    slot: Mutex<std::sync::Weak<slot::Slot<u32, Probe>>>,
    clones: AtomicU64,
    under_lock: AtomicU64,
}

/// A value whose `Clone` (user code) records whether it runs under the slot's lock.
struct Probe(Arc<Watch>);

impl Clone for Probe {
    fn clone(&self) -> Self {
        self.0.clones.fetch_add(1, Ordering::SeqCst);
        // One thread (current-thread runtime): a held lock is held by this very call chain.
        if self.0.slot.lock().upgrade().is_some_and(|s| s.is_locked()) {
            self.0.under_lock.fetch_add(1, Ordering::SeqCst);
        }
        Probe(self.0.clone())
    }
}

struct ProbeHooks(Arc<Watch>);

impl Hooks<u32, Probe> for ProbeHooks {
    fn joined(&self, _: Role) {}
    fn ended(&self, _: End, _: u64) {}
    fn complete(&self, _: u32) -> Probe {
        Probe(self.0.clone())
    }
    fn panicked(&self) -> Probe {
        Probe(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn values_are_cloned_outside_the_slot_lock() {
    let watch = Arc::new(Watch::default());
    let t = Arc::new(Table::<u8, u32, Probe, _>::new(ProbeHooks(watch.clone())));
    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let leader = poll_once(t.join(7, Box::pin(async move { rx.await.unwrap() }))).await;
    let a = poll_once(t.join(7, Box::pin(std::future::pending()))).await;
    let b = poll_once(t.join(7, Box::pin(std::future::pending()))).await;
    {
        let hash = t.hasher.hash_one(7u8);
        let shard = t.shard(hash);
        let entry = shard.map.find(hash, |e| e.key == 7).expect("in flight");
        *watch.slot.lock() = Arc::downgrade(entry.slot.as_ref().expect("followers made it"));
    }
    tx.send(1).unwrap();
    let _values = (leader.await, a.await, b.await);
    // The driver and one follower clone; the last follower takes the original.
    assert_eq!(watch.clones.load(Ordering::SeqCst), 2);
    assert_eq!(watch.under_lock.load(Ordering::SeqCst), 0);
}
