//! Revocation watermarks through VerifyToken, against the fake Cognito
//! serving the test's own keys: a sign-out revokes every token of the
//! user's sub signed in up to the watermark, whatever name it was made by
//! and whatever Cognito answered.

use std::time::{SystemTime, UNIX_EPOCH};

use session_service::{
    proto::{
        InactiveReason, TokenUse, VerifyTokenRequest, session_service_client::SessionServiceClient,
    },
    tokens::mint::{self, MintKey},
};
use tonic::{Code, transport::Channel};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, TestApp, assert_error, metrics_text, test_config},
};

pub(crate) const CLIENT: &str = "revclient1";
/// `--revocation-skew`'s default, in seconds.
const DEFAULT_SKEW: i64 = 5;
const ALICE: &str = "a11ce000-0000-4000-8000-000000000001";
const BOB: &str = "b0b00000-0000-4000-8000-000000000002";
const CAROL: &str = "ca401000-0000-4000-8000-000000000003";
const DAVE: &str = "da4e0000-0000-4000-8000-000000000004";

pub(crate) fn now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    i64::try_from(secs).expect("fits")
}

/// An access token of `sub` in [`POOL`], signed in at `auth_time` and
/// issued at `iat` (a refresh keeps the first, moves the second).
pub(crate) fn token_for(key: &MintKey, sub: &str, auth_time: i64, iat: i64) -> String {
    let mut claims = mint::access_claims("us-east-1", POOL, CLIENT, iat);
    claims["sub"] = sub.into();
    claims["auth_time"] = auth_time.into();
    key.sign(&claims)
}

/// A fake Cognito that also serves the JWKS of the key it returns.
pub(crate) async fn fake_with_keys(reply: Reply) -> (FakeCognito, MintKey) {
    let key = MintKey::generate("rev1");
    let fake = FakeCognito::start(reply).await;
    fake.set_jwks(mint::jwks(&[&key]));
    (fake, key)
}

/// VerifyToken's verdict in one word: "active", "revoked", or the other
/// inactive reason's name, so that a failed assertion says what it got.
pub(crate) async fn verdict(
    client: &SessionServiceClient<Channel>,
    token: &str,
    pool: &str,
) -> String {
    let response = client
        .clone()
        .verify_token(VerifyTokenRequest {
            token: token.into(),
            user_pool_id: pool.into(),
            token_use: TokenUse::Either.into(),
            client_ids: Vec::new(),
        })
        .await
        .expect("a verdict")
        .into_inner();
    if response.active {
        return "active".into();
    }
    match InactiveReason::try_from(response.inactive_reason) {
        Ok(InactiveReason::Revoked) => "revoked".into(),
        Ok(other) => other.as_str_name().into(),
        Err(_) => format!("unknown reason {}", response.inactive_reason),
    }
}

/// The value of one series on the metrics page (0 when absent).
pub(crate) async fn metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    let text = metrics_text(addr).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_sign_out_by_alias_revokes_the_subs_tokens_and_refreshes_of_them_but_not_later_sign_ins()
{
    let (fake, key) = fake_with_keys(Reply::Ok).await;
    fake.set_user("alice@example.com", "alice", ALICE);
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let signed_in = now() - 60;
    let old = token_for(&key, ALICE, signed_in, signed_in);
    let bobs = token_for(&key, BOB, signed_in, signed_in);
    // Arrange check: the keys are served and the token is good.
    assert_eq!(verdict(&app.client, &old, POOL).await, "active");

    let before = now();
    app.sign_out(POOL, "alice@example.com")
        .await
        .expect("signed out");
    let after = now();

    // The watermark W is the sign-out's clock plus the skew: between these.
    let (lowest_w, highest_w) = (before + DEFAULT_SKEW, after + DEFAULT_SKEW);
    // A refresh after the sign-out: a new iat, the first sign-in's auth_time.
    let refreshed = token_for(&key, ALICE, signed_in, after + 1);
    let at_the_watermark = token_for(&key, ALICE, lowest_w, after + 1);
    let after_the_watermark = token_for(&key, ALICE, highest_w + 1, highest_w + 1);
    assert_eq!(verdict(&app.client, &old, POOL).await, "revoked");
    assert_eq!(verdict(&app.client, &refreshed, POOL).await, "revoked");
    assert_eq!(
        verdict(&app.client, &at_the_watermark, POOL).await,
        "revoked"
    );
    assert_eq!(
        verdict(&app.client, &after_the_watermark, POOL).await,
        "active"
    );
    assert_eq!(verdict(&app.client, &bobs, POOL).await, "active");
    assert_eq!(fake.lookups()[0].body["Username"], "alice@example.com");
}

#[tokio::test]
async fn a_sign_out_by_the_sub_itself_revokes_that_subs_tokens() {
    let (fake, key) = fake_with_keys(Reply::Ok).await;
    // In a pool with username attributes, the sub is a name of the user.
    fake.set_user(CAROL, "carol", CAROL);
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let signed_in = now() - 60;
    let carols = token_for(&key, CAROL, signed_in, signed_in);
    let bobs = token_for(&key, BOB, signed_in, signed_in);
    assert_eq!(verdict(&app.client, &carols, POOL).await, "active");

    app.sign_out(POOL, CAROL).await.expect("signed out");

    assert_eq!(verdict(&app.client, &carols, POOL).await, "revoked");
    assert_eq!(verdict(&app.client, &bobs, POOL).await, "active");
}

#[tokio::test]
async fn a_sign_out_cognito_throttles_fails_yet_the_users_tokens_are_already_revoked() {
    let throttled = Reply::AwsError {
        status: 400,
        code: "TooManyRequestsException",
    };
    let (fake, key) = fake_with_keys(throttled).await;
    fake.set_user("dave", "dave", DAVE);
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let signed_in = now() - 60;
    let daves = token_for(&key, DAVE, signed_in, signed_in);

    let status = app.sign_out(POOL, "dave").await.expect_err("throttled");

    assert_error(&status, Code::ResourceExhausted, "COGNITO_THROTTLED", true);
    assert!(!fake.requests().is_empty(), "Cognito was asked");
    assert_eq!(verdict(&app.client, &daves, POOL).await, "revoked");
    let recorded = r#"session_revocations_recorded_total{result="memory_only"}"#;
    let revoked = r#"session_revocation_checks_total{result="revoked"}"#;
    assert_eq!(metric(app.metrics_addr, recorded).await, 1.0);
    assert_eq!(metric(app.metrics_addr, revoked).await, 1.0);
}
