//! Revocation end to end against moto's real sign-ins and tokens: once
//! GlobalSignOut returns, VerifyToken answers REVOKED for every token the
//! user held, by whatever name they were signed out.

use std::time::Duration;

use session_service::proto::TokenUse;

use crate::{
    helpers::{TestApp, test_config},
    moto::{Moto, create_pool, create_user, sign_in},
    revocation::{now, verdict},
    verify_token::verify_as,
};

#[tokio::test]
async fn after_a_sign_out_on_moto_every_old_token_is_revoked_others_and_later_sign_ins_are_not() {
    let moto = Moto::start().await;
    let cognito = moto.client();
    let (pool_id, client_id) = create_pool(&cognito, "revocation", false).await;
    let (email_pool, email_client) = create_pool(&cognito, "revocation", true).await;
    create_user(&cognito, &pool_id, "alice", Some("alice@example.com")).await;
    create_user(&cognito, &pool_id, "bob", Some("bob@example.com")).await;
    create_user(
        &cognito,
        &email_pool,
        "frank@example.com",
        Some("frank@example.com"),
    )
    .await;
    let alice = sign_in(&cognito, &pool_id, &client_id, "alice").await;
    let bob = sign_in(&cognito, &pool_id, &client_id, "bob").await;
    let frank = sign_in(&cognito, &email_pool, &email_client, "frank@example.com").await;
    let mut config = test_config(&moto.endpoint);
    config.revocation.revocation_skew = Duration::from_secs(1);
    let app = TestApp::spawn(config).await;
    // Arrange check: every token verifies, each as what it is.
    for (token, token_use) in [(&alice.access, TokenUse::Access), (&alice.id, TokenUse::Id)] {
        let response = verify_as(&app, token, &pool_id, token_use, &[&client_id])
            .await
            .expect("a verdict");
        assert!(response.active, "{response:?}");
    }
    for token in [&bob.access, &bob.id] {
        assert_eq!(verdict(&app.client, token, &pool_id).await, "active");
    }
    for token in [&frank.access, &frank.id] {
        assert_eq!(verdict(&app.client, token, &email_pool).await, "active");
    }

    app.sign_out(&pool_id, "alice")
        .await
        .expect("alice by username");
    app.sign_out(&email_pool, "frank@example.com")
        .await
        .expect("frank by email");
    let signed_out = now();

    for token in [&alice.access, &alice.id] {
        assert_eq!(verdict(&app.client, token, &pool_id).await, "revoked");
    }
    for token in [&frank.access, &frank.id] {
        assert_eq!(verdict(&app.client, token, &email_pool).await, "revoked");
    }
    for token in [&bob.access, &bob.id] {
        assert_eq!(
            verdict(&app.client, token, &pool_id).await,
            "active",
            "bob untouched"
        );
    }

    // Every watermark W is at most `signed_out` + 1 s of skew, and moto's
    // auth_time counts whole seconds of the wall clock: a sign-in is after W
    // only once that clock has passed W + 1. No event marks that moment, so
    // this waits for the clock itself (about two seconds).
    while now() <= signed_out + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = sign_in(&cognito, &pool_id, &client_id, "alice").await;
    let frank_again = sign_in(&cognito, &email_pool, &email_client, "frank@example.com").await;
    for token in [&again.access, &again.id] {
        assert_eq!(
            verdict(&app.client, token, &pool_id).await,
            "active",
            "a fresh sign-in"
        );
    }
    for token in [&frank_again.access, &frank_again.id] {
        assert_eq!(
            verdict(&app.client, token, &email_pool).await,
            "active",
            "a fresh sign-in"
        );
    }
}
