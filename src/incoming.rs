//! The server's connections: plaintext TCP, or TLS with the configuration
//! current at accept time (so rotated certificates apply to new connections
//! only). Handshakes run in their own tasks with a timeout, so one slow or
//! silent client cannot hold up the accept loop.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    identity::{PeerInfo, certificate_identity},
    tls::CurrentTlsConfig,
};

/// TLS handshakes under way at most; beyond it, new connections wait in the
/// kernel's backlog instead of costing memory here.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// After an accept error (out of file descriptors, typically), wait this long
/// rather than spin on the same error.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One accepted connection.
#[derive(Debug)]
pub enum Conn {
    /// No TLS (local runs, or a mesh sidecar in front).
    Plain(TcpStream),
    /// TLS, possibly with a verified client certificate.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Self::Plain(tcp) => PeerInfo {
                remote_addr: tcp.peer_addr().ok(),
                certificate_identity: None,
            },
            Self::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                PeerInfo {
                    remote_addr: tcp.peer_addr().ok(),
                    certificate_identity: session
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| certificate_identity(leaf))
                        .map(Arc::from),
                }
            }
        }
    }
}

/// Accepts connections until the returned stream is dropped (tonic drops it
/// when it stops accepting, at the end of the drain delay); the listener
/// closes with it, so later connections are refused rather than left hanging.
pub fn accept(
    listener: TcpListener,
    tls: Option<Arc<CurrentTlsConfig>>,
    handshake_timeout: Duration,
) -> ReceiverStream<io::Result<Conn>> {
    let (ready, incoming) = mpsc::channel(MAX_PENDING_HANDSHAKES);
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = ready.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            // Small unary calls: Nagle would only add latency.
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                if ready.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(slot) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(tls.load_full());
            let ready = ready.clone();
            tokio::spawn(async move {
                let peer = tcp.peer_addr().ok();
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(Ok(Conn::Tls(Box::new(stream)))).await;
                    }
                    // A client's failed handshake is its own business, but
                    // a stream of them is worth seeing at debug level.
                    Ok(Err(error)) => tracing::debug!(?peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                }
                drop(slot);
            });
        }
    });
    ReceiverStream::new(incoming)
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(tcp) => tcp.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }
}
