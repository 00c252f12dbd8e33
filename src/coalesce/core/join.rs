//! One caller's share of a shared call.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use super::slot::{Me, Slot, Wait};
use super::table::{Entry, Table};
use super::{BoxFuture, End, Hooks, Role};

pub(super) enum JoinState<K, F, O, T> {
    /// Not polled yet: not in the table.
    Init { key: K, fut: F },
    /// Holds and drives the shared future; `slot` once known (a follower that took over).
    Driving {
        fut: BoxFuture<O>,
        slot: Option<Arc<Slot<O, T>>>,
    },
    /// A follower waiting for the value.
    Waiting { slot: Arc<Slot<O, T>> },
    /// Resolved, or left.
    Done,
}

/// One caller's share of a shared call: a future resolving to the call's value.
///
/// On its first poll it joins the call in flight for its key, or starts one. Dropping it
/// before it resolves detaches the caller: if it was driving, another attached caller takes
/// over; if it was the last, the shared future is dropped and the entry removed.
///
/// # Panics
///
/// When polled after it returned `Ready`. When it drives the shared future, that future
/// panics, and [`resume_panics`](Self::resume_panics) is set (the default), the panic is
/// resumed on this caller's task (after every other caller got the hooks' `panicked()` value).
pub(crate) struct Join<K, F, O, T, H>
where
    H: Hooks<O, T>,
{
    pub(super) table: Arc<Table<K, O, T, H>>,
    pub(super) state: JoinState<K, F, O, T>,
    pub(super) hash: u64,
    pub(super) id: u64,
    pub(super) me: Me,
    /// Resume a panic of the shared future when this caller was the one polling it (`true`
    /// by default; the detached mode turns it off).
    pub(crate) resume_panics: bool,
}

// `F` is never pinned in place: a leader boxes it before its first poll.
impl<K, F, O, T, H: Hooks<O, T>> Unpin for Join<K, F, O, T, H> {}

impl<K, F, O, T, H: Hooks<O, T>> std::fmt::Debug for Join<K, F, O, T, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            JoinState::Init { .. } => "init",
            JoinState::Driving { .. } => "driving",
            JoinState::Waiting { .. } => "waiting",
            JoinState::Done => "done",
        };
        f.debug_struct("Join")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<K, F, O, T, H> Join<K, F, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    F: Future<Output = O> + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + Sync + 'static,
    H: Hooks<O, T>,
{
    /// First poll: joins the table as leader or follower.
    fn enter(&mut self, key: K, fut: F) {
        let table = &*self.table;
        let hash = table.hasher.hash_one(&key);
        self.hash = hash;
        let mut guard = table.shard(hash);
        let shard = &mut *guard;
        if let Some(e) = shard.map.find_mut(hash, |e| e.key == key) {
            e.followers += 1;
            let slot = match &e.slot {
                Some(slot) => {
                    slot.attached.fetch_add(1, Ordering::AcqRel);
                    slot.clone()
                }
                None => e.slot.insert(Arc::new(Slot::new())).clone(),
            };
            self.id = e.id;
            shard.stats.followers += 1;
            drop(guard);
            self.state = JoinState::Waiting { slot };
            table.hooks.joined(Role::Follower);
            // Last: its destructor is upstream code, and may panic; this caller is attached
            // in full by now, so unwinding from here detaches it like any drop.
            drop(fut);
            return;
        }
        let id = shard.next_id;
        shard.next_id = id.wrapping_add(1);
        shard.map.insert_unique(
            hash,
            Entry {
                hash,
                id,
                key,
                slot: None,
                followers: 0,
            },
            |e| e.hash,
        );
        shard.stats.leaders += 1;
        drop(guard);
        self.id = id;
        self.state = JoinState::Driving {
            fut: into_box(fut),
            slot: None,
        };
        table.hooks.joined(Role::Leader);
    }

    /// The driver ends the call with its future's output (`Err`: it panicked): the entry
    /// leaves the table first, so the next request starts a new call; then every waiter is
    /// served. Returns the driver's own value.
    ///
    /// The `ended` hook runs last, and runs even when what comes before it panics (a clone
    /// of the value, the drop of the key: user code).
    fn finish(&mut self, out: Result<O, ()>) -> T {
        let table = &*self.table;
        let (out, end) = match out {
            Ok(o) => (table.hooks.complete(o), End::Completed),
            Err(()) => (table.hooks.panicked(), End::Panicked),
        };
        let entry = table
            .shard(self.hash)
            .remove(self.hash, self.id, end)
            .expect("a running call keeps its entry while a caller is attached");
        let _ended = Ended::new(&table.hooks, end, entry.followers);
        let Entry { key, slot, .. } = entry;
        let mine = match slot {
            None => {
                self.me.done = true;
                out
            }
            Some(slot) => slot.deliver(&mut self.me, out),
        };
        drop(key);
        mine
    }
}

/// `fut` as a [`BoxFuture`]: boxed, unless it already is one (then it is moved as it is, so
/// that a caller that boxed its future ahead, to keep its own future small, pays one
/// allocation, not two). The type test is resolved at compile time.
fn into_box<F, O>(fut: F) -> BoxFuture<O>
where
    F: Future<Output = O> + Send + 'static,
    O: 'static,
{
    let mut fut = Some(fut);
    match (&mut fut as &mut dyn std::any::Any).downcast_mut::<Option<BoxFuture<O>>>() {
        Some(boxed) => boxed.take().expect("present"),
        None => Box::pin(fut.take().expect("present")),
    }
}

/// Runs the `ended` hook of a call whose entry left the table when dropped: exactly once,
/// after whatever follows the removal, even when that panics (user code: a clone of the
/// value, the drop of the future or of the key).
struct Ended<'a, O, T, H: Hooks<O, T>> {
    hooks: &'a H,
    end: End,
    followers: u64,
    _types: std::marker::PhantomData<fn(O) -> T>,
}

impl<'a, O, T, H: Hooks<O, T>> Ended<'a, O, T, H> {
    fn new(hooks: &'a H, end: End, followers: u64) -> Self {
        Ended {
            hooks,
            end,
            followers,
            _types: std::marker::PhantomData,
        }
    }
}

impl<O, T, H: Hooks<O, T>> Drop for Ended<'_, O, T, H> {
    fn drop(&mut self) {
        self.hooks.ended(self.end, self.followers);
    }
}

impl<K, F, O, T, H: Hooks<O, T>> Join<K, F, O, T, H> {
    /// This caller leaves before its value: see [`Join`].
    fn leave(&mut self) {
        let (fut, slot) = match std::mem::replace(&mut self.state, JoinState::Done) {
            JoinState::Init { .. } | JoinState::Done => return,
            JoinState::Waiting { slot } => (None, slot),
            JoinState::Driving { fut, slot } => {
                let slot = match slot {
                    Some(slot) => slot,
                    None => {
                        let mut shard = self.table.shard(self.hash);
                        let entry = shard
                            .map
                            .find_mut(self.hash, |e| e.id == self.id)
                            .expect("a running call keeps its entry while a caller is attached");
                        match &entry.slot {
                            Some(slot) => slot.clone(),
                            None => {
                                // Alone: abandon the call.
                                let entry = shard
                                    .remove(self.hash, self.id, End::Abandoned)
                                    .expect("found above, under the same lock");
                                drop(shard);
                                self.me.done = true;
                                let ended =
                                    Ended::new(&self.table.hooks, End::Abandoned, entry.followers);
                                // Upstream code: may panic, and `ended` still runs.
                                drop(fut);
                                drop(entry);
                                drop(ended);
                                return;
                            }
                        }
                    }
                };
                (Some(fut), slot)
            }
        };
        self.me.done = true;
        let (running, unused) = slot.leave(&mut self.me, fut);
        drop(unused);
        if !running {
            return;
        }
        match self.table.release(&slot, self.hash, self.id) {
            Some(entry) => {
                // The last caller left a running call: drop the future, outside every lock
                // (upstream code: may panic, and `ended` still runs).
                let ended = Ended::new(&self.table.hooks, End::Abandoned, entry.followers);
                drop(slot.abandon());
                drop(entry);
                drop(ended);
            }
            None => slot.hand_off(),
        }
    }
}

impl<K, F, O, T, H> Future for Join<K, F, O, T, H>
where
    K: Hash + Eq + Send + 'static,
    F: Future<Output = O> + Send + 'static,
    O: Send + 'static,
    T: Clone + Send + Sync + 'static,
    H: Hooks<O, T>,
{
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                JoinState::Init { .. } => {
                    let JoinState::Init { key, fut } =
                        std::mem::replace(&mut this.state, JoinState::Done)
                    else {
                        unreachable!()
                    };
                    this.enter(key, fut);
                }
                JoinState::Waiting { slot } => match slot.poll_wait(&mut this.me, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Wait::Done) => {
                        let JoinState::Waiting { slot } =
                            std::mem::replace(&mut this.state, JoinState::Done)
                        else {
                            unreachable!()
                        };
                        // The clone (user code) runs here, holding no lock.
                        return Poll::Ready(slot.take(&mut this.me));
                    }
                    Poll::Ready(Wait::Drive(fut)) => {
                        let slot = slot.clone();
                        this.state = JoinState::Driving {
                            fut,
                            slot: Some(slot),
                        };
                    }
                },
                JoinState::Driving { fut, .. } => {
                    // Drive, holding no lock.
                    let out = match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                        Ok(Poll::Pending) => return Poll::Pending,
                        Ok(Poll::Ready(out)) => Ok(out),
                        Err(payload) => Err(payload),
                    };
                    let JoinState::Driving { fut, slot } =
                        std::mem::replace(&mut this.state, JoinState::Done)
                    else {
                        unreachable!()
                    };
                    // The entry holds the slot too, until `finish` takes it: let go of this
                    // reference so that the driver may be its last holder.
                    drop(slot);
                    let (v, payload) = match out {
                        Ok(o) => (this.finish(Ok(o)), None),
                        Err(p) => (this.finish(Err(())), Some(p)),
                    };
                    // Dropped once every caller was served (its destructor is upstream code).
                    drop(fut);
                    return match payload {
                        Some(p) if this.resume_panics => {
                            drop(v);
                            resume_unwind(p)
                        }
                        _ => Poll::Ready(v),
                    };
                }
                JoinState::Done => panic!("coalesced call polled after completion"),
            }
        }
    }
}

impl<K, F, O, T, H: Hooks<O, T>> Drop for Join<K, F, O, T, H> {
    fn drop(&mut self) {
        if !self.me.done {
            self.leave();
        }
    }
}
