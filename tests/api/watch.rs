//! WatchRevocations on one server (watermarks in memory): the snapshot, then
//! the tail, in log order; resuming by cursor; what is refused; the end of
//! the stream when the server drains; and grpcurl watching from a terminal.

use std::{process::Stdio, time::Duration};

use session_service::proto::{
    WatchRevocationsRequest, WatchRevocationsResponse, session_service_client::SessionServiceClient,
};
use tokio::io::AsyncReadExt;
use tonic::{Code, Status, Streaming, transport::Channel};

use crate::{
    fake_cognito::{FakeCognito, Reply, synthesized_sub},
    helpers::{POOL, TestApp, assert_error, test_config},
    tools,
};

/// Longer than any message takes on a loaded machine; a stream that is
/// silent this long is a failure.
const PATIENCE: Duration = Duration::from_secs(10);

/// Opens a watch of `pools` after `cursor` (empty: from the start).
pub(crate) async fn watch(
    client: &SessionServiceClient<Channel>,
    pools: &[&str],
    cursor: &str,
) -> Result<Streaming<WatchRevocationsResponse>, Status> {
    client
        .clone()
        .watch_revocations(WatchRevocationsRequest {
            user_pool_ids: pools.iter().map(|p| (*p).to_owned()).collect(),
            cursor: cursor.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The next message, which must come within [`PATIENCE`].
pub(crate) async fn next(
    stream: &mut Streaming<WatchRevocationsResponse>,
) -> WatchRevocationsResponse {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a message within the patience")
        .expect("a message, not an error")
        .expect("a message, not the end")
}

/// How the stream ends, which must happen within [`PATIENCE`].
pub(crate) async fn end(stream: &mut Streaming<WatchRevocationsResponse>) -> Status {
    loop {
        let message = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("the stream ends within the patience");
        match message {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended with OK, not a status"),
            Err(status) => return status,
        }
    }
}

async fn fake_and_app() -> (FakeCognito, TestApp) {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    (fake, app)
}

#[tokio::test]
async fn a_watcher_gets_the_snapshot_then_the_tail_in_log_order_with_cursors() {
    let (_fake, app) = fake_and_app().await;
    app.sign_out(POOL, "w-one").await.expect("signed out");
    app.sign_out(POOL, "w-two").await.expect("signed out");

    let mut stream = watch(&app.client, &[POOL], "").await.expect("watching");
    let first = next(&mut stream).await;
    let second = next(&mut stream).await;
    app.sign_out(POOL, "w-three").await.expect("signed out");
    let third = next(&mut stream).await;

    let subs: Vec<_> = [&first, &second, &third].map(|r| r.sub.clone()).into();
    assert_eq!(
        subs,
        ["w-one", "w-two", "w-three"].map(synthesized_sub),
        "log order"
    );
    for revocation in [&first, &second, &third] {
        assert_eq!(revocation.user_pool_id, POOL);
        assert!(revocation.revoked_before > 0, "{revocation:?}");
        // Kept for --revocation-ttl plus the skew (defaults 24 h and 5 s).
        assert_eq!(
            revocation.expires_at - revocation.revoked_before,
            86_400 + 5
        );
    }
    let cursors = [&first.cursor, &second.cursor, &third.cursor];
    assert!(cursors.iter().all(|c| !c.is_empty()), "{cursors:?}");
    assert!(
        cursors[0] != cursors[1] && cursors[1] != cursors[2],
        "{cursors:?}"
    );
}

#[tokio::test]
async fn resuming_with_a_cursor_loses_nothing_and_a_foreign_cursor_replays_everything_live() {
    let (_fake, app) = fake_and_app().await;
    for user in ["r-one", "r-two", "r-three"] {
        app.sign_out(POOL, user).await.expect("signed out");
    }
    let mut first_watch = watch(&app.client, &[POOL], "").await.expect("watching");
    let _one = next(&mut first_watch).await;
    let two = next(&mut first_watch).await;
    drop(first_watch);

    let mut resumed = watch(&app.client, &[POOL], &two.cursor)
        .await
        .expect("resumed");
    let three = next(&mut resumed).await;
    app.sign_out(POOL, "r-four").await.expect("signed out");
    let four = next(&mut resumed).await;
    // A cursor of another server's log (without Redis, each has its own).
    let (_other_fake, other) = fake_and_app().await;
    other.sign_out(POOL, "elsewhere").await.expect("signed out");
    let elsewhere = next(&mut watch(&other.client, &[POOL], "").await.expect("watching"))
        .await
        .cursor;
    let mut foreign = watch(&app.client, &[POOL], &elsewhere)
        .await
        .expect("a foreign cursor is not an error");
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(next(&mut foreign).await.sub);
    }

    assert_eq!(three.sub, synthesized_sub("r-three"));
    assert_eq!(four.sub, synthesized_sub("r-four"));
    assert_eq!(
        replayed,
        ["r-one", "r-two", "r-three", "r-four"].map(synthesized_sub)
    );
}

#[tokio::test]
async fn an_invalid_cursor_is_an_invalid_field() {
    let (_fake, app) = fake_and_app().await;

    let status = watch(&app.client, &[POOL], "not-a-cursor")
        .await
        .expect_err("refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_FIELD", false);
}

#[tokio::test]
async fn watching_a_pool_outside_the_allowed_ones_is_permission_denied() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.allowed_user_pool_ids = vec![POOL.parse().expect("pool id")];
    let app = TestApp::spawn(config).await;

    let other = watch(&app.client, &["us-east-1_Other1"], "")
        .await
        .expect_err("another pool");
    // One pool that is not allowed refuses the whole watch.
    let mixed = watch(&app.client, &[POOL, "us-east-1_Other1"], "")
        .await
        .expect_err("one pool not allowed");
    let allowed = watch(&app.client, &[POOL], "").await;

    assert_error(
        &other,
        Code::PermissionDenied,
        "USER_POOL_NOT_ALLOWED",
        false,
    );
    assert_error(
        &mixed,
        Code::PermissionDenied,
        "USER_POOL_NOT_ALLOWED",
        false,
    );
    assert!(allowed.is_ok(), "{allowed:?}");
}

#[tokio::test]
async fn a_watcher_over_max_revocation_watchers_is_refused_until_one_leaves() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.revocation.max_revocation_watchers = 1;
    let app = TestApp::spawn(config).await;
    let first = watch(&app.client, &[POOL], "")
        .await
        .expect("the one watcher");

    let second = watch(&app.client, &[POOL], "")
        .await
        .expect_err("one too many");
    drop(first);

    assert_error(&second, Code::ResourceExhausted, "TOO_MANY_WATCHERS", true);
    // The first one's slot comes free once the server sees it gone.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match watch(&app.client, &[POOL], "").await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot never came free"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}

#[tokio::test]
async fn a_watch_ends_with_shutting_down_when_the_server_drains_and_does_not_hold_the_shutdown() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    // A watch that held the shutdown would hold it this long.
    config.shutdown_grace = Duration::from_secs(60);
    let mut app = TestApp::spawn(config).await;
    app.sign_out(POOL, "d-one").await.expect("signed out");
    let mut stream = watch(&app.client, &[POOL], "").await.expect("watching");
    next(&mut stream).await;

    let server = app.shut_down();
    let status = end(&mut stream).await;

    assert_error(&status, Code::Unavailable, "SHUTTING_DOWN", true);
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the server stops well within its 60 s grace")
        .expect("server task");
}

#[tokio::test]
async fn grpcurl_watches_revocations_from_a_terminal() {
    let (_fake, app) = fake_and_app().await;
    app.sign_out(POOL, "g-before").await.expect("signed out");
    let mut grpcurl = tokio::process::Command::new(tools::grpcurl())
        .args(["-plaintext", "-d"])
        .arg(format!(r#"{{"user_pool_ids":["{POOL}"]}}"#))
        .arg(app.addr.to_string())
        .arg("session.v1.SessionService/WatchRevocations")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("grpcurl runs");
    let mut stdout = grpcurl.stdout.take().expect("piped");
    let mut printed = String::new();
    // The snapshot's message shows grpcurl is connected and watching.
    read_until(&mut stdout, &mut printed, &synthesized_sub("g-before")).await;

    app.sign_out(POOL, "g-after").await.expect("signed out");

    read_until(&mut stdout, &mut printed, &synthesized_sub("g-after")).await;
    assert!(printed.contains(r#""revokedBefore""#), "{printed}");
    assert!(printed.contains(r#""cursor""#), "{printed}");
    grpcurl.start_kill().expect("kill grpcurl");
    let _ = grpcurl.wait().await;
}

/// Reads grpcurl's JSON output into `printed` until a message names `sub`.
async fn read_until(stdout: &mut tokio::process::ChildStdout, printed: &mut String, sub: &str) {
    let wanted = format!(r#""sub": "{sub}""#);
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        while !printed.contains(&wanted) {
            let read = stdout.read(&mut buffer).await.expect("read grpcurl");
            assert!(read > 0, "grpcurl exited; it printed:\n{printed}");
            printed.push_str(&String::from_utf8_lossy(&buffer[..read]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted} within the patience; grpcurl printed:\n{printed}"));
}
