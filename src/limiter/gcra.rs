//! The Generic Cell Rate Algorithm as plain arithmetic on instants, so that
//! the caller decides what "now" is (a fake clock in tests).
//!
//! Deliberately not governor, although it is the usual choice: the upstream
//! budget must tell a refused request when the slot after everyone already
//! queued frees up, and its rate changes at run time (adaptive back-off);
//! the per-caller table must know whether a caller is already tracked so a
//! full table never pushes known callers into the overflow bucket. governor's
//! limiters have fixed quotas and its keyed store has no `contains`.

use std::time::Duration;

use tokio::time::Instant;

/// One GCRA cell: `burst` requests at once, then one every `interval`.
#[derive(Debug, Clone)]
pub(crate) struct Gcra {
    interval: Duration,
    burst: u32,
    /// Theoretical arrival time: when the bucket would be empty again.
    tat: Instant,
}

impl Gcra {
    /// `rate_per_sec` > 0 and `burst` ≥ 1; the bucket starts full.
    pub(crate) fn new(rate_per_sec: f64, burst: u32, now: Instant) -> Self {
        Self {
            interval: interval_for(rate_per_sec),
            burst: burst.max(1),
            tat: now,
        }
    }

    /// Changes the rate at `now`. The permits still outstanding (the part
    /// of the burst in use) are rescaled to the new interval, so a lower
    /// rate never frees burst: the tolerance `interval × (burst − 1)` grows
    /// with the interval, and an unscaled TAT would conform at once permits
    /// that did not conform before the change.
    pub(crate) fn set_rate(&mut self, rate_per_sec: f64, now: Instant) {
        let interval = interval_for(rate_per_sec);
        if interval == self.interval {
            return;
        }
        if self.tat > now {
            let outstanding = (self.tat - now).div_duration_f64(self.interval);
            self.tat = now + interval.mul_f64(outstanding);
        }
        self.interval = interval;
    }

    /// The earliest instant at or after `now` when one more permit conforms.
    pub(crate) fn next_free(&self, now: Instant) -> Instant {
        let tolerance = self.interval * (self.burst - 1);
        now.max(self.tat.checked_sub(tolerance).unwrap_or(now))
    }

    /// The earliest instant the `n`-th permit from now (0-based) conforms,
    /// if nobody else takes one: how long a queue of `n` takes to drain.
    pub(crate) fn free_after(&self, now: Instant, n: u32) -> Instant {
        let first = self.next_free(now);
        // After the first, each queued permit pushes the TAT by one interval,
        // but any burst still unspent lets some of them through at once.
        let tat_after_first = self.tat.max(first) + self.interval;
        let mut at = first;
        let mut tat = tat_after_first;
        for _ in 0..n {
            let tolerance = self.interval * (self.burst - 1);
            at = at.max(tat.checked_sub(tolerance).unwrap_or(at));
            tat = tat.max(at) + self.interval;
        }
        at
    }

    /// The time between two permits at the current rate.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// When the cell is back to a full burst: forgetting it then loses nothing.
    pub(crate) fn idle_at(&self) -> Instant {
        self.tat
    }

    /// Takes a permit now if one conforms; else says how long until one does.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let free = self.next_free(now);
        if free > now {
            return Err(free - now);
        }
        self.take(now);
        Ok(())
    }

    /// Takes a permit at `at`, which must not be before [`Self::next_free`].
    pub(crate) fn take(&mut self, at: Instant) {
        self.tat = self.tat.max(at) + self.interval;
    }
}

/// Rates are bounded where they are parsed (see `config.rs`); the clamp
/// only keeps an out-of-range rate from panicking here.
fn interval_for(rate_per_sec: f64) -> Duration {
    Duration::try_from_secs_f64(1.0 / rate_per_sec)
        .unwrap_or(MAX_INTERVAL)
        .clamp(Duration::from_nanos(1), MAX_INTERVAL)
}

/// The longest interval between permits: one a day.
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes every permit that conforms at each step of `step` over `span`
    /// (a fake clock: nothing sleeps) and counts them.
    fn admitted_over(rate: f64, burst: u32, span: Duration, step: Duration) -> u32 {
        let start = Instant::now();
        let mut gcra = Gcra::new(rate, burst, start);
        let mut admitted = 0;
        let mut now = start;
        while now <= start + span {
            while gcra.next_free(now) <= now {
                gcra.take(now);
                admitted += 1;
            }
            now += step;
        }
        admitted
    }

    #[test]
    fn admits_exactly_rate_times_t_plus_burst() {
        for (rate, burst, secs) in [(20.0, 5, 10), (25.0, 1, 4), (1.0, 3, 7), (100.0, 10, 2)] {
            let admitted = admitted_over(
                rate,
                burst,
                Duration::from_secs(secs),
                Duration::from_millis(1),
            );
            let expected = (rate as u32) * (secs as u32) + burst;
            assert_eq!(admitted, expected, "rate {rate} burst {burst} over {secs}s");
        }
    }

    #[test]
    fn after_the_burst_the_next_permit_is_one_interval_away() {
        let now = Instant::now();
        let mut gcra = Gcra::new(10.0, 2, now);
        gcra.take(now);
        gcra.take(now);

        assert_eq!(gcra.next_free(now), now + Duration::from_millis(100));
    }

    #[test]
    fn a_queue_of_n_drains_one_interval_apart() {
        let now = Instant::now();
        let mut gcra = Gcra::new(10.0, 1, now);
        gcra.take(now);

        assert_eq!(gcra.free_after(now, 0), now + Duration::from_millis(100));
        assert_eq!(gcra.free_after(now, 4), now + Duration::from_millis(500));
    }

    #[test]
    fn queued_permits_may_use_the_unspent_burst() {
        let now = Instant::now();
        let gcra = Gcra::new(10.0, 3, now);

        assert_eq!(gcra.free_after(now, 2), now, "three fit in the burst");
        assert_eq!(gcra.free_after(now, 3), now + Duration::from_millis(100));
    }

    #[test]
    fn a_lower_rate_spaces_later_permits_further() {
        let now = Instant::now();
        let mut gcra = Gcra::new(10.0, 1, now);
        gcra.set_rate(5.0, now);
        gcra.take(now);

        assert_eq!(gcra.next_free(now), now + Duration::from_millis(200));
    }

    #[test]
    fn a_lower_rate_frees_no_burst() {
        let now = Instant::now();
        for spent in 0..=5 {
            let mut gcra = Gcra::new(10.0, 5, now);
            for _ in 0..spent {
                gcra.take(now);
            }
            let conforming_before = conforming_at(&gcra, now);

            gcra.set_rate(5.0, now);

            assert_eq!(
                conforming_at(&gcra, now),
                conforming_before,
                "{spent} spent"
            );
        }
    }

    #[test]
    fn a_rate_change_keeps_the_outstanding_permits() {
        let now = Instant::now();
        let mut gcra = Gcra::new(10.0, 5, now);
        for _ in 0..5 {
            gcra.take(now);
        }
        gcra.set_rate(5.0, now);
        assert_eq!(gcra.next_free(now), now + Duration::from_millis(200));
        gcra.set_rate(10.0, now);
        assert_eq!(gcra.next_free(now), now + Duration::from_millis(100));
    }

    #[test]
    fn absurd_rates_do_not_panic() {
        let now = Instant::now();
        for rate in [1e-300, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            let mut gcra = Gcra::new(rate, 1, now);
            let _ = gcra.try_take(now);
            gcra.set_rate(rate, now);
            let _ = gcra.free_after(now, 1000);
        }
    }

    /// Permits that conform at `now`, taken one after another.
    fn conforming_at(gcra: &Gcra, now: Instant) -> usize {
        let mut gcra = gcra.clone();
        std::iter::from_fn(|| gcra.try_take(now).ok())
            .take(100)
            .count()
    }
}
