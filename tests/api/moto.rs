//! End to end against moto, which implements AdminUserGlobalSignOut for real:
//! tokens issued before the sign-out must stop working after it.

use std::{process::Stdio, time::Duration};

use aws_sdk_cognitoidentityprovider::{
    Client,
    types::{
        AttributeType, AuthFlowType, ExplicitAuthFlowsType, MessageActionType,
        UsernameAttributeType,
    },
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::Code;

use crate::{
    helpers::{TestApp, assert_error, test_config, test_sdk_config},
    tools,
};

const PASSWORD: &str = "Correct-Horse-9-Battery!";

/// A moto server on a port of its own choosing, killed on drop.
pub(crate) struct Moto {
    pub(crate) endpoint: String,
    _process: Child,
}

impl Moto {
    pub(crate) async fn start() -> Self {
        let mut process = Command::new(tools::moto_server())
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server starts");
        let stderr = process.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let endpoint = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read moto output") {
                if let Some(at) = line.find("http://127.0.0.1:") {
                    return line[at..].trim().to_owned();
                }
            }
            panic!("moto_server exited before it listened");
        })
        .await
        .expect("moto_server listens within 60 s");
        // Keep draining its log so moto never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            endpoint,
            _process: process,
        }
    }

    pub(crate) fn client(&self) -> Client {
        let config = aws_sdk_cognitoidentityprovider::config::Builder::from(&test_sdk_config())
            .endpoint_url(&self.endpoint)
            .build();
        Client::from_conf(config)
    }
}

pub(crate) struct SignedInUser {
    pub(crate) pool_id: String,
    pub(crate) client_id: String,
    pub(crate) username: String,
    pub(crate) access_token: String,
    pub(crate) id_token: String,
    refresh_token: String,
}

pub(crate) async fn seed_signed_in_user(cognito: &Client) -> SignedInUser {
    let (pool_id, client_id) = create_pool(cognito, "e2e", false).await;
    let username = "demo.user@example.com".to_owned();
    create_user(cognito, &pool_id, &username, None).await;
    let tokens = sign_in(cognito, &pool_id, &client_id, &username).await;
    SignedInUser {
        pool_id,
        client_id,
        username,
        access_token: tokens.access,
        id_token: tokens.id,
        refresh_token: tokens.refresh,
    }
}

/// A pool (email usernames when `by_email`) and an app client that signs
/// in with passwords: (pool id, client id).
pub(crate) async fn create_pool(cognito: &Client, name: &str, by_email: bool) -> (String, String) {
    let mut create = cognito.create_user_pool().pool_name(name);
    if by_email {
        create = create.username_attributes(UsernameAttributeType::Email);
    }
    let pool = create.send().await.expect("pool");
    let pool_id = pool
        .user_pool()
        .and_then(|p| p.id())
        .expect("pool id")
        .to_owned();
    let client = cognito
        .create_user_pool_client()
        .user_pool_id(&pool_id)
        .client_name(name)
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

/// A user with [`PASSWORD`] (and `email`, when given), no welcome message;
/// returns the Username moto gave it (the sub, in an email-username pool).
pub(crate) async fn create_user(
    cognito: &Client,
    pool_id: &str,
    username: &str,
    email: Option<&str>,
) -> String {
    let mut create = cognito
        .admin_create_user()
        .user_pool_id(pool_id)
        .username(username)
        .message_action(MessageActionType::Suppress);
    if let Some(email) = email {
        create = create.user_attributes(
            AttributeType::builder()
                .name("email")
                .value(email)
                .build()
                .expect("attribute"),
        );
    }
    let created = create.send().await.expect("user");
    cognito
        .admin_set_user_password()
        .user_pool_id(pool_id)
        .username(username)
        .password(PASSWORD)
        .permanent(true)
        .send()
        .await
        .expect("password");
    created
        .user()
        .and_then(|u| u.username())
        .expect("username")
        .to_owned()
}

/// The tokens of one password sign-in.
pub(crate) struct Tokens {
    pub(crate) access: String,
    pub(crate) id: String,
    pub(crate) refresh: String,
}

pub(crate) async fn sign_in(
    cognito: &Client,
    pool_id: &str,
    client_id: &str,
    username: &str,
) -> Tokens {
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
    Tokens {
        access: tokens.access_token().expect("access").to_owned(),
        id: tokens.id_token().expect("id").to_owned(),
        refresh: tokens.refresh_token().expect("refresh").to_owned(),
    }
}

async fn refresh(cognito: &Client, user: &SignedInUser) -> Result<(), String> {
    cognito
        .admin_initiate_auth()
        .user_pool_id(&user.pool_id)
        .client_id(&user.client_id)
        .auth_flow(AuthFlowType::RefreshTokenAuth)
        .auth_parameters("REFRESH_TOKEN", &user.refresh_token)
        .send()
        .await
        .map(drop)
        .map_err(|e| format!("{:?}", e.into_service_error()))
}

#[tokio::test]
async fn global_sign_out_revokes_the_users_refresh_and_access_tokens() {
    let moto = Moto::start().await;
    let cognito = moto.client();
    let user = seed_signed_in_user(&cognito).await;
    // Arrange check: the tokens work before the sign-out.
    refresh(&cognito, &user)
        .await
        .expect("refresh works before");
    cognito
        .get_user()
        .access_token(&user.access_token)
        .send()
        .await
        .expect("access works before");
    let app = TestApp::spawn(test_config(&moto.endpoint)).await;

    let response = app
        .sign_out(&user.pool_id, &user.username)
        .await
        .expect("signed out");

    assert!(response.into_inner().signed_out_at.is_some());
    let refreshed = refresh(&cognito, &user).await;
    assert!(
        refreshed
            .as_ref()
            .is_err_and(|e| e.contains("NotAuthorized")),
        "refresh after sign-out: {refreshed:?}"
    );
    let get_user = cognito
        .get_user()
        .access_token(&user.access_token)
        .send()
        .await;
    let error = get_user
        .expect_err("access token rejected")
        .into_service_error();
    assert!(error.is_not_authorized_exception(), "{error:?}");
}

#[tokio::test]
async fn moto_unknown_user_and_unknown_pool_are_not_found() {
    let moto = Moto::start().await;
    let cognito = moto.client();
    let user = seed_signed_in_user(&cognito).await;
    let app = TestApp::spawn(test_config(&moto.endpoint)).await;

    let unknown_user = app
        .sign_out(&user.pool_id, "nobody")
        .await
        .expect_err("unknown user");
    let unknown_pool = app
        .sign_out("us-east-1_00000000000000000000000000000000", &user.username)
        .await
        .expect_err("unknown pool");

    assert_error(&unknown_user, Code::NotFound, "USER_NOT_FOUND", false);
    assert_error(&unknown_pool, Code::NotFound, "USER_POOL_NOT_FOUND", false);
    // The real user's tokens are untouched by the failed calls.
    refresh(&cognito, &user).await.expect("refresh still works");
}
