//! The revocation log against a real `redis-server`: replicas are
//! `Revocations` values in one process, each with its own Redis client.
//! Redis answers in real time, so these wait on conditions, bounded.

use std::time::Duration;

use tokio_stream::StreamExt;

use super::*;
use crate::{
    redis::{RedisSettings, RedisUrl},
    test_redis::TestRedis,
};

const ALICE: &str = "8f3c2a10-5b7d-4e21-9a0c-1d2e3f405162";

struct Replica {
    revocations: Revocations,
    metrics: RevocationMetrics,
}

fn replica(redis: &TestRedis, timeout: Duration) -> Replica {
    let registry = prometheus::Registry::new();
    let settings = RedisSettings {
        url: RedisUrl::parse(&redis.url()).expect("as set up"),
        password: None,
        ca_file: None,
        timeout,
        reconnect_every: Duration::from_millis(100),
    };
    let client = Redis::connect(&settings, &registry, scripts()).expect("as set up");
    let metrics = RevocationMetrics::new(&registry);
    let revocations = Revocations::with_redis(
        RevocationSettings {
            skew: Duration::from_secs(5),
            ttl: Duration::from_secs(3600),
            max_watchers: 8,
        },
        client,
        "t",
        Duration::from_millis(100),
        metrics.clone(),
    );
    Replica {
        revocations,
        metrics,
    }
}

fn pool() -> UserPoolId {
    UserPoolId::parse("eu-west-1_abc").expect("as set up")
}

/// Waits (up to 10 s) until `condition` holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("not within 10 s: {what}");
}

async fn xlen(connection: &mut redis::aio::MultiplexedConnection) -> usize {
    redis::cmd("XLEN")
        .arg("{t}:revocations")
        .query_async(connection)
        .await
        .expect("as set up")
}

async fn caught_up(replica: &Replica) {
    let mut caught_up = replica.revocations.caught_up();
    tokio::time::timeout(Duration::from_secs(10), caught_up.wait_for(|c| *c))
        .await
        .expect("caught up within 10 s")
        .expect("the follower runs");
}

#[tokio::test]
async fn a_watermark_recorded_on_one_replica_reaches_the_others_and_later_ones() {
    let redis = TestRedis::start();
    let (a, b) = (
        replica(&redis, Duration::from_secs(1)),
        replica(&redis, Duration::from_secs(1)),
    );
    caught_up(&a).await;
    caught_up(&b).await;
    let mut watch = b.revocations.watch(vec![pool()], None).expect("as set up");

    let watermark = a.revocations.record(&pool(), ALICE).logged().await;
    assert_eq!(a.metrics.recorded.with_label_values(&["logged"]).get(), 1);
    eventually("B sees it", || {
        b.revocations.is_revoked(&pool(), ALICE, watermark)
    })
    .await;
    assert!(!b.revocations.is_revoked(&pool(), ALICE, watermark + 1));
    let watched = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("as set up")
        .expect("as set up")
        .expect("as set up");
    assert_eq!(watched.revocation.sub, ALICE);
    assert_eq!(watched.revocation.revoked_before, watermark);

    // A lower watermark (a clock behind) changes nothing and logs nothing.
    let mut connection = redis.connection().await;
    let log = a.revocations.shared.log.as_ref().expect("with Redis");
    let epoch = a.revocations.shared.epoch.load_full().expect("known");
    let lower = log.record(&epoch, &pool(), ALICE, watermark - 60).await;
    assert_eq!(lower.expect("Redis answers"), store::Logged::Kept);
    assert_eq!(xlen(&mut connection).await, 1);
    // Nor does a write for a log this replica does not know (lost since).
    let other = log
        .record(&cursor::Epoch::random(), &pool(), "other-user", watermark)
        .await;
    assert_eq!(other.expect("Redis answers"), store::Logged::OtherEpoch);
    assert_eq!(xlen(&mut connection).await, 1);
    let key: Option<String> = redis::cmd("GET")
        .arg("{t}:revoked:eu-west-1_abc:other-user")
        .query_async(&mut connection)
        .await
        .expect("as set up");
    assert_eq!(key, None, "no watermark written either");

    // An entry already expired in the log is not loaded.
    let _: String = redis::cmd("XADD")
        .arg("{t}:revocations")
        .arg("*")
        .arg("pool")
        .arg(pool().as_str())
        .arg("sub")
        .arg("expired-user")
        .arg("before")
        .arg(1_000)
        .query_async(&mut connection)
        .await
        .expect("as set up");
    let c = replica(&redis, Duration::from_secs(1));
    caught_up(&c).await;
    assert!(c.revocations.is_revoked(&pool(), ALICE, watermark));
    assert!(!c.revocations.is_revoked(&pool(), "expired-user", 0));
    assert_eq!(c.revocations.len(), 1);
}

#[tokio::test]
async fn a_write_redis_does_not_take_is_held_here_and_written_when_it_can() {
    let redis = TestRedis::start();
    let (a, b) = (
        replica(&redis, Duration::from_millis(200)),
        replica(&redis, Duration::from_millis(200)),
    );
    caught_up(&a).await;
    caught_up(&b).await;
    let mut connection = redis.connection().await;
    let max_memory = |bytes: u64| {
        let mut command = redis::cmd("CONFIG");
        command.arg("SET").arg("maxmemory").arg(bytes);
        command
    };
    // Every write is refused (OOM): the script does not run.
    let _: () = max_memory(1)
        .query_async(&mut connection)
        .await
        .expect("as set up");
    let watermark = a.revocations.record(&pool(), ALICE).logged().await;
    assert!(
        a.revocations.is_revoked(&pool(), ALICE, watermark),
        "held here at once"
    );
    assert_eq!(a.metrics.recorded.with_label_values(&["pending"]).get(), 1);
    // Signing the same user out again holds one watermark, not two.
    let again = a.revocations.record(&pool(), ALICE).logged().await;
    assert_eq!(a.metrics.recorded.with_label_values(&["pending"]).get(), 2);
    assert_eq!(a.metrics.pending.get(), 1, "one per user");
    let watermark = watermark.max(again);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !b.revocations.is_revoked(&pool(), ALICE, watermark),
        "Redis never took it"
    );
    let _: () = max_memory(0)
        .query_async(&mut connection)
        .await
        .expect("as set up");
    eventually("B sees it once Redis takes writes again", || {
        b.revocations.is_revoked(&pool(), ALICE, watermark)
    })
    .await;
    eventually("nothing held any more", || a.metrics.pending.get() == 0).await;
    assert_eq!(a.metrics.resets.get(), 0, "no data was lost");
}

#[tokio::test]
async fn a_log_lost_with_a_restart_is_detected_logged_and_written_back() {
    let mut redis = TestRedis::start();
    let a = replica(&redis, Duration::from_secs(1));
    caught_up(&a).await;
    let watermark = a.revocations.record(&pool(), ALICE).logged().await;
    let mut watch = a.revocations.watch(vec![pool()], None).expect("as set up");
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("as set up")
        .expect("as set up")
        .expect("as set up");

    redis.kill();
    redis.restart();
    eventually("the loss is counted", || a.metrics.resets.get() == 1).await;
    // The watcher is told to start over.
    let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("as set up");
    assert_eq!(end, Some(Err(WatchEnd::LogReset)));
    // A replica started after the loss has it back, from A's memory.
    let b = replica(&redis, Duration::from_secs(1));
    eventually("B has it", || {
        b.revocations.is_revoked(&pool(), ALICE, watermark)
    })
    .await;
    // Resuming with a cursor of the lost log replays what is live.
    let mut resumed = a
        .revocations
        .watch(vec![pool()], Some(first.cursor.clone()))
        .expect("as set up");
    let replayed = tokio::time::timeout(Duration::from_secs(5), resumed.next())
        .await
        .expect("as set up")
        .expect("as set up")
        .expect("as set up");
    assert_eq!(replayed.revocation.sub, ALICE);
    assert_ne!(replayed.cursor.epoch, first.cursor.epoch);
}

#[tokio::test]
async fn flush_waits_for_the_writes_under_way() {
    let redis = TestRedis::start();
    let a = replica(&redis, Duration::from_secs(1));
    caught_up(&a).await;
    let recorded = a.revocations.record(&pool(), ALICE);
    a.revocations.log_in_background(recorded);
    a.revocations
        .flush(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    let mut connection = redis.connection().await;
    assert_eq!(xlen(&mut connection).await, 1, "in the log once flushed");
    assert_eq!(a.metrics.recorded.with_label_values(&["logged"]).get(), 1);
}

#[tokio::test]
async fn a_log_gone_back_to_an_older_state_is_detected_and_written_back() {
    let redis = TestRedis::start();
    let a = replica(&redis, Duration::from_secs(1));
    caught_up(&a).await;
    let users = ["user-1", "user-2", "user-3"];
    let mut watermarks = Vec::new();
    for user in users {
        watermarks.push(a.revocations.record(&pool(), user).logged().await);
    }
    eventually("A has read its own entries", || {
        a.revocations
            .shared
            .watermarks
            .logged_since(None, None)
            .len()
            == 3
    })
    .await;

    // As if restored from a snapshot older than those three: same epoch,
    // a log that ends below what A has read.
    let mut connection = redis.connection().await;
    let mut delete = redis::cmd("DEL");
    delete.arg("{t}:revocations");
    for user in users {
        delete.arg(format!("{{t}}:revoked:eu-west-1_abc:{user}"));
    }
    let _: usize = delete
        .query_async(&mut connection)
        .await
        .expect("as set up");
    let _: String = redis::cmd("XADD")
        .arg("{t}:revocations")
        .arg("1-0")
        .arg("pool")
        .arg(pool().as_str())
        .arg("sub")
        .arg("long-expired")
        .arg("before")
        .arg(1_000)
        .query_async(&mut connection)
        .await
        .expect("as set up");
    assert_eq!(a.metrics.resets.get(), 0, "not noticed before reconnecting");
    // A reconnects (as after a failover).
    let _: usize = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut connection)
        .await
        .expect("as set up");

    eventually("the loss is counted", || a.metrics.resets.get() == 1).await;
    let b = replica(&redis, Duration::from_secs(1));
    caught_up(&b).await;
    eventually("B has the three back, from A", || {
        users
            .iter()
            .zip(&watermarks)
            .all(|(user, watermark)| b.revocations.is_revoked(&pool(), user, *watermark))
    })
    .await;
    assert_eq!(a.metrics.resets.get(), 1, "counted once");
}
