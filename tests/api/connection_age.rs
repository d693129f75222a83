//! `--max-connection-age`: connections are retired with GOAWAY and clients
//! carry on over a new one, so traffic rebalances to new pods.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use session_service::proto::session_service_client::SessionServiceClient;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::mpsc,
};
use tonic::transport::Endpoint;

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, TestApp, test_config},
};

/// A TCP stream that reports when the client's transport drops it, i.e.
/// when its connection has ended.
struct Tracked {
    stream: TcpStream,
    closed: mpsc::UnboundedSender<()>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let _ = self.closed.send(());
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_aged_connection_is_retired_and_the_client_carries_on_over_a_new_one() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.max_connection_age = Duration::from_millis(500);
    let app = TestApp::spawn(config).await;
    let connections = Arc::new(AtomicUsize::new(0));
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let addr = app.addr;
    let counted = connections.clone();
    let channel = Endpoint::from_static("http://session-service.test")
        .connect_with_connector(tower::service_fn(move |_uri| {
            counted.fetch_add(1, Ordering::SeqCst);
            let closed = closed_tx.clone();
            async move {
                let stream = TcpStream::connect(addr).await?;
                Ok::<_, io::Error>(TokioIo::new(Tracked { stream, closed }))
            }
        }))
        .await
        .expect("connect");
    let mut client = SessionServiceClient::new(channel);
    let request = || session_service::proto::GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: "alice".into(),
    };
    client.global_sign_out(request()).await.expect("first call");

    // The server retires the connection at its age; no sleeping here, we
    // wait for the connection to end (bounded, in case it never does).
    tokio::time::timeout(Duration::from_secs(30), closed.recv())
        .await
        .expect("the aged connection was closed by the server")
        .expect("signal");

    client
        .global_sign_out(request())
        .await
        .expect("call on a new connection");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(fake.requests().len(), 2);
}
