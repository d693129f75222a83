//! Repeated warnings and errors from one log statement are rate-limited, so
//! that whatever makes the service fail again and again (or a client who
//! found a way to provoke it) cannot flood the log pipe and crowd out every
//! other line. Access and audit lines are records, one per call or Cognito
//! call, and are never dropped here (the writer's queue still bounds them).
//! Dropped lines are counted in `session_log_lines_suppressed_total`.

use std::{
    collections::HashMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tracing::{Level, Metadata, callsite::Identifier};
use tracing_subscriber::layer::{Context, Filter};

/// Lines one statement may write at once after a quiet spell.
const BURST: f64 = 20.0;
/// Lines per second one statement may keep writing.
const PER_SECOND: f64 = 5.0;

/// Warning and error lines dropped as repeats so far, in this process.
pub static LOG_LINES_SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// A per-layer filter: see the module documentation.
#[derive(Debug, Default)]
pub(super) struct RepeatLimit {
    buckets: Mutex<HashMap<Identifier, (f64, Instant)>>,
}

impl RepeatLimit {
    fn admit(&self, callsite: Identifier, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, updated) = buckets.entry(callsite).or_insert((BURST, now));
        let elapsed = now.saturating_duration_since(*updated).as_secs_f64();
        *tokens = (*tokens + elapsed * PER_SECOND).min(BURST);
        *updated = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            LOG_LINES_SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

impl<S> Filter<S> for RepeatLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::WARN || matches!(meta.target(), "access" | "audit") {
            return true;
        }
        self.admit(meta.callsite(), Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn one_statement_gets_its_burst_then_its_rate_and_others_their_own() {
        struct A;
        struct B;
        static CALLSITE_A: A = A;
        static CALLSITE_B: B = B;
        impl tracing::callsite::Callsite for A {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!("not asked")
            }
        }
        impl tracing::callsite::Callsite for B {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!("not asked")
            }
        }
        let limit = RepeatLimit::default();
        let now = Instant::now();
        let a = || Identifier(&CALLSITE_A);
        let admitted = (0..100).filter(|_| limit.admit(a(), now)).count();
        assert_eq!(admitted, 20);
        assert!(
            limit.admit(Identifier(&CALLSITE_B), now),
            "another statement"
        );
        let later = now + Duration::from_secs(1);
        let admitted = (0..100).filter(|_| limit.admit(a(), later)).count();
        assert_eq!(admitted, 5);
    }
}
