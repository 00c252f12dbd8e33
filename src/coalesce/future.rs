use crate::upstream::Upstream;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::core::Join;
use super::error::Failure;
use super::layer::{Instruments, Shared};
use crate::error::BoxError;

/// The response future of [`Coalesce`](super::Coalesce): one caller's share of a coalesced
/// call.
///
/// Resolves to a clone of the shared response, made on this caller's task with no lock held
/// (the caller that lets go of the call last gets the original), or to the shared error: a [`SharedError`](super::SharedError) around the inner error, or a
/// [`BreakwaterError`](crate::error::BreakwaterError) of kind
/// [`Panicked`](crate::error::ErrorKind::Panicked) when the shared call panicked while another
/// caller was polling it.
///
/// It joins the call for its key when first polled (as the leader, starting the call with its
/// own request, or as a follower). Dropping it before it resolves detaches this caller only:
/// the shared call goes on for the others (one of them takes over polling it), and is dropped
/// when no caller is left.
///
/// # Panics
///
/// When polled after it returned `Ready`; when this caller was the one polling the shared
/// call when it panicked, with that panic (resumed after every other caller was given its
/// error); and with the panic of the response's `Clone` when its clone panics (after the
/// other callers were served: the call is over for them). Dropping it may panic with the
/// panic of the inner future's destructor, when it is the last caller of a call still
/// running (the call is still removed and counted as abandoned).
pub struct ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Send + 'static,
{
    join: CallShare<S, Req, K>,
}

impl<S, Req, K> fmt::Debug for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("join", &self.join)
            .finish()
    }
}

impl<S, Req, K> ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Send + 'static,
{
    pub(super) fn new(join: CallShare<S, Req, K>) -> Self {
        ResponseFuture { join }
    }
}

impl<S, Req, K> Future for ResponseFuture<S, Req, K>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    K: Hash + Eq + Send + 'static,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.join)
            .poll(cx)
            .map(|r| r.map_err(Failure::into_box))
    }
}

/// One caller's share of a coalesced call through [`Upstream`].
type CallShare<S, Req, K> = Join<
    K,
    Upstream<S, Req>,
    Result<<S as Service<Req>>::Response, BoxError>,
    Shared<<S as Service<Req>>::Response>,
    Arc<Instruments>,
>;
