//! The server side of every API call, as a tower layer over the HTTP request
//! (the only place the caller's `traceparent` can become the parent before
//! the span is entered): the RPC span, the RPC duration metric, and one
//! access line. Health and reflection calls pass through untouched.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::{
    propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use prost::Message;
use tonic::Code;
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{error::is_server_fault, metrics::Metrics};

/// Path prefix of our own API; everything else (health, reflection) is
/// infrastructure and not traced or access-logged.
const API_PREFIX: &str = "/session.v1.";

/// What the handler learns about a call, for the access line.
#[derive(Debug, Clone, Default)]
pub struct AccessNote(Arc<Mutex<AccessFields>>);

#[derive(Debug, Default)]
struct AccessFields {
    caller: Option<String>,
    user_pool_id: Option<String>,
    user_hash: Option<String>,
    username: Option<String>,
}

impl AccessNote {
    /// The caller, once identified.
    pub fn caller(&self, caller: &str) {
        self.fields().caller = Some(caller.to_owned());
    }

    /// The pool and user, once validated. `username` only when the operator
    /// opted in to logging usernames.
    pub fn target(&self, user_pool_id: &str, user_hash: String, username: Option<&str>) {
        let mut fields = self.fields();
        fields.user_pool_id = Some(user_pool_id.to_owned());
        fields.user_hash = Some(user_hash);
        fields.username = username.map(str::to_owned);
    }

    fn fields(&self) -> std::sync::MutexGuard<'_, AccessFields> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Adds [`RpcTelemetry`] around the server's routes.
#[derive(Debug, Clone)]
pub struct RpcTelemetryLayer {
    metrics: Arc<Metrics>,
}

impl RpcTelemetryLayer {
    /// Records RPC durations into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

/// Our API's methods, read once per process from the embedded descriptors
/// (every server built in the process shares them, and their leaked names).
static API_METHODS: LazyLock<ApiMethods> =
    LazyLock::new(|| ApiMethods::from_descriptors(crate::proto::FILE_DESCRIPTOR_SET));

/// The methods our protos declare, as (service, method) names: a handful,
/// so a list beats a map.
#[derive(Debug, Default)]
struct ApiMethods(Vec<(String, &'static str)>);

impl ApiMethods {
    /// The methods of every service in an encoded `FileDescriptorSet`. The
    /// names are leaked (once, see `API_METHODS`) so labels are `&'static str`.
    fn from_descriptors(encoded: &[u8]) -> Self {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
            return Self::default();
        };
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let name: &'static str = Box::leak(method.name().to_owned().into_boxed_str());
                    methods.push((service_name.clone(), name));
                }
            }
        }
        Self(methods)
    }

    /// `method` when the proto declares it on `service`, else "unknown".
    fn label(&self, service: &str, method: &str) -> &'static str {
        self.0
            .iter()
            .find(|(s, m)| s == service && *m == method)
            .map_or("unknown", |(_, m)| *m)
    }
}

impl<S> Layer<S> for RpcTelemetryLayer {
    type Service = RpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTelemetry {
            inner,
            metrics: self.metrics.clone(),
            propagator: Arc::new(TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ])),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct RpcTelemetry<S> {
    inner: S,
    metrics: Arc<Metrics>,
    propagator: Arc<TextMapCompositePropagator>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for RpcTelemetry<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the instance that was polled ready is.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        let Some((service, method)) = api_method(path) else {
            return Box::pin(inner.call(request));
        };
        // Only methods the proto declares become labels; any other path
        // under our prefix (UNIMPLEMENTED) is "unknown", so callers cannot
        // mint label values.
        let method = API_METHODS.label(service, method);
        let parent = self.propagator.extract(&HeaderExtractor(request.headers()));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            caller.id = Empty,
            caller.verified = Empty,
            // VerifyToken's verdict (active or a reason), never a claim.
            token.result = Empty,
        );
        // Before the span is entered, or the parent is silently ignored.
        let _ = span.set_parent(parent.clone());
        let note = AccessNote::default();
        request.extensions_mut().insert(note.clone());
        let mut record = CallRecord {
            metrics: self.metrics.clone(),
            method,
            started: Instant::now(),
            note,
            parent,
            recorded: false,
        };
        let call = inner.call(request);
        Box::pin(
            async move {
                let response = call.await;
                let code = match &response {
                    Ok(response) => grpc_status(response.headers()),
                    Err(_) => Code::Unknown,
                };
                record.finish(code);
                response
            }
            .instrument(span),
        )
    }
}

/// The metric and access line of one call, written when the call ends or,
/// if the call is dropped first, when it is dropped. tonic's own
/// `grpc-timeout` layer sits outside every layer we add and drops the call
/// when the caller's deadline passes, and hyper drops it when the client
/// resets the stream: either way the caller was told CANCELLED (or nothing),
/// and the call is still counted and logged as such.
struct CallRecord {
    metrics: Arc<Metrics>,
    method: &'static str,
    started: Instant,
    note: AccessNote,
    parent: opentelemetry::Context,
    recorded: bool,
}

impl CallRecord {
    fn finish(&mut self, code: Code) {
        self.recorded = true;
        let span = tracing::Span::current();
        span.record("rpc.grpc.status_code", code as i32);
        if is_server_fault(code) {
            span.record("otel.status_code", "ERROR");
        }
        let elapsed = self.started.elapsed();
        self.metrics
            .rpc_duration
            .with_label_values(&[self.method, code_name(code)])
            .observe(elapsed.as_secs_f64());
        let trace_id = [span.context(), self.parent.clone()]
            .iter()
            .map(|cx| cx.span().span_context().clone())
            .find(|sc| sc.is_valid())
            .map(|sc| sc.trace_id().to_string())
            .unwrap_or_default();
        access_line(
            self.method,
            code,
            elapsed.as_secs_f64() * 1000.0,
            &trace_id,
            &self.note,
        );
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.recorded {
            // `Instrumented` drops the call inside its span, so this line
            // and these fields still belong to the RPC span.
            self.finish(Code::Cancelled);
        }
    }
}

/// `(service, method)` of a call to our API.
fn api_method(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix('/')
        .filter(|_| path.starts_with(API_PREFIX))?
        .split_once('/')
}

/// A unary error is "trailers-only": its status is in the headers. A
/// response without one is a success whose status follows in the trailers.
fn grpc_status(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// One line per RPC: info for the caller's mistakes and refusals, warn for
/// upstream trouble, error for our own faults.
fn access_line(method: &str, code: Code, latency_ms: f64, trace_id: &str, note: &AccessNote) {
    let fields = note.fields();
    let caller = fields.caller.as_deref().unwrap_or("");
    let pool = fields.user_pool_id.as_deref().unwrap_or("");
    let user_hash = fields.user_hash.as_deref().unwrap_or("");
    let code_label = code_name(code);
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                target: "access",
                method,
                code = code_label,
                latency_ms,
                caller,
                trace_id,
                user_pool_id = pool,
                user_hash,
                username = fields.username.as_deref(),
                "rpc"
            )
        };
    }
    match code {
        Code::Unavailable | Code::DeadlineExceeded => line!(warn),
        code if is_server_fault(code) => line!(error),
        _ => line!(info),
    }
}

/// The canonical UPPER_SNAKE_CASE name of a gRPC code, for labels and logs.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Reads W3C trace context and baggage from HTTP/2 headers (gRPC metadata).
/// Values longer than the W3C limits are ignored before any parsing.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

/// Longest value read per header: traceparent is 55 characters, tracestate
/// 32 members of at most 256 (W3C caps it at 512 in practice), baggage 8192.
fn max_trace_header_len(key: &str) -> usize {
    match key {
        "traceparent" => 64,
        "tracestate" => 512,
        _ => 8192,
    }
}

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .filter(|v| v.len() <= max_trace_header_len(key))
            .and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_api_is_traced() {
        assert_eq!(
            api_method("/session.v1.SessionService/GlobalSignOut"),
            Some(("session.v1.SessionService", "GlobalSignOut"))
        );
        assert_eq!(api_method("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            api_method("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
    }

    #[test]
    fn only_declared_methods_become_labels() {
        let methods = ApiMethods::from_descriptors(crate::proto::FILE_DESCRIPTOR_SET);
        assert_eq!(
            methods.label("session.v1.SessionService", "GlobalSignOut"),
            "GlobalSignOut"
        );
        for (service, method) in [
            ("session.v1.SessionService", "Nope"),
            ("session.v1.Other", "GlobalSignOut"),
            ("session.v1.SessionService", "globalsignout"),
        ] {
            assert_eq!(
                methods.label(service, method),
                "unknown",
                "{service}/{method}"
            );
        }
    }

    #[test]
    fn a_trailers_only_status_is_read_from_the_headers() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_status(&headers), Code::Ok);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&headers), Code::NotFound);
    }

    #[test]
    fn oversized_trace_headers_are_ignored() {
        let mut headers = http::HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", http::HeaderValue::from_static(parent));
        let long = http::HeaderValue::from_str(&"k=v,".repeat(3000)).expect("ascii");
        headers.insert("baggage", long);
        let extractor = HeaderExtractor(&headers);
        assert_eq!(extractor.get("traceparent"), Some(parent));
        assert_eq!(extractor.get("baggage"), None);
    }

    #[test]
    fn code_names_are_the_canonical_ones() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::from_i32(4)), "DEADLINE_EXCEEDED");
    }
}
