//! Revocation end to end against moto's real sign-ins and tokens: once
//! GlobalSignOut returns, VerifyToken answers REVOKED for every token the
//! user held, by whatever name they were signed out.

use std::time::Duration;

use aws_sdk_cognitoidentityprovider::{
    Client,
    types::{
        AttributeType, AuthFlowType, ExplicitAuthFlowsType, MessageActionType,
        UsernameAttributeType,
    },
};
use session_service::proto::TokenUse;

use crate::{
    helpers::{TestApp, test_config},
    moto::Moto,
    revocation::{now, verdict},
    verify_token::verify_as,
};

const PASSWORD: &str = "Correct-Horse-9-Battery!";

/// A pool (email usernames when `by_email`) and an app client that signs
/// in with passwords.
async fn pool(cognito: &Client, by_email: bool) -> (String, String) {
    let mut create = cognito.create_user_pool().pool_name("revocation");
    if by_email {
        create = create.username_attributes(UsernameAttributeType::Email);
    }
    let pool = create.send().await.expect("pool");
    let pool_id = pool
        .user_pool()
        .and_then(|p| p.id())
        .expect("id")
        .to_owned();
    let client = cognito
        .create_user_pool_client()
        .user_pool_id(&pool_id)
        .client_name("revocation")
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowAdminUserPasswordAuth)
        .explicit_auth_flows(ExplicitAuthFlowsType::AllowRefreshTokenAuth)
        .send()
        .await
        .expect("app client");
    let client_id = client
        .user_pool_client()
        .and_then(|c| c.client_id())
        .expect("client id")
        .to_owned();
    (pool_id, client_id)
}

async fn create_user(cognito: &Client, pool_id: &str, username: &str, email: &str) {
    cognito
        .admin_create_user()
        .user_pool_id(pool_id)
        .username(username)
        .user_attributes(
            AttributeType::builder()
                .name("email")
                .value(email)
                .build()
                .expect("attribute"),
        )
        .message_action(MessageActionType::Suppress)
        .send()
        .await
        .expect("user");
    cognito
        .admin_set_user_password()
        .user_pool_id(pool_id)
        .username(username)
        .password(PASSWORD)
        .permanent(true)
        .send()
        .await
        .expect("password");
}

/// A sign-in: (access token, ID token).
async fn sign_in(
    cognito: &Client,
    pool_id: &str,
    client_id: &str,
    username: &str,
) -> (String, String) {
    let auth = cognito
        .admin_initiate_auth()
        .user_pool_id(pool_id)
        .client_id(client_id)
        .auth_flow(AuthFlowType::AdminUserPasswordAuth)
        .auth_parameters("USERNAME", username)
        .auth_parameters("PASSWORD", PASSWORD)
        .send()
        .await
        .expect("sign in");
    let tokens = auth.authentication_result().expect("tokens");
    (
        tokens.access_token().expect("access").to_owned(),
        tokens.id_token().expect("id").to_owned(),
    )
}

#[tokio::test]
async fn after_a_sign_out_on_moto_every_old_token_is_revoked_others_and_later_sign_ins_are_not() {
    let moto = Moto::start().await;
    let cognito = moto.client();
    let (pool_id, client_id) = pool(&cognito, false).await;
    let (email_pool, email_client) = pool(&cognito, true).await;
    create_user(&cognito, &pool_id, "alice", "alice@example.com").await;
    create_user(&cognito, &pool_id, "bob", "bob@example.com").await;
    create_user(
        &cognito,
        &email_pool,
        "frank@example.com",
        "frank@example.com",
    )
    .await;
    let alice = sign_in(&cognito, &pool_id, &client_id, "alice").await;
    let bob = sign_in(&cognito, &pool_id, &client_id, "bob").await;
    let frank = sign_in(&cognito, &email_pool, &email_client, "frank@example.com").await;
    let mut config = test_config(&moto.endpoint);
    config.revocation.revocation_skew = Duration::from_secs(1);
    let app = TestApp::spawn(config).await;
    // Arrange check: every token verifies, each as what it is.
    for (token, token_use) in [(&alice.0, TokenUse::Access), (&alice.1, TokenUse::Id)] {
        let response = verify_as(&app, token, &pool_id, token_use, &[&client_id])
            .await
            .expect("a verdict");
        assert!(response.active, "{response:?}");
    }
    for token in [&bob.0, &bob.1] {
        assert_eq!(verdict(&app.client, token, &pool_id).await, "active");
    }
    for token in [&frank.0, &frank.1] {
        assert_eq!(verdict(&app.client, token, &email_pool).await, "active");
    }

    app.sign_out(&pool_id, "alice")
        .await
        .expect("alice by username");
    app.sign_out(&email_pool, "frank@example.com")
        .await
        .expect("frank by email");
    let signed_out = now();

    for token in [&alice.0, &alice.1] {
        assert_eq!(verdict(&app.client, token, &pool_id).await, "revoked");
    }
    for token in [&frank.0, &frank.1] {
        assert_eq!(verdict(&app.client, token, &email_pool).await, "revoked");
    }
    for token in [&bob.0, &bob.1] {
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
    for token in [&again.0, &again.1] {
        assert_eq!(
            verdict(&app.client, token, &pool_id).await,
            "active",
            "a fresh sign-in"
        );
    }
    for token in [&frank_again.0, &frank_again.1] {
        assert_eq!(
            verdict(&app.client, token, &email_pool).await,
            "active",
            "a fresh sign-in"
        );
    }
}
