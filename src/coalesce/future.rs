use crate::upstream::Upstream;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;

use super::core::Join;
use super::error::Failure;
use super::layer::{Instruments, Shared};
use crate::error::BoxError;

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, K>
    where
        S: Service<Req>,
        S::Response: Send,
        S::Response: 'static,
    {
        // A keyed request: a share of the call for its key.
        Shared { join: CallShare<S, Req, K> },
        // A request without a key: its own call, straight through.
        Pass { #[pin] call: Upstream<S, Req> },
    }
}

pin_project! {
    /// The response future of [`Coalesce`](super::Coalesce): one caller's share of a
    /// coalesced call, or, for a request whose key function returned `None`, its own call to
    /// the inner service.
    ///
    /// A share resolves to a clone of the shared response, made on this caller's task with no
    /// lock held (the caller that lets go of the call last gets the original), or to the
    /// shared error: a [`SharedError`](super::SharedError) around the inner error, or a
    /// [`BreakwaterError`](crate::error::BreakwaterError) of kind
    /// [`Panicked`](crate::error::ErrorKind::Panicked) when the shared call panicked while
    /// another caller was polling it. A pass-through call resolves to the inner service's
    /// response or its error (converted into a [`BoxError`], not wrapped).
    ///
    /// A share joins the call for its key when first polled (as the leader, starting the
    /// call with its own request, or as a follower). Dropping it before it resolves detaches
    /// this caller only: the shared call goes on for the others (one of them takes over
    /// polling it), and is dropped when no caller is left.
    ///
    /// # Panics
    ///
    /// When polled after it returned `Ready`; when this caller was the one polling the shared
    /// call when it panicked, with that panic (resumed after every other caller was given its
    /// error); and with the panic of the response's `Clone` when its clone panics (after the
    /// other callers were served: the call is over for them). Dropping it may panic with the
    /// panic of the inner future's destructor, when it is the last caller of a call still
    /// running (the call is still removed and counted as abandoned). A pass-through call
    /// panics where the inner service's future does.
    pub struct ResponseFuture<S, Req, K>
    where
        S: Service<Req>,
        S::Response: Send,
        S::Response: 'static,
    {
        #[pin]
        kind: Kind<S, Req, K>,
    }
}

impl<S, Req, K> fmt::Debug for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ResponseFuture");
        match &self.kind {
            Kind::Shared { join } => d.field("join", join),
            Kind::Pass { .. } => d.field("pass", &true),
        };
        d.finish()
    }
}

impl<S, Req, K> ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Send + 'static,
{
    pub(super) fn shared(join: CallShare<S, Req, K>) -> Self {
        ResponseFuture {
            kind: Kind::Shared { join },
        }
    }

    pub(super) fn pass(call: Upstream<S, Req>) -> Self {
        ResponseFuture {
            kind: Kind::Pass { call },
        }
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
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Shared { join } => Pin::new(join)
                .poll(cx)
                .map(|r| r.map_err(Failure::into_box)),
            KindProj::Pass { call } => call.poll(cx),
        }
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
