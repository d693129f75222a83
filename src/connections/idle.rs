//! Closing connections that hold a place in the budget and do nothing.
//! hyper sends GOAWAY only at the connection's age or at shutdown, and
//! tonic gives no handle on a single connection, so the I/O wrapper writes
//! the GOAWAY itself: at a frame boundary of what h2 has written, naming the
//! last stream the peer opened, so a call racing it is one the client knows
//! was never processed (and retries). From then on the peer's bytes are read
//! and dropped (h2 never sees a stream past the GOAWAY), and after a short
//! linger the connection ends. A connection is idle when it has had no call
//! open (see `activity.rs`) for the idle timeout: control frames (PINGs,
//! SETTINGS) do not count, so keepalives cannot hold a place. When the budget
//! runs short, the timeout is the shorter of it and the first-bytes timeout:
//! an idle connection must then prove itself as often as a new one.

use std::{pin::Pin, sync::Arc, task::Context, time::Duration};

use tokio::{
    sync::Semaphore,
    time::{Instant, Sleep},
};

use super::activity::Activity;

/// Time the peer has after our GOAWAY to read it and close by itself.
const GOAWAY_LINGER: Duration = Duration::from_secs(1);

/// Length of a GOAWAY frame with no debug data.
const GOAWAY_LEN: usize = 17;

/// When a connection with no call open is closed.
#[derive(Debug, Clone)]
pub struct IdleRule {
    /// Time with no call open after which the connection is closed.
    pub timeout: Duration,
    /// The timeout while the budget runs short (at most `timeout`).
    pub pressed_timeout: Duration,
    /// The listener's budget, to see whether it runs short.
    pub budget: Arc<Semaphore>,
    /// Places in that budget.
    pub size: usize,
}

impl IdleRule {
    /// Under pressure when at most an eighth of the places are free (the
    /// accept loop holds one while it waits for the next client).
    fn pressed(&self) -> bool {
        self.budget.available_permits() <= self.size / 8
    }
}

/// One connection's idle clock, then its closing.
#[derive(Debug)]
pub(crate) struct Idle {
    rule: IdleRule,
    check: Pin<Box<Sleep>>,
    closing: Option<Closing>,
}

/// A GOAWAY being written, and the end of the linger after it.
#[derive(Debug)]
pub(crate) struct Closing {
    frame: [u8; GOAWAY_LEN],
    /// None until h2's output is at a frame boundary.
    written: Option<usize>,
    flushed: bool,
    end: Pin<Box<Sleep>>,
}

impl Idle {
    pub(crate) fn new(rule: IdleRule) -> Self {
        let first = rule.pressed_timeout.min(rule.timeout);
        Self {
            rule,
            check: Box::pin(tokio::time::sleep(first)),
            closing: None,
        }
    }

    /// Whether the connection has been idle too long; until then the
    /// context is woken at the next check.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>, activity: &Activity) -> bool {
        loop {
            if self.check.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            let short = self.rule.pressed_timeout.min(self.rule.timeout);
            let due = if self.rule.pressed() {
                short
            } else {
                self.rule.timeout
            };
            // Checked at least every `short`, so pressure is seen in time.
            let next = match activity.quiet_for(now) {
                Some(quiet) if quiet >= due => return true,
                Some(quiet) => (due - quiet).min(short),
                None => short,
            };
            self.check.as_mut().reset(now + next);
        }
    }

    /// Starts closing: a GOAWAY naming `last_stream`, then the linger.
    pub(crate) fn close(&mut self, last_stream: u32) {
        self.closing = Some(Closing {
            frame: goaway(last_stream),
            written: None,
            flushed: false,
            end: Box::pin(tokio::time::sleep(GOAWAY_LINGER)),
        });
    }

    pub(crate) fn closing(&mut self) -> Option<&mut Closing> {
        self.closing.as_mut()
    }
}

impl Closing {
    /// Starts the GOAWAY if h2's output is `at_boundary`; true once begun.
    pub(crate) fn start(&mut self, at_boundary: bool) -> bool {
        if self.written.is_none() && at_boundary {
            self.written = Some(0);
        }
        self.written.is_some()
    }

    /// The GOAWAY bytes still to write (empty before it starts or once done).
    pub(crate) fn unwritten(&self) -> &[u8] {
        self.written.map_or(&[], |n| &self.frame[n..])
    }

    pub(crate) fn wrote(&mut self, n: usize) {
        if let Some(written) = &mut self.written {
            *written += n;
        }
    }

    /// Written in full but not yet flushed.
    pub(crate) fn needs_flush(&self) -> bool {
        self.written == Some(GOAWAY_LEN) && !self.flushed
    }

    pub(crate) fn flushed(&mut self) {
        self.flushed = true;
    }

    /// Whether our GOAWAY has begun but not been written in full: h2's
    /// own writes wait behind it.
    pub(crate) fn in_the_way(&self) -> bool {
        !self.unwritten().is_empty()
    }

    /// Whether the linger is over (registers the context otherwise).
    pub(crate) fn poll_over(&mut self, cx: &mut Context<'_>) -> bool {
        self.end.as_mut().poll(cx).is_ready()
    }
}

/// A GOAWAY frame: NO_ERROR, `last_stream` the highest stream processed.
fn goaway(last_stream: u32) -> [u8; GOAWAY_LEN] {
    const GOAWAY: u8 = 0x7;
    let mut frame = [0u8; GOAWAY_LEN];
    frame[2] = 8;
    frame[3] = GOAWAY;
    frame[9..13].copy_from_slice(&(last_stream & 0x7FFF_FFFF).to_be_bytes());
    frame
}

#[cfg(test)]
mod tests {
    use std::{future::poll_fn, task::Poll};

    use super::*;

    fn rule(size: usize, free: usize) -> IdleRule {
        let budget = Arc::new(Semaphore::new(size));
        std::mem::forget(
            budget
                .clone()
                .try_acquire_many_owned(u32::try_from(size - free).expect("small")),
        );
        IdleRule {
            timeout: Duration::from_secs(60),
            pressed_timeout: Duration::from_secs(5),
            budget,
            size,
        }
    }

    async fn expires_after(mut idle: Idle, activity: &Activity) -> Duration {
        let started = Instant::now();
        poll_fn(|cx| {
            if idle.poll_expired(cx, activity) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_timeout() {
        let activity = Activity::new();
        let after = expires_after(Idle::new(rule(64, 60)), &activity).await;
        assert_eq!(after, Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_budget_runs_short_the_shorter_timeout_applies() {
        let activity = Activity::new();
        let after = expires_after(Idle::new(rule(64, 8)), &activity).await;
        assert_eq!(after, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_starts_when_the_last_call_ends() {
        let activity = Activity::new();
        let call = activity.open_call();
        let idle = Idle::new(rule(64, 60));
        let ended = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            drop(call);
        });
        let after = expires_after(idle, &activity).await;
        ended.await.expect("task");
        assert!(
            after >= Duration::from_secs(160) && after <= Duration::from_secs(165),
            "{after:?}"
        );
    }

    #[test]
    fn the_goaway_frame_names_the_last_stream() {
        let frame = goaway(7);
        assert_eq!(&frame[..9], &[0, 0, 8, 7, 0, 0, 0, 0, 0]);
        assert_eq!(&frame[9..13], &7u32.to_be_bytes());
        assert_eq!(&frame[13..], &[0; 4], "NO_ERROR");
    }
}
