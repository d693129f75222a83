//! The load generator: closed loop (N workers, each sending its next call
//! when the last one answered) or open loop (calls at a fixed rate whatever
//! happens). Latencies go into HDR histograms; every gRPC code is counted.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// One call; resolves to its outcome's name ("OK", "RESOURCE_EXHAUSTED", ...).
pub(crate) type Call =
    Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = &'static str> + Send>> + Send + Sync>;

/// What a load run measured.
pub(crate) struct Outcome {
    /// Latency of OK calls, µs.
    pub(crate) ok: Histogram<u64>,
    /// Latency of every other outcome, µs.
    pub(crate) failed: Histogram<u64>,
    /// Calls per outcome name.
    pub(crate) codes: BTreeMap<&'static str, u64>,
    /// Wall time of the run.
    pub(crate) elapsed: Duration,
}

impl Outcome {
    fn new() -> Self {
        let histogram = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        Self {
            ok: histogram(),
            failed: histogram(),
            codes: BTreeMap::new(),
            elapsed: Duration::ZERO,
        }
    }

    fn record(&mut self, code: &'static str, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let histogram = if code == "OK" {
            &mut self.ok
        } else {
            &mut self.failed
        };
        histogram.saturating_record(micros);
        *self.codes.entry(code).or_default() += 1;
    }

    /// Adds `other`'s calls to these.
    pub(crate) fn merge(&mut self, other: &Self) {
        self.ok.add(&other.ok).expect("same bounds");
        self.failed.add(&other.failed).expect("same bounds");
        for (code, n) in &other.codes {
            *self.codes.entry(code).or_default() += n;
        }
        self.elapsed += other.elapsed;
    }

    /// Calls of every outcome.
    pub(crate) fn total(&self) -> u64 {
        self.codes.values().sum()
    }

    /// OK calls.
    pub(crate) fn ok_count(&self) -> u64 {
        self.codes.get("OK").copied().unwrap_or(0)
    }

    /// OK calls per second of wall time.
    pub(crate) fn ok_per_sec(&self) -> f64 {
        self.ok_count() as f64 / self.elapsed.as_secs_f64()
    }

    /// `"OK 500, RESOURCE_EXHAUSTED 20"`.
    pub(crate) fn codes_text(&self) -> String {
        let parts: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        parts.join(", ")
    }
}

/// When a closed-loop run ends.
#[derive(Clone, Copy)]
pub(crate) enum Stop {
    /// After this many calls in all.
    Calls(u64),
    /// After this long.
    After(Duration),
}

/// `concurrency` workers send calls back to back until `stop`.
pub(crate) async fn closed_loop(call: &Call, concurrency: usize, stop: Stop) -> Outcome {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (call, next) = (call.clone(), next.clone());
        workers.spawn(async move {
            let mut outcome = Outcome::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let done = match stop {
                    Stop::Calls(limit) => n >= limit,
                    Stop::After(duration) => started.elapsed() >= duration,
                };
                if done {
                    return outcome;
                }
                let sent = Instant::now();
                let code = call(n).await;
                outcome.record(code, sent.elapsed());
            }
        });
    }
    let mut total = Outcome::new();
    while let Some(outcome) = workers.join_next().await {
        total.merge(&outcome.expect("worker"));
    }
    total.elapsed = started.elapsed();
    total
}

/// Calls at `rate` per second for `duration`, each in its own task, whether
/// or not earlier ones have answered; waits for all of them.
pub(crate) async fn open_loop(call: &Call, rate: f64, duration: Duration) -> Outcome {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    let mut n = 0;
    while started.elapsed() < duration {
        ticker.tick().await;
        let call = call.clone();
        calls.spawn(async move {
            let sent = Instant::now();
            let code = call(n).await;
            (code, sent.elapsed())
        });
        n += 1;
    }
    let mut outcome = Outcome::new();
    while let Some(result) = calls.join_next().await {
        let (code, latency) = result.expect("call task");
        outcome.record(code, latency);
    }
    outcome.elapsed = started.elapsed();
    outcome
}
