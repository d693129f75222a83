use std::time::Duration;

use tokio_stream::StreamExt;

use super::*;

const ALICE: &str = "8f3c2a10-5b7d-4e21-9a0c-1d2e3f405162";

fn settings(max_watchers: usize) -> RevocationSettings {
    RevocationSettings {
        skew: Duration::from_secs(5),
        ttl: Duration::from_secs(3600),
        max_watchers,
    }
}

fn memory(max_watchers: usize) -> Revocations {
    let registry = prometheus::Registry::new();
    Revocations::in_memory(settings(max_watchers), RevocationMetrics::new(&registry))
}

fn pool(name: &str) -> UserPoolId {
    UserPoolId::parse(name).expect("as set up")
}

async fn next(stream: &mut (impl StreamExt<Item = Result<Watched, WatchEnd>> + Unpin)) -> Watched {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a message within 5 s")
        .expect("the stream goes on")
        .expect("a revocation")
}

#[tokio::test]
async fn a_recorded_watermark_revokes_what_signed_in_before_it_plus_the_skew() {
    let revocations = memory(4);
    let eu = pool("eu-west-1_abc");
    let before = now_secs();
    let watermark = revocations.record(&eu, ALICE).logged().await;
    assert!((before + 5..=now_secs() + 5).contains(&watermark));
    assert!(revocations.is_revoked(&eu, ALICE, watermark));
    assert!(!revocations.is_revoked(&eu, ALICE, watermark + 1));
    assert!(!revocations.is_revoked(&pool("us-east-1_abc"), ALICE, 0));
}

#[tokio::test]
async fn a_watcher_gets_the_snapshot_then_the_tail_and_resumes_from_its_cursor() {
    let revocations = memory(4);
    let eu = pool("eu-west-1_abc");
    let us = pool("us-east-1_abc");
    revocations.record(&eu, "user-1").logged().await;
    revocations.record(&us, "user-2").logged().await;
    revocations.record(&eu, "user-3").logged().await;

    let mut stream = revocations
        .watch(vec![eu.clone()], None)
        .expect("as set up");
    assert_eq!(next(&mut stream).await.revocation.sub, "user-1");
    let second = next(&mut stream).await;
    assert_eq!(second.revocation.sub, "user-3");
    revocations.record(&us, "user-4").logged().await;
    revocations.record(&eu, "user-5").logged().await;
    let tail = next(&mut stream).await;
    assert_eq!(
        tail.revocation.sub, "user-5",
        "the other pool's is not sent"
    );
    assert!(tail.cursor.position > second.cursor.position);
    drop(stream);

    // Reconnecting with the second cursor: what came after it, nothing else.
    let mut resumed = revocations
        .watch(vec![eu.clone()], Some(second.cursor.clone()))
        .expect("as set up");
    assert_eq!(next(&mut resumed).await.revocation.sub, "user-5");
    revocations.record(&eu, "user-1").logged().await;
    let raised = next(&mut resumed).await;
    assert_eq!(raised.revocation.sub, "user-1", "a raise is sent again");

    // A cursor of another log (another process) replays everything live.
    let foreign = Cursor {
        epoch: Epoch::parse("00000000000000ff").expect("as set up"),
        position: tail.cursor.position,
    };
    let mut replay = revocations
        .watch(vec![eu], Some(foreign))
        .expect("as set up");
    let subs = [
        next(&mut replay).await.revocation.sub,
        next(&mut replay).await.revocation.sub,
        next(&mut replay).await.revocation.sub,
    ];
    assert_eq!(subs, ["user-3", "user-5", "user-1"], "in log order");
}

#[tokio::test]
async fn a_watcher_that_falls_far_behind_still_gets_every_watermark_once_in_order() {
    let revocations = memory(4);
    let eu = pool("eu-west-1_abc");
    let mut stream = revocations
        .watch(vec![eu.clone()], None)
        .expect("as set up");
    // Once this arrives, the watcher follows the events (past its snapshot).
    revocations.record(&eu, "first").logged().await;
    assert_eq!(next(&mut stream).await.revocation.sub, "first");
    // More than the client buffer plus the event buffer, unread: the
    // watcher's events lag, and it re-reads the map.
    let total = 6_000;
    for user in 0..total {
        revocations
            .record(&eu, &format!("user-{user}"))
            .logged()
            .await;
    }
    let mut last = None;
    for user in 0..total {
        let watched = next(&mut stream).await;
        assert_eq!(watched.revocation.sub, format!("user-{user}"));
        assert!(last < Some(watched.cursor.position));
        last = Some(watched.cursor.position);
    }
    revocations.record(&eu, "after").logged().await;
    assert_eq!(next(&mut stream).await.revocation.sub, "after");
}

#[tokio::test]
async fn watchers_are_bounded_and_end_when_the_server_drains() {
    let revocations = memory(1);
    let eu = pool("eu-west-1_abc");
    let mut first = revocations
        .watch(vec![eu.clone()], None)
        .expect("as set up");
    assert_eq!(
        revocations.watch(vec![eu.clone()], None).err(),
        Some(WatchRefused::TooManyWatchers)
    );
    revocations.close_watchers();
    let end = tokio::time::timeout(Duration::from_secs(5), first.next())
        .await
        .expect("as set up");
    assert_eq!(end, Some(Err(WatchEnd::ShuttingDown)));
    assert_eq!(
        revocations.watch(vec![eu], None).err(),
        Some(WatchRefused::ShuttingDown)
    );
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_place() {
    let revocations = memory(1);
    let eu = pool("eu-west-1_abc");
    let first = revocations
        .watch(vec![eu.clone()], None)
        .expect("as set up");
    drop(first);
    // The task sees the closed channel and ends, releasing the permit.
    let mut again = None;
    for _ in 0..100 {
        if let Ok(stream) = revocations.watch(vec![eu.clone()], None) {
            again = Some(stream);
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(again.is_some(), "the place was freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_opened_while_sign_outs_are_recorded_misses_none() {
    let revocations = memory(4);
    let eu = pool("eu-west-1_abc");
    let total = 30_000;
    let recorder = {
        let (revocations, eu) = (revocations.clone(), eu.clone());
        tokio::spawn(async move {
            for user in 0..total {
                revocations
                    .record(&eu, &format!("user-{user}"))
                    .logged()
                    .await;
                if user % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Open it while the recorder runs.
    while revocations.len() < 1_000 {
        tokio::task::yield_now().await;
    }
    let mut stream = revocations.watch(vec![eu], None).expect("a watcher");
    let mut seen = std::collections::HashSet::new();
    while seen.len() < total {
        let watched = next(&mut stream).await;
        assert!(seen.insert(watched.revocation.sub), "sent once");
    }
    recorder.await.expect("the recorder");
}

#[tokio::test(start_paused = true)]
async fn clients_that_read_nothing_of_their_snapshot_hold_it_ten_seconds_at_most() {
    let revocations = memory(4);
    let eu = pool("eu-west-1_abc");
    // More than a client's buffer: a client that reads nothing stalls its
    // snapshot, holding one of the two snapshot permits.
    for user in 0..400 {
        revocations
            .record(&eu, &format!("user-{user}"))
            .logged()
            .await;
    }
    let stalled = [
        revocations
            .watch(vec![eu.clone()], None)
            .expect("a watcher"),
        revocations
            .watch(vec![eu.clone()], None)
            .expect("a watcher"),
    ];
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let mut third = revocations.watch(vec![eu], None).expect("a watcher");

    let first = tokio::time::timeout(Duration::from_secs(60), third.next())
        .await
        .expect("a permit within 60 s of virtual time")
        .expect("the stream goes on")
        .expect("a revocation");

    assert_eq!(first.revocation.sub, "user-0");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(12),
        "the stalled snapshots let go after 10 s: {waited:?}"
    );
    // The stalled ones end after what was queued for them.
    for mut stream in stalled {
        let mut received = 0;
        while let Some(item) = stream.next().await {
            item.expect("a revocation");
            received += 1;
        }
        assert!(received < 400, "cut off: {received}");
    }
}
