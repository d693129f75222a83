//! VerifyToken against a JWKS server of the test's own (keys made here):
//! rotation, the unknown-kid penalty, a JWKS that goes down, size bounds.

use std::time::{SystemTime, UNIX_EPOCH};

use session_service::{
    proto::{InactiveReason, TokenUse, VerifyTokenRequest, VerifyTokenResponse},
    tokens::mint::{self, MintKey},
};
use tonic::{Code, Status};

use crate::{
    helpers::{TestApp, assert_error, metrics_text, test_config},
    jwks_server::JwksServer,
};

const REGION: &str = "us-east-1";
const POOL: &str = "us-east-1_OwnKeys1";
const CLIENT: &str = "ownclient1";

fn now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    i64::try_from(secs).expect("fits")
}

fn token(key: &MintKey) -> String {
    key.sign(&mint::access_claims(REGION, POOL, CLIENT, now()))
}

pub(crate) async fn verify(
    app: &TestApp,
    token: &str,
    pool: &str,
) -> Result<VerifyTokenResponse, Status> {
    verify_as(app, token, pool, TokenUse::Either, &[]).await
}

/// VerifyToken asking for `token_use` and accepting `clients`.
pub(crate) async fn verify_as(
    app: &TestApp,
    token: &str,
    pool: &str,
    token_use: TokenUse,
    clients: &[&str],
) -> Result<VerifyTokenResponse, Status> {
    app.client
        .clone()
        .verify_token(VerifyTokenRequest {
            token: token.into(),
            user_pool_id: pool.into(),
            token_use: token_use.into(),
            client_ids: clients.iter().map(|c| (*c).to_owned()).collect(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn app_with(jwks: &JwksServer, extra: &[&str]) -> TestApp {
    let mut config = test_config(&jwks.endpoint());
    if !extra.is_empty() {
        use clap::Parser;
        let mut args = vec![
            "session-service",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--drain-delay",
            "0s",
            "--cognito-endpoint",
        ];
        let endpoint = jwks.endpoint();
        args.push(&endpoint);
        args.extend_from_slice(extra);
        config = session_service::config::Config::try_parse_from(args).expect("flags");
    }
    TestApp::spawn(config).await
}

#[tokio::test]
async fn a_token_of_the_pool_verifies_and_its_claims_come_back() {
    let key = MintKey::generate("k1");
    let jwks = JwksServer::start(mint::jwks(&[&key])).await;
    let app = app_with(&jwks, &[]).await;

    let response = verify(&app, &token(&key), POOL).await.expect("verified");

    assert!(response.active, "{response:?}");
    assert_eq!(response.client_id, CLIENT);
    assert_eq!(response.username, "alice");
    assert_eq!(response.token_use, i32::from(TokenUse::Access));
    let metrics = metrics_text(app.metrics_addr).await;
    assert!(
        metrics.contains(r#"session_token_verifications_total{result="active"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rotated_key_is_found_by_one_refetch() {
    let old = MintKey::generate("old");
    let new = MintKey::generate("new");
    let jwks = JwksServer::start(mint::jwks(&[&old])).await;
    let app = app_with(&jwks, &[]).await;
    assert!(verify(&app, &token(&old), POOL).await.expect("old").active);
    jwks.set(Some(mint::jwks(&[&old, &new])));

    let rotated = verify(&app, &token(&new), POOL).await.expect("new");
    let again = verify(&app, &token(&new), POOL).await.expect("new again");

    assert!(rotated.active && again.active);
    assert_eq!(
        jwks.fetches(),
        2,
        "one fetch to warm, one refetch for the new kid"
    );
}

#[tokio::test]
async fn many_tokens_with_unknown_kids_cost_one_fetch() {
    let key = MintKey::generate("k1");
    let jwks = JwksServer::start(mint::jwks(&[&key])).await;
    let app = app_with(&jwks, &[]).await;
    let forger = MintKey::generate("forged");

    for i in 0..20 {
        let forged = forger.sign_with_header(
            &serde_json::json!({"alg": "RS256", "kid": format!("kid-{i}")}),
            &mint::access_claims(REGION, POOL, CLIENT, now()),
        );
        let response = verify(&app, &forged, POOL).await.expect("a verdict");
        assert!(!response.active);
        assert_eq!(response.inactive_reason, i32::from(InactiveReason::Invalid));
    }

    assert_eq!(
        jwks.fetches(),
        1,
        "20 unknown kids within the penalty period"
    );
}

#[tokio::test]
async fn a_warm_cache_still_verifies_when_the_jwks_is_down_and_a_cold_one_is_unavailable() {
    let key = MintKey::generate("k1");
    let jwks = JwksServer::start(mint::jwks(&[&key])).await;
    let app = app_with(&jwks, &[]).await;
    assert!(verify(&app, &token(&key), POOL).await.expect("warm").active);
    jwks.set(None);

    let warm = verify(&app, &token(&key), POOL)
        .await
        .expect("from the cache");
    let other_pool = "us-east-1_Cold1";
    let cold_token = key.sign(&mint::access_claims(REGION, other_pool, CLIENT, now()));
    let cold = verify(&app, &cold_token, other_pool)
        .await
        .expect_err("nothing cached");
    let cold_again = verify(&app, &cold_token, other_pool)
        .await
        .expect_err("still nothing");

    assert!(warm.active);
    assert_error(&cold, Code::Unavailable, "JWKS_UNAVAILABLE", true);
    assert_error(&cold_again, Code::Unavailable, "JWKS_UNAVAILABLE", true);
    assert_eq!(
        jwks.fetches(),
        2,
        "the failed fetch is not retried within the penalty"
    );
}

#[tokio::test]
async fn oversized_empty_and_wrong_algorithm_tokens_are_refused_before_any_fetch() {
    let key = MintKey::generate("k1");
    let jwks = JwksServer::start(mint::jwks(&[&key])).await;
    let app = app_with(&jwks, &[]).await;

    let nine_kib = verify(&app, &"a".repeat(9 * 1024), POOL)
        .await
        .expect_err("9 KiB");
    let hundred_kib = verify(&app, &"a".repeat(100 * 1024), POOL)
        .await
        .expect_err("100 KiB");
    let empty = verify(&app, "", POOL).await.expect_err("empty");

    // Wrong algorithms are refused before any key lookup: no fetch either.
    let payload = mint::encode_json(&mint::access_claims(REGION, POOL, CLIENT, now()));
    for alg in ["none", "HS256", "RS512", "PS256"] {
        let header = mint::encode_json(&serde_json::json!({"alg": alg, "kid": "k1"}));
        let response = verify(&app, &format!("{header}.{payload}.c2ln"), POOL)
            .await
            .expect("a verdict");
        assert_eq!(
            response.inactive_reason,
            i32::from(InactiveReason::Invalid),
            "{alg}"
        );
    }

    assert_error(&nine_kib, Code::InvalidArgument, "INVALID_FIELD", false);
    assert_error(&empty, Code::InvalidArgument, "INVALID_FIELD", false);
    // Over the transport's 16 KiB bound: refused before decoding at all.
    assert_eq!(hundred_kib.code(), Code::OutOfRange, "{hundred_kib:?}");
    assert_eq!(jwks.fetches(), 0);
    assert!(
        verify(&app, &token(&key), POOL)
            .await
            .expect("still serves")
            .active
    );
}

#[tokio::test]
async fn an_expired_token_is_inactive_with_reason_expired() {
    let key = MintKey::generate("k1");
    let jwks = JwksServer::start(mint::jwks(&[&key])).await;
    let app = app_with(&jwks, &["--token-leeway", "0s"]).await;
    let mut claims = mint::access_claims(REGION, POOL, CLIENT, now() - 7200);
    claims["exp"] = serde_json::json!(now() - 1);

    let response = verify(&app, &key.sign(&claims), POOL)
        .await
        .expect("a verdict");

    assert!(!response.active);
    assert_eq!(response.inactive_reason, i32::from(InactiveReason::Expired));
    assert!(response.sub.is_empty(), "no claims of an inactive token");
}

#[tokio::test]
async fn the_policy_grants_verifytoken_only_to_rules_that_name_it() {
    let key = MintKey::generate("k1");
    let jwks = JwksServer::start(mint::jwks(&[&key])).await;
    let dir = crate::helpers::scratch_dir("verify-authz");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "rules:\n  - caller: spiffe://prod.test/ns/billing/*\n    pools: [{POOL}]\n  \
             - caller: spiffe://prod.test/ns/gateway/*\n    pools: [\"*\"]\n    rpcs: [VerifyToken]\n"
        ),
    )
    .expect("write policy");
    let mut config = test_config(&jwks.endpoint());
    config.security.trust_forwarded_client_cert = true;
    config.security.authz_policy = Some(policy);
    let app = TestApp::spawn(config).await;
    let as_caller = |uri: &str| {
        let mut request = tonic::Request::new(VerifyTokenRequest {
            token: token(&key),
            user_pool_id: POOL.into(),
            token_use: TokenUse::Access.into(),
            client_ids: vec![],
        });
        let xfcc = format!("By=spiffe://prod.test/ns/session/sa/api;URI={uri}");
        request
            .metadata_mut()
            .insert("x-forwarded-client-cert", xfcc.parse().expect("ascii"));
        request
    };
    let mut client = app.client.clone();

    let gateway = client
        .verify_token(as_caller("spiffe://prod.test/ns/gateway/sa/edge"))
        .await
        .expect("granted");
    let billing = client
        .verify_token(as_caller("spiffe://prod.test/ns/billing/sa/api"))
        .await
        .expect_err("a rule without rpcs grants GlobalSignOut only");
    let stranger = client
        .verify_token(as_caller("spiffe://prod.test/ns/games/sa/api"))
        .await
        .expect_err("no rule");

    assert!(gateway.into_inner().active);
    assert_error(
        &billing,
        Code::PermissionDenied,
        "RPC_NOT_ALLOWED_FOR_CALLER",
        false,
    );
    assert_error(
        &stranger,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
        false,
    );
    assert_eq!(jwks.fetches(), 1, "refused calls fetch nothing");
}
