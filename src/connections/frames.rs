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

use std::time::Duration;

use tokio::time::Instant;

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

/// A token bucket of frames: `rate` per second, up to one second's worth
/// banked. Reads may overdraw it (a read returns what the socket had); the
/// connection then reads nothing until the debt is paid.
#[derive(Debug)]
pub(crate) struct FrameBudget {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl FrameBudget {
    pub(crate) fn new(rate_per_sec: u32, now: Instant) -> Self {
        let rate = f64::from(rate_per_sec);
        Self {
            rate,
            tokens: rate,
            updated: now,
        }
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
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.updated = now;
    }

    fn pause(&self) -> Option<Duration> {
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
