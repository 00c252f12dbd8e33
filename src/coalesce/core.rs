//! The coalescing core, independent of tower: an in-flight [`Table`] of shared calls keyed by
//! `K`, and [`Join`], one caller's attachment to a shared call.
//!
//! Used by the [`Coalesce`](super::Coalesce) service and by the response cache (which also
//! uses the [detached mode](Table::spawn_detached)). The design and the argument for its
//! correctness are in the [module docs](super#design).
//!
//! A shared call runs a future of output `O`; its owner's [`Hooks::complete`] turns that
//! output into the value `T` every caller receives (a clone each; the last caller gets the
//! original).

use std::any::Any;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker, ready};

use hashbrown::HashTable;
use parking_lot::Mutex;
use slab::Slab;

use crate::clock::Instant;

/// The shared future, boxed (its one allocation) so that it can move between callers.
pub(crate) type BoxFuture<O> = Pin<Box<dyn Future<Output = O> + Send>>;

/// The part a caller plays in a shared call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Found no call in flight for its key and started one (went upstream).
    Leader,
    /// Attached to the call in flight for its key.
    Follower,
}

/// How a shared call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The shared future returned a value (a success or an error: the core does not judge).
    Completed,
    /// Polling the shared future panicked.
    Panicked,
    /// Every caller left before the end: the shared future was dropped unfinished.
    Abandoned,
}

/// What the owner of a table (a layer) does at the edges of each shared call. Called outside
/// every lock of the table, on the task that caused the edge.
pub(crate) trait Hooks<O, T>: Send + Sync + 'static {
    /// A shared call was started (its entry entered the table).
    fn started(&self);
    /// A shared call ended (its entry left the table); `followers` callers had attached to it
    /// besides its leader.
    fn ended(&self, end: End, followers: u64);
    /// The value the callers of a call whose future returned `out` receive.
    fn complete(&self, out: O) -> T;
    /// The value every caller of a panicked shared call receives (except the driving caller
    /// of a [`Join`] that resumes panics).
    fn panicked(&self) -> T;
}

/// Counts kept by a table, under its shard locks (so they cost no extra shared write).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Callers that started a shared call.
    pub(crate) leaders: u64,
    /// Callers that attached to a call in flight.
    pub(crate) followers: u64,
    /// Shared calls that panicked.
    pub(crate) panics: u64,
    /// Shared calls dropped unfinished because every caller left.
    pub(crate) abandoned: u64,
    /// Keys with a shared call in flight now.
    pub(crate) in_flight: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.leaders += o.leaders;
        self.followers += o.followers;
        self.panics += o.panics;
        self.abandoned += o.abandoned;
        self.in_flight += o.in_flight;
    }
}

/// One key in flight.
struct Entry<K, O, T, H> {
    hash: u64,
    key: K,
    slot: Arc<Slot<K, O, T, H>>,
    followers: u64,
}

struct ShardState<K, O, T, H> {
    map: HashTable<Entry<K, O, T, H>>,
    stats: Stats,
}

/// One shard of the table, alone on its cache lines.
#[repr(align(128))]
struct Shard<K, O, T, H>(Mutex<ShardState<K, O, T, H>>);

/// The in-flight table: at most one shared call per key at any time.
///
/// Sharded by the key's hash; each shard is a `hashbrown::HashTable` under a
/// `parking_lot::Mutex` held only to find, insert or remove an entry (never while a future
/// is polled or a waker is woken). Entries store their hash, so removal needs neither the key
/// nor a second hash: a call finds its own entry by hash and slot identity.
pub(crate) struct Table<K, O, T, H> {
    shards: Box<[Shard<K, O, T, H>]>,
    mask: usize,
    hasher: RandomState,
    hooks: H,
}

impl<K, O, T, H> std::fmt::Debug for Table<K, O, T, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<K, O, T, H> Table<K, O, T, H> {
    /// The owner's hooks.
    pub(crate) fn hooks(&self) -> &H {
        &self.hooks
    }
}

impl<K, O, T, H> Table<K, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + 'static,
    H: Hooks<O, T>,
{
    /// An empty table with four shards per available core (a power of two, at most 1024).
    pub(crate) fn new(hooks: H) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = (cores * 4).next_power_of_two().clamp(4, 1024);
        let shards = (0..n)
            .map(|_| {
                Shard(Mutex::new(ShardState {
                    map: HashTable::new(),
                    stats: Stats::default(),
                }))
            })
            .collect();
        Table {
            shards,
            mask: n - 1,
            hasher: RandomState::new(),
            hooks,
        }
    }

    #[inline]
    fn shard(&self, hash: u64) -> &Mutex<ShardState<K, O, T, H>> {
        // hashbrown uses the low bits (bucket) and the top 7 bits (tag); take the shard from
        // the middle.
        &self.shards[(hash >> 32) as usize & self.mask].0
    }

    /// Attaches to the call in flight for `key`, or starts one with the future `make()`
    /// returns (`make` is called only then, under the shard lock).
    ///
    /// The returned [`Join`] resolves to the call's value; dropping it detaches. Whichever
    /// attached caller is polled first drives the shared future (not necessarily the leader).
    pub(crate) fn join<F>(self: &Arc<Self>, key: K, make: impl FnOnce() -> F) -> (Role, Join<O, T>)
    where
        F: Future<Output = O> + Send + 'static,
    {
        let hash = self.hasher.hash_one(&key);
        let mut guard = self.shard(hash).lock();
        let st = &mut *guard;
        if let Some(e) = st.map.find_mut(hash, |e| e.key == key) {
            e.followers += 1;
            e.slot.attached.fetch_add(1, Ordering::AcqRel);
            let slot = e.slot.clone();
            st.stats.followers += 1;
            drop(guard);
            return (Role::Follower, Join::new(slot));
        }
        let slot = Arc::new(Slot {
            table: self.clone(),
            hash,
            attached: AtomicUsize::new(1),
            state: Mutex::new(State {
                phase: Phase::Running {
                    fut: Some(Box::pin(make())),
                    driving: false,
                    nominee: None,
                },
                waiters: Slab::new(),
            }),
        });
        st.map.insert_unique(
            hash,
            Entry {
                hash,
                key,
                slot: slot.clone(),
                followers: 0,
            },
            |e| e.hash,
        );
        st.stats.leaders += 1;
        drop(guard);
        self.hooks.started();
        (Role::Leader, Join::new(slot))
    }

    /// The detached mode: attaches to (or starts) the call for `key` on behalf of nobody.
    /// A task spawned on the current tokio runtime stays attached until the call ends or
    /// `deadline` passes (then it detaches; the call goes on while other callers remain
    /// attached, and is dropped otherwise). A panic of the shared future is caught and ends
    /// the call like any panic; it does not unwind the spawned task.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    #[allow(dead_code)] // used by the response cache and the tests
    pub(crate) fn spawn_detached<F>(
        self: &Arc<Self>,
        key: K,
        make: impl FnOnce() -> F,
        deadline: Option<Instant>,
    ) -> (Role, tokio::task::JoinHandle<()>)
    where
        F: Future<Output = O> + Send + 'static,
    {
        let (role, mut join) = self.join(key, make);
        join.resume_panics = false;
        let task = tokio::spawn(async move {
            match deadline {
                Some(d) => drop(tokio::time::timeout_at(d, join).await),
                None => drop(join.await),
            }
        });
        (role, task)
    }

    /// The table's counts, summed over its shards (locks each shard in turn; not for the
    /// hot path).
    pub(crate) fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for s in self.shards.iter() {
            let st = s.0.lock();
            total += st.stats;
            total.in_flight += st.map.len() as u64;
        }
        total
    }

    /// Removes the entry of `slot` if it is still in the table, counting how the call ended.
    /// The entry is returned so that it is dropped outside the lock.
    fn remove(&self, slot: &Slot<K, O, T, H>, end: End) -> Option<Entry<K, O, T, H>> {
        Self::remove_locked(&mut self.shard(slot.hash).lock(), slot, end)
    }

    fn remove_locked(
        st: &mut ShardState<K, O, T, H>,
        slot: &Slot<K, O, T, H>,
        end: End,
    ) -> Option<Entry<K, O, T, H>> {
        let found = st
            .map
            .find_entry(slot.hash, |e| std::ptr::eq(Arc::as_ptr(&e.slot), slot))
            .ok()?;
        let (entry, _) = found.remove();
        match end {
            End::Completed => {}
            End::Panicked => st.stats.panics += 1,
            End::Abandoned => st.stats.abandoned += 1,
        }
        Some(entry)
    }

    /// Releases one attachment of a call still running (see [`Slot::leave`]); returns the
    /// entry when this was the last attachment and the call was still in the table.
    fn release(&self, slot: &Slot<K, O, T, H>) -> Option<Entry<K, O, T, H>> {
        // Not the last: decrement without the shard lock.
        let mut n = slot.attached.load(Ordering::Acquire);
        while n > 1 {
            match slot
                .attached
                .compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return None,
                Err(now) => n = now,
            }
        }
        // Maybe the last: decide, and remove the entry, under the shard lock, where
        // followers attach.
        let mut guard = self.shard(slot.hash).lock();
        if slot.attached.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        Self::remove_locked(&mut guard, slot, End::Abandoned)
    }
}

/// A table of any key and value type, as stored by a layer that serves several services.
pub(crate) trait AnyTable: Send + Sync + 'static {
    /// The table's counts.
    fn stats(&self) -> Stats;
    /// `self` as `Any`, to downcast to the concrete table.
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<K, O, T, H> AnyTable for Table<K, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + 'static,
    H: Hooks<O, T>,
{
    fn stats(&self) -> Stats {
        Table::stats(self)
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

// ---- one shared call ------------------------------------------------------------------------

/// A caller's own state in a shared call.
#[derive(Debug, Default)]
struct Me {
    /// Key of this caller's waker in the waiter list, while it waits.
    waiter: Option<usize>,
    /// This caller has taken its value, or resumed the panic, and released its attachment.
    done: bool,
}

/// What a caller that does not hold the shared future finds when polled.
enum Wait<O, T> {
    /// The call ended: this caller's value.
    Value(T),
    /// Nobody drives the shared future: this caller takes it and drives.
    Drive(BoxFuture<O>),
}

/// A shared call with its key and owner types erased, as a caller sees it.
trait Call<O, T>: Send + Sync {
    /// Polled by a caller that does not hold the shared future.
    fn poll_wait(&self, me: &mut Me, cx: &mut Context<'_>) -> Poll<Wait<O, T>>;
    /// Ends the call with the future's output (`Err(())`: it panicked); returns the driver's
    /// own value.
    fn finish(&self, me: &mut Me, out: Result<O, ()>) -> T;
    /// A caller leaves before taking its value, handing back the future if it drove.
    fn leave(&self, me: &mut Me, fut: Option<BoxFuture<O>>);
}

enum Phase<O, T> {
    Running {
        /// The shared future while nobody drives it; the driver holds it in its [`Join`].
        fut: Option<BoxFuture<O>>,
        /// A caller holds and drives the future.
        driving: bool,
        /// The waiter woken to take over driving, if one is on its way.
        nominee: Option<usize>,
    },
    /// The value, until the last caller moves it out.
    Done(Option<T>),
    /// Every caller left; the future was dropped.
    Abandoned,
}

struct State<O, T> {
    phase: Phase<O, T>,
    /// Wakers of callers waiting for the value (not the driver's: the future holds that one).
    waiters: Slab<Option<Waker>>,
}

struct Slot<K, O, T, H> {
    table: Arc<Table<K, O, T, H>>,
    hash: u64,
    /// Callers attached (each live `Join`); incremented only under the entry's shard lock,
    /// and it drops to zero only under it while the entry is in the table.
    attached: AtomicUsize,
    state: Mutex<State<O, T>>,
}

impl<K, O, T, H> Slot<K, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + 'static,
    H: Hooks<O, T>,
{
    /// Takes this caller's copy of a finished call's value: the last caller moves it, the
    /// others clone it. Called under the state lock.
    fn take(&self, out: &mut Option<T>, me: &mut Me) -> T {
        me.done = true;
        if self.attached.fetch_sub(1, Ordering::AcqRel) == 1 {
            out.take()
                .expect("the value stays until the last caller takes it")
        } else {
            out.as_ref()
                .expect("the value stays until the last caller takes it")
                .clone()
        }
    }

    fn ended(&self, entry: Option<Entry<K, O, T, H>>, end: End) {
        if let Some(entry) = entry {
            let followers = entry.followers;
            drop(entry);
            self.table.hooks.ended(end, followers);
        }
    }

    /// Wakes one waiter to take over driving, when nobody drives and nobody is on the way.
    fn hand_off(&self) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if let Phase::Running {
            driving: false,
            nominee: nominee @ None,
            ..
        } = &mut st.phase
        {
            let next = st
                .waiters
                .iter_mut()
                .find_map(|(k, w)| w.take().map(|w| (k, w)));
            if let Some((k, w)) = next {
                *nominee = Some(k);
                drop(guard);
                w.wake();
            }
            // No waiter registered: the remaining callers have not been polled yet, and the
            // first of them to be polled drives.
        }
    }
}

impl<K, O, T, H> Call<O, T> for Slot<K, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + 'static,
    H: Hooks<O, T>,
{
    fn poll_wait(&self, me: &mut Me, cx: &mut Context<'_>) -> Poll<Wait<O, T>> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        match &mut st.phase {
            Phase::Done(out) => Poll::Ready(Wait::Value(self.take(out, me))),
            Phase::Abandoned => unreachable!("a call with a caller attached is not abandoned"),
            Phase::Running {
                fut,
                driving,
                nominee,
            } => {
                if !*driving {
                    // Take over: the call was not started yet, or its driver left.
                    if let Some(k) = me.waiter.take() {
                        st.waiters.try_remove(k);
                    }
                    *nominee = None;
                    *driving = true;
                    let fut = fut
                        .take()
                        .expect("the shared future is in place while nobody drives it");
                    return Poll::Ready(Wait::Drive(fut));
                }
                // Wait: register (or refresh) this caller's waker.
                match me.waiter {
                    Some(k) => {
                        let w = &mut st.waiters[k];
                        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *w = Some(cx.waker().clone());
                        }
                    }
                    None => me.waiter = Some(st.waiters.insert(Some(cx.waker().clone()))),
                }
                Poll::Pending
            }
        }
    }

    /// The entry leaves the table first, so the next request starts a new call; then every
    /// waiter is woken.
    fn finish(&self, me: &mut Me, out: Result<O, ()>) -> T {
        let (out, end) = match out {
            Ok(o) => (self.table.hooks.complete(o), End::Completed),
            Err(()) => (self.table.hooks.panicked(), End::Panicked),
        };
        let entry = self.table.remove(self, end);
        // Nobody can attach any more. With only the driver attached, nobody else will ever
        // look at the state: skip it.
        if self.attached.load(Ordering::Acquire) == 1 {
            me.done = true;
            self.ended(entry, end);
            return out;
        }
        let waiters = {
            let mut st = self.state.lock();
            st.phase = Phase::Done(Some(out));
            std::mem::take(&mut st.waiters)
        };
        for w in waiters.into_iter().filter_map(|(_, w)| w) {
            w.wake();
        }
        self.ended(entry, end);
        let mut st = self.state.lock();
        match &mut st.phase {
            Phase::Done(out) => self.take(out, me),
            _ => unreachable!("a finished call stays finished"),
        }
    }

    fn leave(&self, me: &mut Me, fut: Option<BoxFuture<O>>) {
        {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            match &mut st.phase {
                Phase::Done(_) => {
                    // Under the state lock, like `take`, so the last taker is decided exactly.
                    self.attached.fetch_sub(1, Ordering::AcqRel);
                    me.done = true;
                    return;
                }
                Phase::Abandoned => return,
                Phase::Running {
                    fut: place,
                    driving,
                    nominee,
                } => {
                    if let Some(k) = me.waiter.take() {
                        st.waiters.try_remove(k);
                        if *nominee == Some(k) {
                            *nominee = None;
                        }
                    }
                    if fut.is_some() {
                        // The driver leaves: put the future back for the next driver.
                        *place = fut;
                        *driving = false;
                    }
                }
            }
        }
        me.done = true;
        match self.table.release(self) {
            Some(entry) => {
                // The last caller left a running call: drop the future, outside every lock.
                let fut = match std::mem::replace(&mut self.state.lock().phase, Phase::Abandoned) {
                    Phase::Running { fut, .. } => fut,
                    _ => None,
                };
                drop(fut);
                self.ended(Some(entry), End::Abandoned);
            }
            None => self.hand_off(),
        }
    }
}

/// One caller's attachment to a shared call: a future resolving to the call's value.
///
/// Dropping it before it resolves detaches the caller: if it was driving, another attached
/// caller takes over; if it was the last, the shared future is dropped and the entry removed.
///
/// # Panics
///
/// When polled after it returned `Ready`. When it drives the shared future, that future
/// panics, and [`resume_panics`](Self::resume_panics) is set (the default), the panic is
/// resumed on this caller's task (after every other caller got the hooks' `panicked()` value).
pub(crate) struct Join<O, T> {
    slot: Arc<dyn Call<O, T>>,
    /// The shared future, while this caller drives it.
    fut: Option<BoxFuture<O>>,
    me: Me,
    /// Resume a panic of the shared future when this caller was the one polling it (`true`
    /// by default; the detached mode turns it off).
    pub(crate) resume_panics: bool,
}

impl<O, T> std::fmt::Debug for Join<O, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Join")
            .field("driving", &self.fut.is_some())
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl<O, T> Join<O, T> {
    fn new(slot: Arc<dyn Call<O, T>>) -> Self {
        Join {
            slot,
            fut: None,
            me: Me::default(),
            resume_panics: true,
        }
    }
}

impl<O, T> Future for Join<O, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = &mut *self;
        assert!(!this.me.done, "coalesced call polled after completion");
        let fut = match &mut this.fut {
            Some(fut) => fut,
            None => match ready!(this.slot.poll_wait(&mut this.me, cx)) {
                Wait::Value(v) => return Poll::Ready(v),
                Wait::Drive(fut) => this.fut.insert(fut),
            },
        };
        // Drive, holding no lock.
        let out = match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(out)) => Ok(out),
            Err(payload) => Err(payload),
        };
        let fut = this.fut.take();
        let (v, payload) = match out {
            Ok(o) => (this.slot.finish(&mut this.me, Ok(o)), None),
            Err(p) => (this.slot.finish(&mut this.me, Err(())), Some(p)),
        };
        // Dropped once every caller was served (its destructor is the upstream's code).
        drop(fut);
        match payload {
            Some(p) if this.resume_panics => {
                drop(v);
                resume_unwind(p)
            }
            _ => Poll::Ready(v),
        }
    }
}

impl<O, T> Drop for Join<O, T> {
    fn drop(&mut self) {
        if !self.me.done {
            self.slot.leave(&mut self.me, self.fut.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    #[derive(Default)]
    struct Counting {
        started: AtomicU64,
        ended: Mutex<Vec<(End, u64)>>,
    }

    impl Hooks<u32, u32> for Arc<Counting> {
        fn started(&self) {
            self.started.fetch_add(1, Ordering::SeqCst);
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

    #[tokio::test(start_paused = true)]
    async fn detached_call_runs_to_completion_without_callers() {
        let (t, hooks) = table();
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let (role, task) = t.spawn_detached(
            1,
            move || async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                r.fetch_add(1, Ordering::SeqCst);
                7
            },
            None,
        );
        assert_eq!(role, Role::Leader);
        // A foreground caller attaches, then leaves: the call goes on.
        let (role, join) = t.join(1, std::future::pending);
        assert_eq!(role, Role::Follower);
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
        assert_eq!(hooks.started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn detached_call_is_dropped_at_its_deadline_when_nobody_else_waits() {
        let (t, hooks) = table();
        let start = Instant::now();
        let (_, task) = t.spawn_detached(
            2,
            || async {
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
        let (_, task) = t.spawn_detached(
            3,
            || async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                9
            },
            Some(start + Duration::from_millis(100)),
        );
        let (_, join) = t.join(3, std::future::pending);
        let waiter = tokio::spawn(join);
        task.await.unwrap();
        assert_eq!(t.stats().in_flight, 1, "still running for the waiter");
        assert_eq!(waiter.await.unwrap(), 9);
        assert_eq!(Instant::now() - start, Duration::from_millis(300));
        assert_eq!(t.stats().abandoned, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn detached_panic_is_caught_and_shared() {
        let (t, hooks) = table();
        let (_, task) = t.spawn_detached(
            4,
            || async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                panic!("upstream bug")
            },
            None,
        );
        let (_, join) = t.join(4, std::future::pending);
        let waiter = tokio::spawn(join);
        task.await.expect("the detached task does not unwind");
        assert_eq!(waiter.await.unwrap(), u32::MAX);
        assert_eq!(t.stats().panics, 1);
        assert_eq!(t.stats().in_flight, 0);
        assert_eq!(*hooks.ended.lock(), vec![(End::Panicked, 1)]);
    }
}
