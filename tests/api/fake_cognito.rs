//! A fake Cognito over real HTTP: it answers AWS JSON 1.1 bytes, so the real
//! SDK parses them, and records what it was sent.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

/// The request id the fake puts on every reply.
pub(crate) const FAKE_REQUEST_ID: &str = "3f2b5c1e-8d4a-4e7b-9c1f-0a1b2c3d4e5f";

/// What the fake answers to every request.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// HTTP 200 `{}`.
    Ok,
    /// An AWS JSON 1.1 error, as Cognito sends it.
    AwsError { status: u16, code: &'static str },
    /// Arbitrary bytes, for replies Cognito would never send.
    Raw {
        status: u16,
        content_type: &'static str,
        body: &'static str,
    },
    /// The inner reply after a delay (a slow Cognito).
    Delayed(Duration, Box<Reply>),
    /// UserNotFoundException for this username, `Ok` for any other.
    UnknownUser(&'static str),
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) target: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) signed: bool,
    pub(crate) body: serde_json::Value,
    pub(crate) arrived: std::time::Instant,
}

pub(crate) struct FakeCognito {
    addr: SocketAddr,
    reply: Arc<Mutex<Reply>>,
    requests: Arc<Recorder>,
    server: JoinHandle<()>,
}

/// Every request, and a signal each time one arrives.
#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<Recorded>>,
    arrived: Notify,
}

impl FakeCognito {
    pub(crate) async fn start(reply: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        let requests = Arc::new(Recorder::default());
        let recorded = requests.clone();
        let reply = Arc::new(Mutex::new(reply));
        let current = reply.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorded = recorded.clone();
                let current = current.clone();
                tokio::spawn(async move {
                    // Read per request: the SDK keeps connections open
                    // across a change of reply.
                    let service = service_fn(move |request| {
                        let reply = current.lock().expect("not poisoned").clone();
                        handle(request, reply, recorded.clone())
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            reply,
            requests,
            server,
        }
    }

    /// Answers every later request with `reply` (e.g. a throttling spell).
    pub(crate) fn set_reply(&self, reply: Reply) {
        *self.reply.lock().expect("not poisoned") = reply;
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.requests.requests.lock().expect("not poisoned").clone()
    }

    /// Waits until `n` requests have arrived (the Cognito calls are then in
    /// flight, or answered).
    pub(crate) async fn wait_for(&self, n: usize) {
        loop {
            let arrived = self.requests.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.requests().len() >= n {
                return;
            }
            arrived.await;
        }
    }
}

impl Drop for FakeCognito {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    reply: Reply,
    recorded: Arc<Recorder>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let target = header("x-amz-target");
    let content_type = header("content-type");
    let signed = header("authorization").is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256"));
    let arrived = std::time::Instant::now();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let asked_for_unknown =
        matches!(reply, Reply::UnknownUser(unknown) if body["Username"] == unknown);
    let number = {
        let mut requests = recorded.requests.lock().expect("not poisoned");
        requests.push(Recorded {
            target,
            content_type,
            signed,
            body,
            arrived,
        });
        requests.len()
    };
    recorded.arrived.notify_waiters();
    let reply = match reply {
        Reply::UnknownUser(_) if asked_for_unknown => Reply::AwsError {
            status: 400,
            code: "UserNotFoundException",
        },
        Reply::UnknownUser(_) => Reply::Ok,
        other => other,
    };
    Ok(respond(reply, number).await)
}

/// The request id of the `number`-th request (1-based) when it succeeds.
pub(crate) fn ok_request_id(number: usize) -> String {
    format!("{FAKE_REQUEST_ID}-{number}")
}

async fn respond(reply: Reply, number: usize) -> Response<Full<Bytes>> {
    let mut reply = reply;
    while let Reply::Delayed(delay, inner) = reply {
        tokio::time::sleep(delay).await;
        reply = *inner;
    }
    const AWS_JSON: &str = "application/x-amz-json-1.1";
    let builder = Response::builder();
    let response = match reply {
        Reply::Ok => builder
            .status(200)
            .header("content-type", AWS_JSON)
            .header("x-amzn-requestid", ok_request_id(number))
            .body(Full::from("{}")),
        Reply::AwsError { status, code } => builder
            .status(status)
            .header("content-type", AWS_JSON)
            .header("x-amzn-requestid", FAKE_REQUEST_ID)
            // Real Cognito appends ':' to the type; the SDK must strip it.
            .header("x-amzn-errortype", format!("{code}:"))
            .header("x-amzn-errormessage", "fake error message")
            .body(Full::from(format!(
                r#"{{"__type":"{code}","message":"fake error message"}}"#
            ))),
        Reply::Raw {
            status,
            content_type,
            body,
        } => builder
            .status(status)
            .header("x-amzn-requestid", FAKE_REQUEST_ID)
            .header("content-type", content_type)
            .body(Full::from(body)),
        Reply::Delayed(..) | Reply::UnknownUser(_) => unreachable!("resolved above"),
    };
    response.expect("valid response")
}
