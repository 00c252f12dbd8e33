//! Unit tests of the core: the detached mode and joining.

use super::*;
use crate::clock::Instant;
use parking_lot::Mutex;
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
