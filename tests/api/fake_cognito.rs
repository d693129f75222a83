//! A fake Cognito over real HTTP: it answers AWS JSON 1.1 bytes, so the real
//! SDK parses them, and records what it was sent. Sign-outs get the one
//! [`Reply`]; AdminGetUser lookups are answered from a user table of their
//! own and recorded apart, so `requests()` means sign-outs only. A JWKS
//! document, once set, is served on `GET /{pool}/.well-known/jwks.json`,
//! so that one endpoint serves both the sign-outs and the test's own keys.

use std::{
    collections::HashMap,
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
    directory: Arc<Directory>,
    jwks: Arc<Mutex<Option<Bytes>>>,
    server: JoinHandle<()>,
}

/// Every request, and a signal each time one arrives.
#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<Recorded>>,
    arrived: Notify,
}

impl Recorder {
    /// Reads `request` whole, keeps it, wakes `wait_for`; returns its JSON
    /// body and its number (1 for the first).
    async fn record(&self, request: Request<hyper::body::Incoming>) -> (serde_json::Value, usize) {
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
        let number = {
            let mut requests = self.requests.lock().expect("not poisoned");
            requests.push(Recorded {
                target,
                content_type,
                signed,
                body: body.clone(),
                arrived,
            });
            requests.len()
        };
        self.arrived.notify_waiters();
        (body, number)
    }
}

/// What AdminGetUser answers: users by the name asked for (canonical
/// username, sub); any other name is a user of that name.
#[derive(Default)]
struct Directory {
    users: Mutex<HashMap<String, (String, String)>>,
    /// Replaces the user table's answer (throttling, errors).
    reply: Mutex<Option<Reply>>,
    lookups: Recorder,
}

impl FakeCognito {
    pub(crate) async fn start(reply: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        let requests = Arc::new(Recorder::default());
        let recorded = requests.clone();
        let directory = Arc::new(Directory::default());
        let users = directory.clone();
        let reply = Arc::new(Mutex::new(reply));
        let current = reply.clone();
        let jwks = Arc::new(Mutex::new(None::<Bytes>));
        let keys = jwks.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorded = recorded.clone();
                let current = current.clone();
                let users = users.clone();
                let keys = keys.clone();
                tokio::spawn(async move {
                    // Read per request: the SDK keeps connections open
                    // across a change of reply.
                    let service = service_fn(move |request: Request<_>| {
                        let reply = current.lock().expect("not poisoned").clone();
                        let recorded = recorded.clone();
                        let users = users.clone();
                        let keys = keys.clone();
                        async move {
                            if request.uri().path().ends_with("/.well-known/jwks.json") {
                                serve_jwks(&keys)
                            } else if is_lookup(&request) {
                                look_up(request, users).await
                            } else {
                                handle(request, reply, recorded).await
                            }
                        }
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
            directory,
            jwks,
            server,
        }
    }

    /// Serves `document` as every pool's JWKS from now on (HTTP 404 until
    /// then, as for any path Cognito does not have).
    pub(crate) fn set_jwks(&self, document: Vec<u8>) {
        *self.jwks.lock().expect("not poisoned") = Some(Bytes::from(document));
    }

    /// AdminGetUser of `requested` answers `canonical` with this `sub`.
    pub(crate) fn set_user(&self, requested: &str, canonical: &str, sub: &str) {
        self.directory
            .users
            .lock()
            .expect("not poisoned")
            .insert(requested.to_owned(), (canonical.to_owned(), sub.to_owned()));
    }

    /// Answers every later AdminGetUser with `reply` (`None`: the user table).
    pub(crate) fn set_lookup_reply(&self, reply: Option<Reply>) {
        *self.directory.reply.lock().expect("not poisoned") = reply;
    }

    /// The AdminGetUser requests received.
    pub(crate) fn lookups(&self) -> Vec<Recorded> {
        self.directory
            .lookups
            .requests
            .lock()
            .expect("not poisoned")
            .clone()
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
    let (body, number) = recorded.record(request).await;
    let asked_for_unknown =
        matches!(reply, Reply::UnknownUser(unknown) if body["Username"] == unknown);
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

fn serve_jwks(jwks: &Mutex<Option<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let document = jwks.lock().expect("not poisoned").clone();
    let response = match document {
        Some(document) => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::from(document)),
        None => Response::builder().status(404).body(Full::default()),
    };
    Ok(response.expect("valid response"))
}

fn is_lookup<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get("x-amz-target")
        .is_some_and(|t| t == "AWSCognitoIdentityProviderService.AdminGetUser")
}

/// The sub the fake gives a user it does not know: stable, UUID-shaped.
pub(crate) fn synthesized_sub(username: &str) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let hash = |salt: u8| {
        let mut hasher = DefaultHasher::new();
        (salt, username).hash(&mut hasher);
        hasher.finish()
    };
    let (a, b) = (hash(1), hash(2));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

async fn look_up(
    request: Request<hyper::body::Incoming>,
    directory: Arc<Directory>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (body, number) = directory.lookups.record(request).await;
    let requested = body["Username"].as_str().unwrap_or_default().to_owned();
    let reply = directory.reply.lock().expect("not poisoned").clone();
    match reply {
        Some(Reply::UnknownUser(unknown)) if requested == unknown => {
            let not_found = Reply::AwsError {
                status: 400,
                code: "UserNotFoundException",
            };
            return Ok(respond(not_found, number).await);
        }
        Some(Reply::UnknownUser(_)) | None => {}
        Some(reply) => return Ok(respond(reply, number).await),
    }
    let (username, sub) = directory
        .users
        .lock()
        .expect("not poisoned")
        .get(&requested)
        .cloned()
        .unwrap_or_else(|| (requested.clone(), synthesized_sub(&requested)));
    let user = serde_json::json!({
        "Username": username,
        "UserAttributes": [
            { "Name": "sub", "Value": sub },
        ],
        "Enabled": true,
        "UserStatus": "CONFIRMED",
    });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", format!("lookup-{number}"))
        .body(Full::from(user.to_string()))
        .expect("valid response"))
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
