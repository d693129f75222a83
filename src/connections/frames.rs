//! A per-connection budget of HTTP/2 control frames. h2 answers every PING
//! and SETTINGS and processes every WINDOW_UPDATE and PRIORITY a peer sends,
//! so a flood of 9-byte frames costs the service far more than the attacker.
//! Counting frame headers in the decrypted byte stream (the 9-byte header
//! carries the payload length, type and flags, so nothing else needs
//! parsing) and pausing reads once a connection is over its rate bounds
//! what one connection can make the service do. Frames that carry requests
//! (HEADERS, CONTINUATION, DATA with a payload or ending a stream) are not
//! counted: their cost is bounded by the stream and rate limits, and a busy
//! legitimate client sends thousands a second. h2 0.4 offers no such knob
//! itself, hence this small hand-written meter.

use std::{sync::Arc, time::Duration};

use tokio::{sync::Semaphore, time::Instant};

/// Length of an HTTP/2 frame header: also the smallest frame.
pub(crate) const FRAME_HEADER_LEN: usize = 9;

/// Counts the control frames that start in a byte stream of HTTP/2 frames.
#[derive(Debug, Default)]
pub(crate) struct FrameCounter {
    /// Payload bytes of the current frame still to come.
    payload_left: usize,
    /// Bytes of the next frame header seen so far.
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Highest stream id a HEADERS frame opened: what a GOAWAY must name.
    last_stream: u32,
}

impl FrameCounter {
    /// Feeds the next bytes of the stream; returns how many control frames
    /// began.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut frames = 0;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len());
                self.payload_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == FRAME_HEADER_LEN {
                let [a, b, c, kind, flags, s0, s1, s2, s3] = self.header;
                self.payload_left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.header_len = 0;
                if kind == HEADERS {
                    let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7FFF_FFFF;
                    self.last_stream = self.last_stream.max(stream);
                }
                if is_control(kind, flags, self.payload_left) {
                    frames += 1;
                }
            }
        }
        frames
    }

    /// Whether the bytes fed so far end on a frame boundary, where a frame
    /// of our own may be put into the stream.
    pub(crate) fn at_boundary(&self) -> bool {
        self.payload_left == 0 && self.header_len == 0
    }

    /// The highest stream id the peer opened with HEADERS.
    pub(crate) fn last_stream(&self) -> u32 {
        self.last_stream
    }
}

const HEADERS: u8 = 1;

/// Frames that carry no request: everything but HEADERS, CONTINUATION and
/// DATA that has a payload or ends its stream (an empty DATA frame that
/// ends nothing is a known flood vector). Unknown types count: h2 still
/// reads and discards them.
fn is_control(kind: u8, flags: u8, len: usize) -> bool {
    const DATA: u8 = 0;
    const CONTINUATION: u8 = 9;
    const END_STREAM: u8 = 0x1;
    match kind {
        HEADERS | CONTINUATION => false,
        DATA => len == 0 && flags & END_STREAM == 0,
        _ => true,
    }
}

/// Frames a connection may bank whatever its share: a new client's
/// SETTINGS, its ACK and a WINDOW_UPDATE come at once.
const MIN_BANK: f64 = 10.0;

/// A listener's total of control frames per second, shared by its open
/// connections: each may send at most `total / open` a second (at least
/// one), so the port's total holds however many connections an attacker
/// opens, and a quiet connection keeps its share whatever the others do.
#[derive(Debug, Clone)]
pub struct FrameShare {
    /// Frames per second for all the listener's connections together.
    pub total: u32,
    /// The listener's connection budget: what it lacks is what is open.
    pub budget: Arc<Semaphore>,
    /// Places in that budget.
    pub size: usize,
}

impl FrameShare {
    #[allow(clippy::cast_precision_loss)] // connection counts: far below 2^52
    fn per_connection(&self) -> f64 {
        let open = self
            .size
            .saturating_sub(self.budget.available_permits())
            .max(1);
        (f64::from(self.total) / open as f64).max(1.0)
    }
}

/// A token bucket of frames: `rate` per second (less when the listener's
/// share is smaller), up to one second's worth banked. Reads may overdraw
/// it (a read returns what the socket had); the connection then reads
/// nothing until the debt is paid.
#[derive(Debug)]
pub(crate) struct FrameBudget {
    /// The connection's own rate.
    max_rate: f64,
    /// The rate in force: `max_rate`, or the share when smaller.
    rate: f64,
    tokens: f64,
    updated: Instant,
    share: Option<FrameShare>,
}

impl FrameBudget {
    pub(crate) fn new(rate_per_sec: u32, now: Instant) -> Self {
        let rate = f64::from(rate_per_sec);
        Self {
            max_rate: rate,
            rate,
            tokens: rate,
            updated: now,
            share: None,
        }
    }

    /// Holds the connection to its share of the listener's total as well.
    pub(crate) fn with_share(mut self, share: FrameShare) -> Self {
        self.share = Some(share);
        self.refill(self.updated);
        self
    }

    /// Spends `frames`; returns how long reads must pause, if at all.
    pub(crate) fn spend(&mut self, frames: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        #[allow(clippy::cast_precision_loss)] // frames per read: far below 2^52
        let frames = frames as f64;
        self.tokens -= frames;
        self.pause()
    }

    /// Frames the connection may read at `now`: what it can still afford,
    /// but at least a tenth of a second's worth (so a throttled connection
    /// is woken ten times a second, not once per frame). A read cut to that
    /// many of the smallest frames cannot overdraw the budget by a whole
    /// buffer of them.
    pub(crate) fn affordable(&mut self, now: Instant) -> usize {
        self.refill(now);
        let batch = (self.rate / 10.0).max(1.0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        // at most the rate (<= 10M) and at least 1: exact in usize
        let frames = self.tokens.max(batch).floor() as usize;
        frames
    }

    /// How long reads must still pause at `now`, if at all.
    pub(crate) fn pause_at(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        self.pause()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens += elapsed * self.rate;
        // The share changes as connections come and go: read it when the
        // bucket is, which is at every read.
        if let Some(share) = &self.share {
            self.rate = share.per_connection().min(self.max_rate);
        }
        self.tokens = self.tokens.min(self.rate.max(MIN_BANK));
        self.updated = now;
    }

    fn pause(&self) -> Option<Duration> {
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_gets_its_share_of_the_total() {
        let start = Instant::now();
        let budget = Arc::new(Semaphore::new(64));
        let share = FrameShare {
            total: 1000,
            budget: budget.clone(),
            size: 64,
        };
        // 4 open: 250 each, more than a connection's own 100.
        let held = budget.clone().try_acquire_many_owned(4).expect("permits");
        let mut alone = FrameBudget::new(100, start).with_share(share.clone());
        assert_eq!(alone.spend(100, start), None);
        assert!(alone.spend(1, start).is_some(), "its own rate still holds");
        // 40 open: 25 each a second, 10 at least banked for a new one.
        let more = budget.clone().try_acquire_many_owned(36).expect("permits");
        let mut crowded = FrameBudget::new(100, start).with_share(share.clone());
        assert_eq!(crowded.spend(25, start), None);
        let later = start + Duration::from_secs(1);
        assert_eq!(crowded.spend(25, later), None, "25 a second");
        assert_eq!(
            crowded.spend(25, later),
            Some(Duration::from_secs(1)),
            "one second's debt at 25 a second"
        );
        // 64 open, 1000 shared: 15.6 a second, banking at least 10.
        let rest = budget.clone().try_acquire_many_owned(24).expect("permits");
        let mut full = FrameBudget::new(100, start).with_share(share);
        assert_eq!(full.spend(10, start), None);
        assert!(full.spend(6, start).is_some());
        drop((held, more, rest));
    }

    fn frame(len: usize) -> Vec<u8> {
        typed(6, 0, len)
    }

    fn typed(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut bytes = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        bytes.extend(std::iter::repeat_n(0xAB, len));
        bytes
    }

    #[test]
    fn frames_are_counted_however_the_stream_is_split() {
        let stream: Vec<u8> = [frame(8), frame(0), frame(70_000), frame(4)].concat();
        for chunk in [1, 2, 5, 9, 10, 4096, stream.len()] {
            let mut counter = FrameCounter::default();
            let total: u64 = stream.chunks(chunk).map(|c| counter.feed(c)).sum();
            assert_eq!(total, 4, "chunks of {chunk}");
        }
    }

    #[test]
    fn only_control_frames_count() {
        let requests: Vec<u8> = [
            typed(1, 0x4, 40), // HEADERS
            typed(9, 0x4, 10), // CONTINUATION
            typed(0, 0, 20),   // DATA
            typed(0, 0x1, 0),  // empty DATA ending the stream
            typed(0, 0x1, 20), // DATA ending the stream
        ]
        .concat();
        let control: Vec<u8> = [
            typed(0, 0, 0),    // empty DATA that ends nothing
            typed(2, 0, 5),    // PRIORITY
            typed(3, 0, 4),    // RST_STREAM
            typed(4, 0, 6),    // SETTINGS
            typed(6, 0, 8),    // PING
            typed(8, 0, 4),    // WINDOW_UPDATE
            typed(0xEE, 0, 3), // unknown
        ]
        .concat();
        let mut counter = FrameCounter::default();
        assert_eq!(counter.feed(&requests.repeat(1000)), 0);
        assert_eq!(counter.feed(&control), 7);
    }

    #[test]
    fn the_last_stream_opened_and_frame_boundaries_are_tracked() {
        let mut headers = typed(1, 0x4, 3);
        headers[5..9].copy_from_slice(&7u32.to_be_bytes());
        let stream = [typed(1, 0x4, 3), headers, frame(8)].concat();
        let mut counter = FrameCounter::default();
        assert!(counter.at_boundary());
        counter.feed(&stream[..stream.len() - 1]);
        assert!(!counter.at_boundary(), "mid-payload");
        counter.feed(&stream[stream.len() - 1..]);
        assert!(counter.at_boundary());
        assert_eq!(counter.last_stream(), 7);
    }

    #[test]
    fn a_connection_over_its_rate_pauses_until_the_debt_is_paid() {
        let start = Instant::now();
        let mut budget = FrameBudget::new(100, start);
        assert_eq!(
            budget.spend(100, start),
            None,
            "one second's worth is banked"
        );
        let pause = budget.spend(50, start).expect("overdrawn");
        assert_eq!(pause, Duration::from_millis(500));
        assert_eq!(budget.pause_at(start + Duration::from_millis(500)), None);
        // Idle time banks at most one second's worth.
        let later = start + Duration::from_secs(60);
        assert_eq!(budget.spend(100, later), None);
        assert!(budget.spend(1, later).is_some());
    }
}
