//! What operators see: spans exported over OTLP (joined to the caller's
//! trace), access and audit log lines, and /metrics. Usernames appear in
//! none of them.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};
use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Request};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, SECRET_USERNAME, TestApp, channel, spawn_binary, terminate, test_config},
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
/// The user the fake does not know.
const GHOST_USERNAME: &str = "ghost.user@example.com";

// === OTLP receiver ===

/// An OTLP/gRPC trace collector on port 0 that keeps every span it receives,
/// and the resource attributes they came with.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    resources: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("not poisoned");
        let mut resources = self.resources.lock().expect("not poisoned");
        for resource_spans in request.into_inner().resource_spans {
            for kv in resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default()
            {
                if let Some(AnyValue::StringValue(value)) = kv.value.and_then(|v| v.value) {
                    resources.push((kv.key, value));
                }
            }
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Self, SocketAddr) {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (collector, addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("not poisoned").clone()
    }

    fn resource(&self, key: &str) -> Option<String> {
        let resources = self.resources.lock().expect("not poisoned");
        resources
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

fn string_attribute(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key)? {
        AnyValue::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key)? {
        AnyValue::IntValue(i) => Some(i),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traced_request(username: &str) -> Request<GlobalSignOutRequest> {
    let mut request = Request::new(GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: username.into(),
    });
    let metadata = request.metadata_mut();
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    metadata.insert("traceparent", traceparent.parse().expect("ascii"));
    metadata.insert("x-caller-id", "billing".parse().expect("ascii"));
    request
}

/// The real binary, configured through the standard OTEL_* variables (on
/// the child only), exports to an in-test collector; SIGTERM must flush.
#[tokio::test]
async fn spans_join_the_callers_trace_and_no_username_reaches_spans_or_logs() {
    let (collector, collector_addr) = Collector::start().await;
    let fake = FakeCognito::start(Reply::UnknownUser(GHOST_USERNAME)).await;
    let otlp = format!("http://{collector_addr}");
    let (child, addr, logs) = spawn_binary(
        &[
            "--cognito-endpoint",
            &fake.endpoint(),
            "--drain-delay",
            "0s",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp),
            ("OTEL_SERVICE_NAME", "session-service-under-test"),
        ],
    );
    let mut client = SessionServiceClient::new(channel(addr).await);

    client
        .global_sign_out(traced_request(SECRET_USERNAME))
        .await
        .expect("signed out");
    let missing = client.global_sign_out(traced_request(GHOST_USERNAME)).await;
    let status = terminate(child).await;

    assert_eq!(status.code(), Some(0));
    assert_eq!(missing.expect_err("unknown user").code(), Code::NotFound);
    let spans = collector.spans();
    assert_eq!(
        collector.resource("service.name").as_deref(),
        Some("session-service-under-test")
    );
    assert_eq!(
        collector.resource("service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let servers: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "session.v1.SessionService/GlobalSignOut")
        .collect();
    assert_eq!(
        servers.len(),
        2,
        "one server span per call, flushed on SIGTERM: {spans:#?}"
    );
    for server in &servers {
        assert_eq!(hex(&server.trace_id), TRACE_ID, "joined the caller's trace");
        assert_eq!(
            hex(&server.parent_span_id),
            PARENT_SPAN_ID,
            "child of the caller's span"
        );
        assert_eq!(
            string_attribute(server, "rpc.system").as_deref(),
            Some("grpc")
        );
        assert_eq!(
            string_attribute(server, "rpc.service").as_deref(),
            Some("session.v1.SessionService")
        );
        assert_eq!(
            string_attribute(server, "rpc.method").as_deref(),
            Some("GlobalSignOut")
        );
        assert_eq!(
            string_attribute(server, "caller.id").as_deref(),
            Some("billing")
        );
    }
    let codes: Vec<_> = servers
        .iter()
        .map(|s| int_attribute(s, "rpc.grpc.status_code"))
        .collect();
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(5)),
        "{codes:?}"
    );
    let cognito: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "CognitoIdentityProvider/AdminUserGlobalSignOut")
        .collect();
    assert_eq!(cognito.len(), 2);
    for call in &cognito {
        let parent = servers.iter().find(|s| s.span_id == call.parent_span_id);
        assert!(
            parent.is_some(),
            "the Cognito span is a child of a server span"
        );
        assert_eq!(int_attribute(call, "attempts"), Some(1));
        assert!(string_attribute(call, "aws.request_id").is_some());
    }
    let failed = cognito
        .iter()
        .find_map(|s| string_attribute(s, "cognito.error_code"));
    assert_eq!(failed.as_deref(), Some("UserNotFoundException"));
    for span in &spans {
        for kv in &span.attributes {
            let value = format!("{:?}", kv.value);
            for username in [SECRET_USERNAME, GHOST_USERNAME] {
                assert!(
                    !value.contains(username),
                    "username in span {}: {}",
                    span.name,
                    kv.key
                );
            }
        }
    }

    let lines: Vec<String> = logs.try_iter().collect();
    let text = lines.join("\n");
    for username in [SECRET_USERNAME, GHOST_USERNAME] {
        assert!(!text.contains(username), "username in the logs:\n{text}");
    }
    let lines: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("every log line is JSON"))
        .collect();
    let access: Vec<_> = lines.iter().filter(|l| l["target"] == "access").collect();
    let audit: Vec<_> = lines.iter().filter(|l| l["target"] == "audit").collect();
    assert_eq!(access.len(), 2, "one access line per RPC:\n{text}");
    assert_eq!(
        audit.len(),
        2,
        "one audit record per sign-out that reached Cognito:\n{text}"
    );
    for line in access.iter().chain(&audit) {
        assert_eq!(line["caller"], "billing");
        assert_eq!(line["user_pool_id"], POOL);
        assert_eq!(line["user_hash"].as_str().map(str::len), Some(24));
    }
    assert!(
        access
            .iter()
            .all(|l| l["trace_id"] == TRACE_ID && l["method"] == "GlobalSignOut")
    );
    assert!(
        access
            .iter()
            .any(|l| l["code"] == "NOT_FOUND" && l["level"] == "INFO")
    );
    assert!(
        audit
            .iter()
            .any(|l| l["outcome"] == "UserNotFoundException")
    );
    assert!(
        audit
            .iter()
            .any(|l| l["outcome"] == "signed_out" && l["aws_request_id"].is_string())
    );
    println!(
        "spans: {:#?}",
        servers
            .iter()
            .chain(&cognito)
            .map(|s| (
                &s.name,
                hex(&s.span_id),
                hex(&s.parent_span_id),
                &s.attributes
            ))
            .collect::<Vec<_>>()
    );
    println!(
        "access and audit lines:\n{}",
        access
            .iter()
            .chain(&audit)
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// === metrics ===

async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let body = crate::helpers::metrics_text(addr).await;
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.last().map_or(0.0, |b| b.count)
            }
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_count_a_known_mix_of_calls_exactly() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.allowed_user_pool_ids = vec![POOL.parse().expect("valid")];
    config.per_caller_rps = Some(1.0);
    config.per_caller_burst = Some(1);
    // Self-declared callers have allowances of their own only when named.
    config.per_caller_rps_overrides = ["a", "b"]
        .map(|id| {
            (
                session_service::identity::CallerId::parse(id).expect("id"),
                1.0,
            )
        })
        .to_vec();
    let app = TestApp::spawn(config).await;
    let call = |pool: &str, user: &str, caller: &str| {
        let mut client = app.client.clone();
        let mut request = Request::new(GlobalSignOutRequest {
            user_pool_id: pool.into(),
            username: user.into(),
        });
        request
            .metadata_mut()
            .insert("x-caller-id", caller.parse().expect("ascii"));
        async move {
            client
                .global_sign_out(request)
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
    };

    assert!(call(POOL, "alice", "a").await.is_ok());
    assert!(call(POOL, "bob", "b").await.is_ok());
    assert_eq!(
        call(POOL, "bad name", "c").await,
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        call("eu-west-1_Other", "carol", "d").await,
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        call(POOL, "dave", "a").await,
        Err(Code::ResourceExhausted),
        "caller a is over 1/s"
    );
    let scrape = scrape(app.metrics_addr).await;

    let rpc = |code| {
        value(
            &scrape,
            "session_rpc_duration_seconds_count",
            &[("method", "GlobalSignOut"), ("code", code)],
        )
    };
    assert_eq!(rpc("OK"), Some(2.0));
    assert_eq!(rpc("INVALID_ARGUMENT"), Some(1.0));
    assert_eq!(rpc("PERMISSION_DENIED"), Some(1.0));
    assert_eq!(rpc("RESOURCE_EXHAUSTED"), Some(1.0));
    assert_eq!(
        value(
            &scrape,
            "session_cognito_requests_total",
            &[("outcome", "OK")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &scrape,
            "session_cognito_request_duration_seconds_count",
            &[("outcome", "OK")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &scrape,
            "session_rate_limit_rejections_total",
            &[("reason", "CALLER_RATE_LIMITED")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "session_rate_limit_permit_wait_seconds_count", &[]),
        Some(2.0)
    );
    assert_eq!(
        value(&scrape, "session_rate_limit_queue_depth", &[]),
        Some(0.0)
    );
    assert_eq!(value(&scrape, "session_cognito_in_flight", &[]), Some(0.0));
    assert_eq!(
        value(&scrape, "session_rate_limit_rate_per_second", &[]),
        Some(20.0)
    );
    assert_eq!(
        value(
            &scrape,
            "session_rate_limit_configured_rate_per_second",
            &[]
        ),
        Some(20.0)
    );
    assert_eq!(
        value(
            &scrape,
            "session_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(fake.requests().len(), 2);
    let names: std::collections::BTreeSet<_> = scrape.docs.keys().collect();
    println!("metric names: {names:?}");
}

#[tokio::test]
async fn the_metrics_listener_answers_404_elsewhere() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let mut stream = TcpStream::connect(app.metrics_addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("answered")
    .expect("read");
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
}

#[tokio::test]
async fn usernames_reach_the_access_log_only_when_an_operator_opts_in() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let endpoint = fake.endpoint();
    let mut access_lines = Vec::new();
    for opt_in in [false, true] {
        let mut args = vec![
            "--cognito-endpoint",
            endpoint.as_str(),
            "--drain-delay",
            "0s",
        ];
        if opt_in {
            args.push("--log-usernames");
        }
        let (child, addr, logs) = spawn_binary(&args, &[]);
        let mut client = SessionServiceClient::new(channel(addr).await);
        client
            .global_sign_out(traced_request(SECRET_USERNAME))
            .await
            .expect("signed out");
        let status = terminate(child).await;
        assert_eq!(status.code(), Some(0));
        let access = logs
            .try_iter()
            .map(|line| serde_json::from_str::<serde_json::Value>(&line).expect("JSON"))
            .find(|line| line["target"] == "access")
            .expect("an access line");
        access_lines.push(access);
    }

    assert_eq!(access_lines[0].get("username"), None, "{}", access_lines[0]);
    assert_eq!(
        access_lines[1]["username"], SECRET_USERNAME,
        "{}",
        access_lines[1]
    );
}
