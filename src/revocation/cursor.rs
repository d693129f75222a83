//! Positions in the revocation log and the cursors watchers resume from.
//!
//! A position is a Redis stream id (`<ms>-<seq>`), or in memory-only mode
//! one this process makes the same way. A cursor adds the log's epoch: a
//! random name the log gets when it is created, so that a cursor from a log
//! that was lost (a Redis restart without persistence, another process in
//! memory-only mode) is recognised as foreign and answered with a replay.

use std::{fmt, str::FromStr};

/// Where an entry sits in the log; ordered like the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Milliseconds since the epoch when it was logged (Redis `TIME`).
    pub ms: u64,
    /// Order within that millisecond.
    pub seq: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A position that is not `<ms>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a log position")]
pub struct BadPosition;

impl FromStr for Position {
    type Err = BadPosition;

    fn from_str(text: &str) -> Result<Self, BadPosition> {
        let (ms, seq) = text.split_once('-').ok_or(BadPosition)?;
        let digits = |part: &str| {
            if part.is_empty() || part.len() > 20 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadPosition);
            }
            part.parse::<u64>().map_err(|_| BadPosition)
        };
        Ok(Self {
            ms: digits(ms)?,
            seq: digits(seq)?,
        })
    }
}

impl Position {
    /// The next position after `self` for an entry logged at `now_ms`:
    /// later than every earlier one even if the clock went back.
    pub fn next(self, now_ms: u64) -> Self {
        if now_ms > self.ms {
            Self { ms: now_ms, seq: 0 }
        } else {
            Self {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }
}

/// Which log: 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Epoch(String);

impl Epoch {
    /// A new random epoch.
    pub fn random() -> Self {
        Self(format!("{:016x}", fastrand::u64(..)))
    }

    /// An epoch read back from Redis; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 16 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(text.to_owned()))
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a watcher sends back to resume: `<epoch>.<ms>-<seq>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The log it belongs to.
    pub epoch: Epoch,
    /// The last entry the watcher received.
    pub position: Position,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch.0, self.position)
    }
}

/// A cursor this server never made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor from WatchRevocations")]
pub struct BadCursor;

impl FromStr for Cursor {
    type Err = BadCursor;

    fn from_str(text: &str) -> Result<Self, BadCursor> {
        let (epoch, position) = text.split_once('.').ok_or(BadCursor)?;
        Ok(Self {
            epoch: Epoch::parse(epoch).ok_or(BadCursor)?,
            position: position.parse().map_err(|_| BadCursor)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_what_it_wrote() {
        let cursor = Cursor {
            epoch: Epoch::parse("0123456789abcdef").expect("as set up"),
            position: Position {
                ms: 1_733_333_333_333,
                seq: 7,
            },
        };
        assert_eq!(cursor.to_string(), "0123456789abcdef.1733333333333-7");
        assert_eq!(cursor.to_string().parse::<Cursor>(), Ok(cursor));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "0123456789abcdef",
            "0123456789abcdef.",
            "0123456789abcdef.1-",
            "0123456789abcdef.-1",
            "0123456789abcdef.1-2-3",
            "0123456789ABCDEF.1-2",
            "0123456789abcde.1-2",
            "0123456789abcdef.+1-2",
            "0123456789abcdef.99999999999999999999999-0",
        ] {
            assert_eq!(bad.parse::<Cursor>(), Err(BadCursor), "{bad:?}");
        }
    }

    #[test]
    fn positions_order_like_the_log_and_next_never_goes_back() {
        let a = Position { ms: 5, seq: 9 };
        assert!(a < Position { ms: 6, seq: 0 });
        assert!(a < Position { ms: 5, seq: 10 });
        assert_eq!(a.next(7), Position { ms: 7, seq: 0 });
        assert_eq!(a.next(5), Position { ms: 5, seq: 10 });
        // The clock went back: still after.
        assert_eq!(a.next(1), Position { ms: 5, seq: 10 });
    }
}
