//! The AdminGetUser in front of every sign-out: its failures are the
//! sign-out's (and no sign-out call follows), canonical usernames are
//! cached, aliases are not, and its own budget refuses what is over it.

use tonic::Code;

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, TestApp, assert_error, metrics_text, test_config},
};

/// `session_user_lookups_total{result}` from the metrics page.
async fn lookups(app: &TestApp, result: &str) -> u64 {
    let prefix = format!("session_user_lookups_total{{result=\"{result}\"}} ");
    metrics_text(app.metrics_addr)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}"))
}

async fn app_against(fake: &FakeCognito) -> TestApp {
    TestApp::spawn(test_config(&fake.endpoint())).await
}

#[tokio::test]
async fn a_throttled_lookup_fails_the_sign_out_as_cognito_throttled_with_no_sign_out_call() {
    let fake = FakeCognito::start(Reply::Ok).await;
    fake.set_lookup_reply(Some(Reply::AwsError {
        status: 400,
        code: "TooManyRequestsException",
    }));
    let app = app_against(&fake).await;

    let status = app.sign_out(POOL, "alice").await.expect_err("throttled");

    assert_error(&status, Code::ResourceExhausted, "COGNITO_THROTTLED", true);
    assert_eq!(fake.lookups().len(), 1, "no retry of the lookup");
    assert!(fake.requests().is_empty(), "no sign-out call");
    assert_eq!(lookups(&app, "error").await, 1);
}

#[tokio::test]
async fn an_unknown_user_is_not_found_before_any_sign_out_call() {
    let fake = FakeCognito::start(Reply::Ok).await;
    fake.set_lookup_reply(Some(Reply::UnknownUser("nobody")));
    let app = app_against(&fake).await;

    let status = app.sign_out(POOL, "nobody").await.expect_err("unknown");

    assert_error(&status, Code::NotFound, "USER_NOT_FOUND", false);
    assert!(fake.requests().is_empty(), "no sign-out call");
    assert_eq!(lookups(&app, "not_found").await, 1);
}

#[tokio::test]
async fn a_lookup_internal_error_is_unavailable_with_no_sign_out_call() {
    let fake = FakeCognito::start(Reply::Ok).await;
    fake.set_lookup_reply(Some(Reply::AwsError {
        status: 500,
        code: "InternalErrorException",
    }));
    let app = app_against(&fake).await;

    let status = app.sign_out(POOL, "alice").await.expect_err("fails");

    assert_error(&status, Code::Unavailable, "COGNITO_INTERNAL_ERROR", true);
    assert!(fake.requests().is_empty(), "no sign-out call");
}

#[tokio::test]
async fn a_canonical_username_is_looked_up_once_and_an_alias_every_time() {
    let fake = FakeCognito::start(Reply::Ok).await;
    fake.set_user("alice", "alice", "11111111-2222-4333-8444-555555555555");
    fake.set_user(
        "alice@example.com",
        "alice",
        "11111111-2222-4333-8444-555555555555",
    );
    let app = app_against(&fake).await;

    for _ in 0..2 {
        app.sign_out(POOL, "alice").await.expect("signed out");
    }
    for _ in 0..2 {
        app.sign_out(POOL, "alice@example.com")
            .await
            .expect("signed out");
    }

    let looked_up: Vec<_> = fake
        .lookups()
        .iter()
        .map(|r| r.body["Username"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        looked_up,
        ["alice", "alice@example.com", "alice@example.com"],
        "the canonical name once, the alias each time"
    );
    assert_eq!(fake.requests().len(), 4, "every sign-out reached Cognito");
    assert_eq!(lookups(&app, "cached").await, 1);
    assert_eq!(lookups(&app, "cognito").await, 3);
}

#[tokio::test]
async fn the_lookup_is_signed_and_names_the_pool() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = app_against(&fake).await;

    app.sign_out(POOL, "carol").await.expect("signed out");

    let lookup = &fake.lookups()[0];
    assert!(lookup.signed);
    assert_eq!(lookup.body["UserPoolId"], POOL);
    assert_eq!(lookup.body["Username"], "carol");
}

#[tokio::test]
async fn lookups_over_their_own_budget_are_rate_limited_with_no_sign_out_call() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.users.user_lookup_rate_limit_rps = 0.01;
    config.users.user_lookup_burst = 1;
    let app = TestApp::spawn(config).await;

    // Two users: each needs a lookup, and so a permit.
    app.sign_out(POOL, "dave@example.com")
        .await
        .expect("the burst's one permit");
    let status = app
        .sign_out(POOL, "erin@example.com")
        .await
        .expect_err("over budget");

    assert_error(&status, Code::ResourceExhausted, "RATE_LIMITED", true);
    assert_eq!(fake.lookups().len(), 1);
    assert_eq!(fake.requests().len(), 1, "only the first user's sign-out");
    assert_eq!(lookups(&app, "rate_limited").await, 1);
}

/// moto 5.2.5 resolves an email in a pool whose UsernameAttributes hold
/// `email` (its Username is then the sub, as in Cognito); it does not resolve
/// AliasAttributes aliases, so alias cases run against the fake only.
#[tokio::test]
async fn moto_resolves_an_email_username_and_the_sub_before_signing_out() {
    let moto = crate::moto::Moto::start().await;
    let cognito = moto.client();
    let (pool_id, _) = crate::moto::create_pool(&cognito, "email-usernames", true).await;
    let email = "frank@example.com";
    let sub = crate::moto::create_user(&cognito, &pool_id, email, Some(email)).await;
    let app = TestApp::spawn(test_config(&moto.endpoint)).await;

    app.sign_out(&pool_id, email).await.expect("by email");
    app.sign_out(&pool_id, &sub).await.expect("by sub");
    app.sign_out(&pool_id, &sub).await.expect("by sub, cached");

    assert_eq!(lookups(&app, "cognito").await, 2);
    assert_eq!(lookups(&app, "cached").await, 1);
}
