//! The coalescing core, independent of tower: an in-flight [`Table`] of shared calls keyed by
//! `K`, and [`Join`], one caller's share of a shared call.
//!
//! Used by the [`Coalesce`](super::Coalesce) service and by the response cache (which also
//! uses the [detached mode](Table::spawn_detached)). The design and the argument for its
//! correctness are in the [module docs](super#design).
//!
//! A shared call runs a future of output `O`; its owner's [`Hooks::complete`] turns that
//! output into the value `T` every caller receives (a clone each, made on the caller's task
//! with no lock held; the caller that lets go of the call last gets the original).

mod join;
mod slot;
mod table;
#[cfg(test)]
mod tests;
mod waiters;

use std::future::Future;
use std::pin::Pin;

pub(crate) use join::Join;
pub(crate) use table::{AnyTable, Table};

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
///
/// The hooks are the owner's code, not user code: they must not panic (`complete` runs
/// while the call's entry is still in the table, and `ended` may run while a panic of user
/// code unwinds).
pub(crate) trait Hooks<O, T>: Send + Sync + 'static {
    /// A caller joined, as `role` (a leader's entry just entered the table).
    fn joined(&self, role: Role);
    /// A shared call ended (its entry left the table); `followers` callers had attached to it
    /// besides its leader. Called exactly once per call, last, even when user code run after
    /// the entry left (a clone of the value, a destructor) panics.
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
