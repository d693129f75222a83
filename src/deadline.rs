//! The caller's deadline, read from the `grpc-timeout` header.
//!
//! tonic enforces that header itself, but answers CANCELLED when it fires. We
//! want DEADLINE_EXCEEDED with our error details, so the time allowed ends
//! a little before the caller's deadline and the handler answers first.

use std::time::Duration;

use tonic::metadata::MetadataMap;

const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// Head start the handler keeps over tonic's own timeout: 5 % of the
/// caller's timeout, at most 20 ms.
const MAX_HEAD_START: Duration = Duration::from_millis(20);

/// Less time than any Cognito call takes (a round trip to a regional
/// endpoint is tens of milliseconds): a call given less is refused at once,
/// with nothing sent upstream and nothing counted against Cognito.
pub const MIN_TIME_FOR_A_CALL: Duration = Duration::from_millis(5);

/// The caller's timeout, if it sent a well-formed one.
pub fn caller_timeout(metadata: &MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(metadata.get(GRPC_TIMEOUT_HEADER)?.to_str().ok()?)
}

/// The time a sign-out may take (queueing, attempts, pauses): the configured
/// limit, or less when the caller's deadline comes sooner.
pub fn time_allowed(configured: Duration, caller: Option<Duration>) -> Duration {
    match caller {
        Some(caller) => {
            let head_start = (caller / 20).min(MAX_HEAD_START);
            configured.min(caller.saturating_sub(head_start))
        }
        None => configured,
    }
}

/// Parses `TimeoutValue TimeoutUnit` as the gRPC HTTP/2 spec defines it: at
/// most eight ASCII digits, then one of `H M S m u n`.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_of_the_spec_parses() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
    }

    #[test]
    fn malformed_timeouts_are_ignored() {
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "5 S", "５S", "1é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_time_allowed_is_the_configured_limit_without_a_caller_deadline() {
        assert_eq!(
            time_allowed(Duration::from_secs(5), None),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_shorter_caller_deadline_wins_minus_a_head_start() {
        let allowed = time_allowed(Duration::from_secs(5), Some(Duration::from_millis(300)));
        assert_eq!(allowed, Duration::from_millis(285));
        let long = time_allowed(Duration::from_secs(5), Some(Duration::from_secs(2)));
        assert_eq!(long, Duration::from_millis(1980));
    }

    #[test]
    fn a_longer_caller_deadline_keeps_the_configured_limit() {
        let allowed = time_allowed(Duration::from_secs(5), Some(Duration::from_secs(60)));
        assert_eq!(allowed, Duration::from_secs(5));
    }

    #[test]
    fn the_caller_timeout_is_read_from_metadata() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "250m".parse().expect("ascii"));
        assert_eq!(caller_timeout(&metadata), Some(Duration::from_millis(250)));
    }
}
