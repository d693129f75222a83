//! Row 9: a new `x-caller-id` on every request. Self-declared ids that no
//! override names share one allowance, so minting them buys one caller's
//! share, and a named (or verified) caller keeps its own.

use std::time::{Duration, Instant};

use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};
use tonic::{Code, transport::Channel};

use super::{Service, figure};
use crate::helpers::POOL;

async fn sign_out_as(channel: Channel, caller: String) -> Result<(), Code> {
    let mut request = tonic::Request::new(GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: format!("user-of-{caller}"),
    });
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().expect("ascii id"));
    SessionServiceClient::new(channel)
        .global_sign_out(request)
        .await
        .map(|_| ())
        .map_err(|status| status.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row9_minting_caller_ids_does_not_take_the_budget_from_a_named_caller() {
    let service = Service::start(
        None,
        &[
            ("SESSION_RATE_LIMIT_RPS", "20"),
            ("SESSION_PER_CALLER_RPS", "5"),
            ("SESSION_PER_CALLER_RPS_OVERRIDES", "billing=5"),
        ],
    )
    .await;
    let channel = Channel::from_shared(format!("http://{}", service.addr))
        .expect("uri")
        .connect_lazy();
    // For two seconds: 50 requests a second, each from a new id, and the
    // well-behaved caller at 4 a second, under its allowance of 5.
    let started = Instant::now();
    let mut minted = tokio::task::JoinSet::new();
    let mut billing = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0..100 {
        tick.tick().await;
        minted.spawn(sign_out_as(channel.clone(), format!("minted-{i}")));
        if i % 12 == 0 {
            billing.spawn(sign_out_as(channel.clone(), "billing".into()));
        }
    }
    let billing = billing.join_all().await;
    let minted = minted.join_all().await;
    let elapsed = started.elapsed();
    let billing_refused: Vec<_> = billing.iter().filter_map(|r| r.err()).collect();
    let minted_ok = minted.iter().filter(|r| r.is_ok()).count();
    figure(
        9,
        &format!(
            "over {elapsed:.1?}: minted ids {minted_ok} of {} admitted; the named caller refused {} of {} ({billing_refused:?})",
            minted.len(),
            billing_refused.len(),
            billing.len()
        ),
    );
    assert!(
        billing_refused.is_empty(),
        "the named caller was refused: {billing_refused:?}"
    );
    // One allowance of 5/s (burst 5) over about 2 s, with room for timing.
    assert!(
        minted_ok <= 20,
        "minted ids got {minted_ok} requests through"
    );
}
