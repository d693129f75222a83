//! P9: VerifyToken with a million live revocation watermarks in memory,
//! against the same service with none. The log is filled in one Redis
//! before the service starts; a second, empty Redis serves the other
//! process, so the map is the only difference between them. Also what the
//! map costs: load time at start and resident memory per entry.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use session_service::tokens::mint::{self, MintKey};

use crate::{
    children::{Running, cpu_time, rss_kib, spawn_service},
    clients::POOL,
    fleet::{RedisChild, metrics_text, sum_of},
    load::{Stop, closed_loop},
    report::Row,
    scenarios::{Plan, alternate, micros},
    verify::{jwks_server, verify_call},
};

/// The service's default key prefix, as `--redis-key-prefix` leaves it.
const PREFIX: &str = "session-service";

/// An epoch in the service's form (16 lowercase hex), set before the log is
/// filled so that the service reads the log rather than starting a new one.
const EPOCH: &str = "00000000b3ac4e91";

/// XADDs per pipelined round trip while filling.
const FILL_CHUNK: u64 = 10_000;

/// How long the service may take to load the log before the run fails.
const LOAD_LIMIT: Duration = Duration::from_secs(600);

/// A `sub` in Cognito's form (lowercase hyphenated UUID, version 4), one per
/// `i`, never the benchmark token's (whose variant nibble is 8, not b).
fn sub_of(i: u64) -> String {
    let h = splitmix64(i);
    format!(
        "{:08x}-{:04x}-4{:03x}-b{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        (h >> 4) & 0xfff,
        splitmix64(h) & 0xfff,
        i & 0xffff_ffff_ffff
    )
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sets the epoch and appends `count` watermarks of [`POOL`] to the log,
/// as the service's revoke script would (fields `pool`, `sub`, `before`).
async fn fill_log(redis: &RedisChild, count: u64, before: i64) -> Duration {
    let client = redis::Client::open(format!("redis://{}", redis.addr)).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let started = Instant::now();
    let () = redis::cmd("SET")
        .arg(format!("{{{PREFIX}}}:revocations:epoch"))
        .arg(EPOCH)
        .query_async(&mut connection)
        .await
        .expect("SET epoch");
    let log = format!("{{{PREFIX}}}:revocations");
    let mut next = 0;
    while next < count {
        let end = (next + FILL_CHUNK).min(count);
        let mut pipe = redis::pipe();
        for i in next..end {
            pipe.cmd("XADD")
                .arg(&log)
                .arg("*")
                .arg("pool")
                .arg(POOL)
                .arg("sub")
                .arg(sub_of(i))
                .arg("before")
                .arg(before)
                .ignore();
        }
        let () = pipe
            .query_async(&mut connection)
            .await
            .expect("XADD pipeline");
        next = end;
    }
    let length: u64 = redis::cmd("XLEN")
        .arg(&log)
        .query_async(&mut connection)
        .await
        .expect("XLEN");
    assert_eq!(length, count, "the log holds every entry written");
    started.elapsed()
}

/// Redis's own `used_memory`, bytes.
async fn redis_used_memory(redis: &RedisChild) -> u64 {
    let client = redis::Client::open(format!("redis://{}", redis.addr)).expect("redis url");
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return 0;
    };
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What waiting for the log to load saw.
struct Loaded {
    /// Spawn until `session_revocation_log_caught_up` read 1.
    took: Duration,
    /// Spawn until `session_revocation_watermarks` first read above 0 (the
    /// first batch applied): what comes before the load itself.
    first_entry: Option<Duration>,
    /// `session_revocation_watermarks` then.
    watermarks: f64,
    /// The highest RSS sampled meanwhile, KiB.
    peak_kib: u64,
    /// CPU time (user + system) the service had used by then.
    cpu: Duration,
}

/// Polls the service's metrics until it has loaded the log; panics after
/// [`LOAD_LIMIT`].
async fn wait_loaded(service: &Running, started: Instant) -> Loaded {
    let mut peak_kib = 0;
    let mut first_entry = None;
    loop {
        peak_kib = peak_kib.max(rss_kib(service.pid()));
        let text = metrics_text(service).await;
        if first_entry.is_none() && sum_of(&text, "session_revocation_watermarks") > 0.0 {
            first_entry = Some(started.elapsed());
        }
        if sum_of(&text, "session_revocation_log_caught_up") == 1.0 {
            return Loaded {
                took: started.elapsed(),
                first_entry,
                watermarks: sum_of(&text, "session_revocation_watermarks"),
                peak_kib: peak_kib.max(rss_kib(service.pid())),
                cpu: cpu_time(service.pid()),
            };
        }
        assert!(
            started.elapsed() < LOAD_LIMIT,
            "P9: the service did not load the revocation log within {LOAD_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn p9_watermarks(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let count = plan.p9_watermarks;
    let full_redis = RedisChild::start();
    let empty_redis = RedisChild::start();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let fill_took = fill_log(&full_redis, count, now).await;
    let redis_bytes = redis_used_memory(&full_redis).await;

    let key = MintKey::generate("bench-key");
    let (jwks_addr, _) = jwks_server(mint::jwks(&[&key])).await;
    let token = key.sign(&mint::access_claims("us-east-1", POOL, "benchclient", now));

    // The full one first and alone, so that its load time is its own.
    let started = Instant::now();
    let full = spawn_service(service_bin, jwks_addr, &[full_redis.url()]);
    let full_loaded = wait_loaded(&full, started).await;
    let started = Instant::now();
    let empty = spawn_service(service_bin, jwks_addr, &[empty_redis.url()]);
    let empty_loaded = wait_loaded(&empty, started).await;
    // Not a benchmark figure but a correctness one: fail, never skip.
    assert!(
        (full_loaded.watermarks - count as f64).abs() < 0.5 && empty_loaded.watermarks == 0.0,
        "P9: session_revocation_watermarks is {} (expected {count}) and {} (expected 0)",
        full_loaded.watermarks,
        empty_loaded.watermarks
    );
    // jemalloc returns freed pages within a second (P4).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let loaded_rss = (rss_kib(full.pid()), rss_kib(empty.pid()));

    let targets = [
        verify_call(full.addr, token.clone()).await,
        verify_call(empty.addr, token).await,
    ];
    for target in &targets {
        closed_loop(target, 1, Stop::Calls(plan.p1_calls.min(200))).await;
    }
    let (latency, _) = alternate(
        &targets,
        plan.p1_rounds,
        1,
        Stop::Calls(plan.p1_calls),
        full.pid(),
    )
    .await;
    let (throughput, _) = alternate(
        &targets,
        plan.p2_rounds,
        64,
        Stop::After(plan.p2_duration),
        full.pid(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_rss = (rss_kib(full.pid()), rss_kib(empty.pid()));
    let checks = sum_of(
        &metrics_text(&full).await,
        r#"session_revocation_checks_total{result="clear"}"#,
    );

    let [full_1, empty_1] = &latency[..] else {
        unreachable!("two targets")
    };
    let [full_64, empty_64] = &throughput[..] else {
        unreachable!("two targets")
    };
    let all_active = [full_1, empty_1, full_64, empty_64]
        .iter()
        .all(|o| o.ok_count() == o.total());
    let mut rows = Vec::new();
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let f = full_1.ok.value_at_quantile(q);
        let e = empty_1.ok.value_at_quantile(q);
        let ratio = f as f64 / e.max(1) as f64;
        rows.push(Row::ratio(
            &format!("P9 VerifyToken latency {name} with {count} watermarks ÷ none, concurrency 1"),
            micros(f),
            format!("{} (no watermarks)", micros(e)),
            ratio,
            "≤ 1.1",
            ratio <= 1.1 && all_active,
        ));
    }
    let ratio = full_64.ok_per_sec() / empty_64.ok_per_sec();
    rows.push(Row::ratio(
        &format!("P9 VerifyToken throughput with {count} watermarks ÷ none, concurrency 64"),
        format!("{:.0} req/s", full_64.ok_per_sec()),
        format!("{:.0} req/s (no watermarks)", empty_64.ok_per_sec()),
        ratio,
        "≥ 0.9, all active",
        ratio >= 0.9 && all_active,
    ));
    let mib = |kib: u64| kib as f64 / 1024.0;
    let per_entry = |(full, empty): (u64, u64)| {
        full.saturating_sub(empty) as f64 * 1024.0 / (count as f64).max(1.0)
    };
    let loaded_bytes = per_entry(loaded_rss);
    rows.push(Row::value(
        &format!(
            "P9 RSS per watermark, loaded ({:.1} − {:.1} MiB) ÷ {count}",
            mib(loaded_rss.0),
            mib(loaded_rss.1)
        ),
        format!("{loaded_bytes:.0} B"),
        "≤ 100 B",
        loaded_bytes <= 100.0,
    ));
    rows.push(Row::note(
        &format!(
            "P9 RSS per watermark after the calls ({:.1} − {:.1} MiB)",
            mib(after_rss.0),
            mib(after_rss.1)
        ),
        format!("{:.0} B", per_entry(after_rss)),
    ));
    rows.push(Row::note(
        "P9 RSS peak while loading (sampled every 20 ms)",
        format!("{:.1} MiB", mib(full_loaded.peak_kib)),
    ));
    // From the first batch applied to caught up: the load itself, without
    // what delays its start (a retry after a failed first Redis call
    // waits --redis-cooldown, 5 s).
    let loading = full_loaded.took - full_loaded.first_entry.unwrap_or_default();
    rows.push(Row::note(
        &format!("P9 start → log loaded, {count} entries (of which loading; empty log)"),
        format!(
            "{:.2} s ({:.2} s, {:.0} entries/s; {:.0} ms)",
            full_loaded.took.as_secs_f64(),
            loading.as_secs_f64(),
            count as f64 / loading.as_secs_f64().max(1e-3),
            empty_loaded.took.as_secs_f64() * 1000.0
        ),
    ));
    rows.push(Row::note(
        "P9 service CPU (user + system) by the time it had loaded, per entry (empty log)",
        format!(
            "{:.2} s, {:.1} µs ({:.2} s)",
            full_loaded.cpu.as_secs_f64(),
            full_loaded.cpu.as_secs_f64() * 1e6 / (count as f64).max(1.0),
            empty_loaded.cpu.as_secs_f64()
        ),
    ));
    rows.push(Row::note(
        "P9 the log in Redis (bench's pipelined XADD; used_memory)",
        format!(
            "filled in {:.2} s; {:.1} MiB, {:.0} B per entry",
            fill_took.as_secs_f64(),
            redis_bytes as f64 / 1024.0 / 1024.0,
            redis_bytes as f64 / (count as f64).max(1.0)
        ),
    ));
    rows.push(Row::note(
        "P9 calls (with watermarks / without, c=1 then c=64; clear checks counted)",
        format!(
            "{} / {}; {} / {}; {checks}",
            full_1.codes_text(),
            empty_1.codes_text(),
            full_64.codes_text(),
            empty_64.codes_text()
        ),
    ));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subs_are_uuid_shaped_distinct_and_never_the_tokens() {
        let token_sub = mint::access_claims("us-east-1", POOL, "c", 0)["sub"]
            .as_str()
            .expect("sub")
            .to_owned();
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000 {
            let sub = sub_of(i);
            assert_eq!(sub.len(), 36, "{sub}");
            assert!(
                sub.bytes()
                    .enumerate()
                    .all(|(n, b)| if matches!(n, 8 | 13 | 18 | 23) {
                        b == b'-'
                    } else {
                        b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
                    }),
                "{sub}"
            );
            assert_ne!(sub, token_sub);
            assert!(seen.insert(sub));
        }
    }
}
