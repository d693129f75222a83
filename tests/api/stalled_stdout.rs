//! A stalled stdout (the node's log pipe full) must not stall the service:
//! the log writer drops lines and counts them rather than blocking the
//! threads that serve calls.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::Stdio,
    time::Duration,
};

use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, binary, channel, metrics_text, terminate},
};

/// Enough calls that, at debug level, their log lines overflow both the
/// pipe (64 KiB) and the writer's queue (8,192 lines).
const CALLS: usize = 1500;

#[tokio::test]
async fn calls_are_served_while_stdout_is_not_read_and_lost_lines_are_counted() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut child = binary()
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "AKIDTESTTESTTESTTEST")
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("RUST_LOG", "debug")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(crate::helpers::UNLIMITED_LOOKUPS)
        .args([
            "--log-format",
            "json",
            "--cognito-endpoint",
            &fake.endpoint(),
        ])
        .args([
            "--default-user-pool-id",
            POOL,
            "--rate-limit-rps",
            "1000000",
        ])
        .args(["--rate-limit-burst", "1000000", "--drain-delay", "0s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts");
    // Read up to the "serving" line, then never again: the pipe fills.
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let (addr, metrics_addr, unread) = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                stdout.read_line(&mut line).expect("read") > 0,
                "no serving line"
            );
            let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let (Some(addr), Some(metrics)) =
                (log["addr"].as_str(), log["metrics_addr"].as_str())
            {
                let addr: SocketAddr = addr.parse().expect("address");
                let metrics: SocketAddr = metrics.parse().expect("address");
                // Kept open and unread until the test ends.
                return (addr, metrics, stdout);
            }
        }
    })
    .await
    .expect("reader");

    let mut client = SessionServiceClient::new(channel(addr).await);
    let served = async {
        for i in 0..CALLS {
            client
                .global_sign_out(GlobalSignOutRequest {
                    user_pool_id: String::new(),
                    username: format!("user-{i}"),
                })
                .await
                .expect("served although nobody reads the logs");
        }
    };
    // Bounded so that a blocking writer fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(120), served)
        .await
        .expect("every call answered while stdout is stalled");

    let text = metrics_text(metrics_addr).await;
    let dropped: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("session_log_lines_dropped_total "))
        .and_then(|v| v.parse().ok())
        .expect("the counter is exported");
    println!("{CALLS} calls served with stdout unread; {dropped} log lines dropped");
    assert!(
        dropped > 0,
        "lines beyond the queue are dropped and counted"
    );
    assert_eq!(fake.requests().len(), CALLS);
    terminate(child).await;
    drop(unread);
}
