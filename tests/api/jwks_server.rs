//! A JWKS endpoint of the test's own, over real HTTP: it serves the document
//! the test sets (or HTTP 503 when "down") and counts every fetch.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

#[derive(Default)]
struct State {
    document: Mutex<Option<Vec<u8>>>,
    fetches: AtomicUsize,
}

pub(crate) struct JwksServer {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl JwksServer {
    /// Serves `document` at `/{any pool}/.well-known/jwks.json`.
    pub(crate) async fn start(document: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            document: Mutex::new(Some(document)),
            fetches: AtomicUsize::new(0),
        });
        let served = state.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, request.uri().path())) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            state,
            server,
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new document, or `None` for HTTP 503 from now on.
    pub(crate) fn set(&self, document: Option<Vec<u8>>) {
        *self.state.document.lock().expect("lock") = document;
    }

    pub(crate) fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }
}

fn answer(state: &State, path: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    if !path.ends_with("/.well-known/jwks.json") {
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
        return response;
    }
    state.fetches.fetch_add(1, Ordering::SeqCst);
    match state.document.lock().expect("lock").clone() {
        Some(document) => *response.body_mut() = Full::new(Bytes::from(document)),
        None => *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE,
    }
    response
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}
