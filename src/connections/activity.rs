//! Which connections have a call open. The I/O wrapper cannot tell a
//! sign-out waiting in the queue (no bytes for seconds) from an idle
//! connection, and hyper does not say; so a tower layer counts each
//! connection's open calls in state it shares with that connection's I/O
//! (through tonic's connect info, a request extension). A call is open from
//! the moment hyper hands it to the service until its response body is
//! dropped (sent, or the call cancelled). Only the service's own calls
//! count: a health Watch or a reflection stream stays open as long as the
//! peer likes, so counting it would let one stream per connection hold the
//! connection budget until the hard end. Such a stream on an otherwise idle
//! connection is ended with it (the client reconnects).

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::identity::PeerInfo;

/// The calls that keep a connection from being idle: the service's own
/// unary RPCs, which end by themselves.
const COUNTED_CALLS: &str = "/session.v1.SessionService/";

/// One connection's calls: how many are open, and when one last started or
/// ended. One lock for both, so a reader never sees the count drop to zero
/// with the time of an earlier call.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<(usize, Instant)>,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((0, Instant::now())),
        })
    }

    /// Counts a call open until the returned guard is dropped.
    pub(crate) fn open_call(self: &Arc<Self>) -> OpenCall {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = (state.0 + 1, Instant::now());
        OpenCall(self.clone())
    }

    /// How long the connection has had no call open at `now`; `None` while
    /// one is.
    pub(crate) fn quiet_for(&self, now: Instant) -> Option<Duration> {
        let (open, last) = *self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (open == 0).then(|| now.saturating_duration_since(last))
    }
}

/// A call counted open on its connection.
#[derive(Debug)]
pub(crate) struct OpenCall(Arc<Activity>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = (state.0.saturating_sub(1), Instant::now());
    }
}

/// Adds [`CountOpenCalls`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CountOpenCallsLayer;

impl<S> Layer<S> for CountOpenCallsLayer {
    type Service = CountOpenCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountOpenCalls { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CountOpenCalls<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for CountOpenCalls<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = request
            .uri()
            .path()
            .starts_with(COUNTED_CALLS)
            .then(|| request.extensions().get::<PeerInfo>())
            .flatten()
            .and_then(|peer| peer.activity.as_ref())
            .map(Activity::open_call);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match call {
                Some(call) => response.map(|inner| Body::new(CountedBody { inner, _call: call })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call counted open until it is dropped.
struct CountedBody {
    inner: Body,
    _call: OpenCall,
}

impl HttpBody for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_quiet_only_while_no_call_is_open() {
        let activity = Activity::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            activity.quiet_for(Instant::now()),
            Some(Duration::from_secs(5))
        );
        let call = activity.open_call();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(activity.quiet_for(Instant::now()), None, "a call is open");
        drop(call);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            activity.quiet_for(Instant::now()),
            Some(Duration::from_secs(2)),
            "quiet since the call ended"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_body_keeps_its_call_open_until_dropped() {
        let activity = Activity::new();
        let peer = PeerInfo {
            remote_addr: None,
            certificate_identity: None,
            activity: Some(activity.clone()),
        };
        let mut service = CountOpenCallsLayer.layer(tower::service_fn(|_: http::Request<()>| {
            // Not empty: tonic drops a body that has ended already.
            let body = http_body_util::Full::new(bytes::Bytes::from_static(b"message"));
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                Body::new(body),
            )))
        }));
        let request = |path: &str| {
            let mut request = http::Request::builder()
                .uri(path)
                .body(())
                .expect("request");
            request.extensions_mut().insert(peer.clone());
            request
        };
        let response = service
            .call(request("/session.v1.SessionService/GlobalSignOut"))
            .await
            .expect("response");
        assert_eq!(activity.quiet_for(Instant::now()), None);
        drop(response);
        assert!(activity.quiet_for(Instant::now()).is_some());

        // A stream the peer can keep open for ever does not count.
        let watch = service
            .call(request("/grpc.health.v1.Health/Watch"))
            .await
            .expect("response");
        assert!(activity.quiet_for(Instant::now()).is_some(), "{watch:?}");
    }
}
