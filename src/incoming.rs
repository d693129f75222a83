//! The server's connections: plaintext TCP, or TLS with the configuration
//! current at accept time (so rotated certificates apply to new connections
//! only). The loop takes a place in the listener's budget before it accepts,
//! so a flood waits in the kernel's backlog instead of exhausting file
//! descriptors. Every connection then proves itself in a task of its own:
//! first bytes within a deadline, the TLS handshake within its own deadline,
//! and the HTTP/2 preface within a deadline. There is deliberately no
//! separate pool of handshake slots: a slot is held while the peer is slow,
//! so a pool smaller than the budget lets peers that send one byte (or a
//! whole ClientHello) and stall starve real handshakes. The budget already
//! bounds how many handshakes run, and the deadlines how long each lasts.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, timeout},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    connections::{ConnectionLimits, Guarded, HTTP2_PREFACE},
    identity::{PeerInfo, certificate_identity},
    tls::CurrentTlsConfig,
};

/// Admitted connections waiting for tonic to take them.
const READY_QUEUE: usize = 256;

/// After an accept error (out of file descriptors, typically), wait this long
/// rather than spin on the same error.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One accepted connection, its preface checked, under the listener's bounds.
pub type Conn = Guarded<Stream>;

/// The transport of a connection.
#[derive(Debug)]
pub enum Stream {
    /// No TLS (local runs, or a mesh sidecar in front).
    Plain(TcpStream),
    /// TLS, possibly with a verified client certificate.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self.get_ref() {
            Stream::Plain(tcp) => PeerInfo {
                remote_addr: tcp.peer_addr().ok(),
                certificate_identity: None,
                activity: Some(self.activity()),
            },
            Stream::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                PeerInfo {
                    remote_addr: tcp.peer_addr().ok(),
                    certificate_identity: session
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| certificate_identity(leaf))
                        .map(Arc::from),
                    activity: Some(self.activity()),
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
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<Conn>> {
    let (ready, incoming) = mpsc::channel(READY_QUEUE);
    tokio::spawn(async move {
        loop {
            // Backpressure: no place in the budget, no accept.
            let permit = tokio::select! {
                () = ready.closed() => return,
                permit = limits.budget.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else { return };
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
            let (tls, ready, limits) = (tls.clone(), ready.clone(), limits.clone());
            tokio::spawn(async move {
                let peer = tcp.peer_addr().ok();
                match admit(tcp, tls, &limits).await {
                    Ok(stream) => {
                        // Counted from here, like tonic's GOAWAY age, so the
                        // grace is not eaten by the admission's deadlines.
                        let hard_end = limits.hard_end_after.map(|after| Instant::now() + after);
                        let mut conn =
                            Guarded::new(stream, permit, hard_end, limits.frames_per_sec);
                        if let Some(share) = limits.frame_share() {
                            conn = conn.share_frames(share);
                        }
                        if let Some(rule) = limits.idle_rule() {
                            conn = conn.close_when_idle(rule);
                        }
                        let _ = ready.send(Ok(conn)).await;
                    }
                    // A client's failure is its own business, but a stream
                    // of them is worth seeing at debug level.
                    Err(why) => tracing::debug!(?peer, why, "connection refused"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// The connection once it has shown itself to be an HTTP/2 client in time.
async fn admit(
    tcp: TcpStream,
    tls: Option<Arc<CurrentTlsConfig>>,
    limits: &ConnectionLimits,
) -> Result<Stream, &'static str> {
    let mut stream = match tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            // A silent peer is cut at the first-bytes deadline.
            match timeout(limits.first_bytes_timeout, tcp.peek(&mut [0u8; 1])).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err("closed before TLS"),
                Err(_) => return Err("no ClientHello in time"),
            }
            let acceptor = TlsAcceptor::from(tls.load_full());
            match timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                Ok(Err(_)) => return Err("TLS handshake failed"),
                Err(_) => return Err("TLS handshake timed out"),
            }
        }
    };
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    match timeout(limits.first_bytes_timeout, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == HTTP2_PREFACE => Ok(stream),
        Ok(Ok(_)) => Err("not HTTP/2"),
        Ok(Err(_)) => Err("closed before the HTTP/2 preface"),
        Err(_) => Err("no HTTP/2 preface in time"),
    }
}

impl AsyncRead for Stream {
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

impl AsyncWrite for Stream {
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
