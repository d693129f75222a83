//! The wrapper every accepted connection's I/O goes through: it holds the
//! connection's place in the listener's budget, replays the HTTP/2 preface
//! that was read to check the client, meters frames (see `frames.rs`),
//! closes the connection once idle (see `idle.rs`), and ends it hard at its
//! deadline whatever state HTTP/2 is in (tonic 0.14.9's own age grace
//! suppresses the GOAWAY, so it is not used).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::OwnedSemaphorePermit,
    time::{Instant, Sleep},
};

use super::{
    activity::Activity,
    frames::{FRAME_HEADER_LEN, FrameBudget, FrameCounter, FrameShare},
    idle::{Idle, IdleRule},
};

/// Largest read of a metered connection, and its scratch buffer: at the
/// default rate the budget allows 900 bytes a read, so 4 KiB keeps the
/// per-connection cost small while leaving room for higher rates.
const METERED_READ: usize = 4 * 1024;

/// Reads of a closing connection's bytes (dropped) before yielding, so a
/// peer that keeps sending cannot hold the task.
const DISCARD_READS: usize = 16;

/// The client connection preface every HTTP/2 connection starts with.
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An accepted connection's I/O under the listener's bounds.
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    /// Preface bytes already read from `io`, still to hand to HTTP/2.
    replay: &'static [u8],
    /// The connection is cut when this fires.
    hard_end: Option<Pin<Box<Sleep>>>,
    /// Frames handed to h2 (after the preface).
    received: FrameCounter,
    /// Frames h2 has written, so a GOAWAY of ours lands between two.
    sent: FrameCounter,
    budget: Option<FrameBudget>,
    /// Reads wait for this after the connection overdrew its frame budget.
    paused: Option<Pin<Box<Sleep>>>,
    /// A metered read lands here first, cut to what the budget affords.
    scratch: Vec<u8>,
    /// The connection's open calls, shared with the calls themselves.
    activity: Arc<Activity>,
    idle: Option<Idle>,
    _permit: OwnedSemaphorePermit,
}

impl<IO> Guarded<IO> {
    /// `io`, whose preface was read already, ended at `hard_end` and held
    /// to `frames_per_sec` when given.
    pub fn new(
        io: IO,
        permit: OwnedSemaphorePermit,
        hard_end: Option<Instant>,
        frames_per_sec: Option<u32>,
    ) -> Self {
        Self {
            io,
            replay: HTTP2_PREFACE,
            hard_end: hard_end.map(|at| Box::pin(tokio::time::sleep_until(at))),
            received: FrameCounter::default(),
            sent: FrameCounter::default(),
            budget: frames_per_sec.map(|rate| FrameBudget::new(rate, Instant::now())),
            paused: None,
            scratch: if frames_per_sec.is_some() {
                vec![0; METERED_READ]
            } else {
                Vec::new()
            },
            activity: Activity::new(),
            idle: None,
            _permit: permit,
        }
    }

    /// Holds the connection's frames to its share of the listener's total.
    pub fn share_frames(mut self, share: FrameShare) -> Self {
        self.budget = self.budget.map(|budget| budget.with_share(share));
        self
    }

    /// Closes the connection once idle by `rule`.
    pub fn close_when_idle(mut self, rule: IdleRule) -> Self {
        self.idle = Some(Idle::new(rule));
        self
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The connection's open calls, for the layer that counts them.
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    fn check_hard_end(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(end) = &mut self.hard_end else {
            return Ok(());
        };
        if end.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection past its age and grace",
            ));
        }
        Ok(())
    }

    fn pause(&mut self, pause: Duration) {
        self.paused = Some(Box::pin(tokio::time::sleep(pause)));
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Guarded<IO> {
    /// The read's outcome once the connection is closing for idleness:
    /// the GOAWAY goes out, the peer's bytes are dropped, and the linger's
    /// end reads as the end of the stream. `None` while not closing.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        let idle = self.idle.as_mut()?;
        if idle.closing().is_none() {
            if !idle.poll_expired(cx, &self.activity) {
                return None;
            }
            tracing::debug!("closing a connection idle past its timeout");
            idle.close(self.received.last_stream());
        }
        let closing = idle.closing()?;
        if let Err(error) = push_goaway(&mut self.io, closing, &self.sent, cx) {
            return Some(Poll::Ready(Err(error)));
        }
        if closing.poll_over(cx) {
            return Some(Poll::Ready(Ok(())));
        }
        let mut sink = [0u8; 1024];
        for _ in 0..DISCARD_READS {
            let mut dropped = ReadBuf::new(&mut sink);
            match Pin::new(&mut self.io).poll_read(cx, &mut dropped) {
                Poll::Ready(Ok(())) if dropped.filled().is_empty() => {
                    return Some(Poll::Ready(Ok(())));
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Some(Poll::Ready(Err(error))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        cx.waker().wake_by_ref();
        Some(Poll::Pending)
    }

    /// Our GOAWAY first, if one has begun: h2's writes wait behind it.
    fn poll_goaway_first(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(closing) = self.idle.as_mut().and_then(Idle::closing) else {
            return Poll::Ready(Ok(()));
        };
        push_goaway(&mut self.io, closing, &self.sent, cx)?;
        if closing.in_the_way() {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    /// Tracks h2's frames while a GOAWAY of ours may still have to fit
    /// between two of them.
    fn track_sent<'a>(&mut self, bufs: impl IntoIterator<Item = &'a [u8]>, mut n: usize) {
        if self.idle.is_none() {
            return;
        }
        for buf in bufs {
            let take = n.min(buf.len());
            self.sent.feed(&buf[..take]);
            n -= take;
            if n == 0 {
                break;
            }
        }
    }
}

/// Writes what is left of `closing`'s GOAWAY, once `sent` (h2's output)
/// is at a frame boundary, then flushes it. Pending writes leave the
/// context registered.
fn push_goaway<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    closing: &mut super::idle::Closing,
    sent: &FrameCounter,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    if !closing.start(sent.at_boundary()) {
        return Ok(());
    }
    while closing.in_the_way() {
        match Pin::new(&mut *io).poll_write(cx, closing.unwritten()) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => closing.wrote(n),
            Poll::Ready(Err(error)) => return Err(error),
            Poll::Pending => return Ok(()),
        }
    }
    if closing.needs_flush() {
        match Pin::new(io).poll_flush(cx) {
            Poll::Ready(Ok(())) => closing.flushed(),
            Poll::Ready(Err(error)) => return Err(error),
            Poll::Pending => {}
        }
    }
    Ok(())
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_hard_end(cx)?;
        if let Some(closing) = this.poll_idle(cx) {
            return closing;
        }
        // A loop, so that a new pause is polled (registering the waker)
        // before the read returns Pending.
        while let Some(paused) = &mut this.paused {
            ready!(paused.as_mut().poll(cx));
            this.paused = None;
            if let Some(pause) = this
                .budget
                .as_mut()
                .and_then(|b| b.pause_at(Instant::now()))
            {
                this.pause(pause);
            }
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay = &this.replay[n..];
            return Poll::Ready(Ok(()));
        }
        let Some(budget) = &mut this.budget else {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            this.received.feed(&buf.filled()[before..]);
            return Poll::Ready(Ok(()));
        };
        // Read no more than the budget affords in the smallest frames, so
        // one read cannot hand h2 a whole buffer of them (the overdraft,
        // not the rate, would then decide the cost). A legitimate client's
        // budget is nearly full: reads of up to 900 bytes at the default.
        let affordable = budget.affordable(Instant::now()) * FRAME_HEADER_LEN;
        let limit = affordable.min(buf.remaining()).min(this.scratch.len());
        let mut limited = ReadBuf::new(&mut this.scratch[..limit]);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
        let read = limited.filled();
        let frames = this.received.feed(read);
        buf.put_slice(read);
        if let Some(pause) = budget.spend(frames, Instant::now()) {
            this.pause(pause);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_hard_end(cx)?;
        ready!(this.poll_goaway_first(cx))?;
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.track_sent([buf], n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_hard_end(cx)?;
        ready!(this.poll_goaway_first(cx))?;
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        this.track_sent(bufs.iter().map(|b| &b[..]), n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_hard_end(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::Semaphore,
    };

    use super::*;

    fn permit() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit")
    }

    #[tokio::test(start_paused = true)]
    async fn the_preface_is_replayed_then_the_stream_follows() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, permit(), None, None);
        client.write_all(b"rest").await.expect("write");
        let mut read = vec![0; 28];
        guarded.read_exact(&mut read).await.expect("read");
        assert_eq!(&read[..24], HTTP2_PREFACE);
        assert_eq!(&read[24..], b"rest");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_cut_at_its_hard_end() {
        let (_client, server) = tokio::io::duplex(64);
        let end = Instant::now() + Duration::from_secs(30);
        let mut guarded = Guarded::new(server, permit(), Some(end), None);
        let mut preface = [0; 24];
        guarded.read_exact(&mut preface).await.expect("preface");
        let error = guarded.read(&mut [0; 8]).await.expect_err("cut");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Instant::now(), end);
        assert!(guarded.write_all(b"x").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_flood_is_read_no_faster_than_the_budget() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guarded = Guarded::new(server, permit(), None, Some(100));
        // 400 empty frames: one second's worth banked, three more to wait.
        let ping = [0u8, 0, 0, 6, 0, 0, 0, 0, 0];
        client.write_all(&ping.repeat(400)).await.expect("write");
        let started = Instant::now();
        let mut read = vec![0; 24 + 9 * 400];
        guarded.read_exact(&mut read).await.expect("read");
        let mut more = [0u8; 9];
        client.write_all(&ping).await.expect("write");
        guarded.read_exact(&mut more).await.expect("read");
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    /// The debt can still be unpaid when a pause ends (more was owed
    /// meanwhile): the read must wait again, and be woken when that ends.
    #[tokio::test(start_paused = true)]
    async fn a_pause_that_ends_with_debt_left_wakes_the_read_again() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guarded = Guarded::new(server, permit(), None, Some(100));
        let ping = [0u8, 0, 0, 6, 0, 0, 0, 0, 0];
        let mut preface = [0; 24];
        guarded.read_exact(&mut preface).await.expect("preface");
        // 150 frames against 100 banked: a pause of 0.5 s; then 50 more are
        // owed while paused, so the first pause ends in debt.
        let budget = guarded.budget.as_mut().expect("metered");
        let pause = budget.spend(150, Instant::now()).expect("overdrawn");
        assert!(budget.spend(50, Instant::now()).is_some());
        guarded.pause(pause);
        client.write_all(&ping).await.expect("write");
        let started = Instant::now();
        // A task of its own, polled only when woken (the test's own task
        // may be polled without a wake).
        let reader = tokio::spawn(async move {
            let mut more = [0u8; 9];
            guarded.read_exact(&mut more).await.map(|_| ())
        });
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the read is woken after the second pause")
            .expect("task")
            .expect("read");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    /// One read cannot hand h2 a whole buffer of control frames past the
    /// budget: it is cut to what the budget affords.
    #[tokio::test(start_paused = true)]
    async fn a_metered_read_is_cut_to_what_the_budget_affords() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guarded = Guarded::new(server, permit(), None, Some(100));
        let ping = [0u8, 0, 0, 6, 0, 0, 0, 0, 0];
        client.write_all(&ping.repeat(400)).await.expect("write");
        let mut preface = [0; 24];
        guarded.read_exact(&mut preface).await.expect("preface");
        let mut buf = vec![0; 16 * 1024];
        let n = guarded.read(&mut buf).await.expect("read");
        assert_eq!(n, 100 * 9, "one second's worth of 9-byte frames");
    }
}
