//! Two checks on every HTTP request, before any handler runs: it must be a
//! gRPC request (POST, `content-type: application/grpc*`; anything else gets
//! HTTP 415 and reaches no service), and its body must arrive within
//! `--request-body-timeout` of the headers, so a stream whose request never
//! ends does not hold a call slot. `te: trailers` is not demanded: some
//! proxies drop it, and a call without it is otherwise well-formed.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::body::Body;
use tower::{Layer, Service};

/// Reflection streams are bidirectional by design and stay open while a
/// tool browses; the connection's hard end bounds them instead.
const STREAMING_PREFIX: &str = "/grpc.reflection.";

/// Adds [`RequestGuard`].
#[derive(Debug, Clone, Copy)]
pub struct RequestGuardLayer {
    body_timeout: Duration,
}

impl RequestGuardLayer {
    /// Request bodies must be complete within `body_timeout`.
    pub fn new(body_timeout: Duration) -> Self {
        Self { body_timeout }
    }
}

impl<S> Layer<S> for RequestGuardLayer {
    type Service = RequestGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestGuard {
            inner,
            body_timeout: self.body_timeout,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct RequestGuard<S> {
    inner: S,
    body_timeout: Duration,
}

impl<S> Service<http::Request<Body>> for RequestGuard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Some(status) = refusal(&request) {
            let response = http::Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(Body::new(http_body_util::Full::new(bytes_of(status))))
                .unwrap_or_default();
            return Box::pin(async move { Ok(response) });
        }
        let request = if request.uri().path().starts_with(STREAMING_PREFIX) {
            request
        } else {
            let timeout = self.body_timeout;
            request.map(|body| Body::new(DeadlineBody::new(body, timeout)))
        };
        Box::pin(self.inner.call(request))
    }
}

/// Why `request` is not gRPC, as the HTTP status to answer with.
fn refusal<B>(request: &http::Request<B>) -> Option<http::StatusCode> {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value == "application/grpc"
                || value.starts_with("application/grpc+")
                || value.starts_with("application/grpc;")
        });
    if request.method() != http::Method::POST {
        Some(http::StatusCode::METHOD_NOT_ALLOWED)
    } else if !grpc {
        Some(http::StatusCode::UNSUPPORTED_MEDIA_TYPE)
    } else {
        None
    }
}

fn bytes_of(status: http::StatusCode) -> bytes::Bytes {
    let reason = status.canonical_reason().unwrap_or("refused");
    bytes::Bytes::from(format!("{reason}: gRPC requests only\n"))
}

/// A request body that fails (ABORTED, see `error::request_body_timeout`)
/// if it has not ended by its deadline.
///
/// A transport error on the body (the client reset the stream, or the
/// connection ended: a hard end, a dropped peer) is never handed on: tonic
/// reads a CANCELLED body error as the body's plain end and answers INTERNAL
/// "missing request message", and other errors as UNKNOWN, both server
/// faults a client could produce at will. Instead the body stays pending;
/// hyper sees the reset (`poll_reset`) and drops the call, which the
/// telemetry layer records as CANCELLED at info. The deadline still bounds
/// the wait should nothing drop it.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    after: Duration,
    /// The inner body failed; it is not polled again.
    failed: bool,
}

impl DeadlineBody {
    fn new(inner: Body, after: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(after)),
            after,
            failed: false,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if !self.failed {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Err(_transport))) => self.failed = true,
                Poll::Ready(frame) => return Poll::Ready(frame),
                Poll::Pending => {}
            }
        }
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Some(Err(crate::error::request_body_timeout(self.after))))
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, content_type: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri("/session.v1.SessionService/GlobalSignOut");
        if let Some(value) = content_type {
            builder = builder.header("content-type", value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn only_grpc_posts_pass() {
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc; charset=x",
        ] {
            assert_eq!(refusal(&request("POST", Some(ok))), None, "{ok}");
        }
        for (method, content_type, status) in [
            ("GET", Some("application/grpc"), 405),
            ("POST", Some("text/plain"), 415),
            ("POST", Some("application/grpcx"), 415),
            ("POST", Some("application/json"), 415),
            ("POST", None, 415),
        ] {
            let refused = refusal(&request(method, content_type)).map(|s| s.as_u16());
            assert_eq!(refused, Some(status), "{method} {content_type:?}");
        }
    }

    /// A body whose first frame is a transport error (a client reset).
    struct Failing;

    impl HttpBody for Failing {
        type Data = bytes::Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(Some(Err(tonic::Status::cancelled("stream reset"))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_body_stays_pending_until_the_deadline() {
        use http_body_util::BodyExt;
        let mut body = DeadlineBody::new(Body::new(Failing), Duration::from_secs(10));
        let early = tokio::time::timeout(Duration::from_secs(9), body.frame()).await;
        assert!(
            early.is_err(),
            "a transport error reached tonic: {:?}",
            early.map(|f| f.map(|f| f.map(|_| ())))
        );
        let late = body.frame().await.expect("a frame").expect_err("timeout");
        assert_eq!(late.code(), tonic::Code::Aborted);
    }
}
