//! VerifyToken against moto 5.2.5's real tokens and JWKS (RS256, kid
//! "dummy", one key for every pool, issuer in the AWS form).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use session_service::proto::{InactiveReason, TokenUse};
use tonic::Code;

use crate::{
    helpers::{TestApp, metrics_text, test_config},
    moto::{Moto, seed_signed_in_user},
    verify_token::verify_as as verify,
};

fn part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64")).expect("json")
}

fn encode(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn fetches(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("session_jwks_fetches_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_real_sign_ins_access_and_id_tokens_verify_and_forgeries_do_not() {
    let moto = Moto::start().await;
    let cognito = moto.client();
    let user = seed_signed_in_user(&cognito).await;
    let other_pool = cognito
        .create_user_pool()
        .pool_name("other")
        .send()
        .await
        .expect("second pool");
    let other_pool = other_pool
        .user_pool()
        .and_then(|p| p.id())
        .expect("id")
        .to_owned();
    let app = TestApp::spawn(test_config(&moto.endpoint)).await;
    let (pool, client) = (user.pool_id.as_str(), user.client_id.as_str());

    // Active: both tokens, with the right use and client.
    let access = verify(&app, &user.access_token, pool, TokenUse::Access, &[client])
        .await
        .expect("access verdict");
    let id = verify(&app, &user.id_token, pool, TokenUse::Id, &[client])
        .await
        .expect("id verdict");
    assert!(access.active, "{access:?}");
    assert_eq!(access.username, user.username);
    assert_eq!(access.client_id, client);
    assert!(id.active, "{id:?}");
    assert_eq!(id.username, user.username);
    assert_eq!(id.sub, access.sub);
    assert!(id.exp > id.iat && id.auth_time > 0);

    // Forgeries built from the real token and moto's own public key.
    let header = part(&user.access_token, 0);
    let mut claims = part(&user.access_token, 1);
    let signature = user.access_token.split('.').nth(2).expect("signature");
    claims["username"] = json!("mallory");
    let tampered = format!("{}.{}.{signature}", encode(&header), encode(&claims));
    let payload = user.access_token.split('.').nth(1).expect("payload");
    let alg_none = format!(
        "{}.{payload}.",
        encode(&json!({"alg": "none", "kid": "dummy"}))
    );
    let jwks: Value = fetch_jwks(&moto.endpoint, pool).await;
    let n = jwks["keys"][0]["n"].as_str().expect("n").to_owned();
    let hs_message = format!(
        "{}.{payload}",
        encode(&json!({"alg": "HS256", "kid": "dummy"}))
    );
    let hs_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, n.as_bytes());
    let hs256 = format!(
        "{hs_message}.{}",
        URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&hs_key, hs_message.as_bytes()))
    );
    let no_kid = format!("{}.{payload}.{signature}", encode(&json!({"alg": "RS256"})));

    use InactiveReason as R;
    // (name, token, pool, expected use, accepted clients, reason)
    type Case<'a> = (&'a str, &'a str, &'a str, TokenUse, &'a [&'a str], R);
    let cases: Vec<Case> = vec![
        (
            "another pool's token (same key, other iss)",
            &user.access_token,
            &other_pool,
            TokenUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "ID token where access is required",
            &user.id_token,
            pool,
            TokenUse::Access,
            &[],
            R::WrongTokenUse,
        ),
        (
            "access token where ID is required",
            &user.access_token,
            pool,
            TokenUse::Id,
            &[],
            R::WrongTokenUse,
        ),
        (
            "another client",
            &user.access_token,
            pool,
            TokenUse::Either,
            &["someotherclient"],
            R::WrongClient,
        ),
        (
            "tampered payload",
            &tampered,
            pool,
            TokenUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "alg none",
            &alg_none,
            pool,
            TokenUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "HS256 keyed with the public key",
            &hs256,
            pool,
            TokenUse::Either,
            &[],
            R::Invalid,
        ),
        ("no kid", &no_kid, pool, TokenUse::Either, &[], R::Invalid),
    ];
    for (name, token, pool, token_use, clients, reason) in cases {
        let response = verify(&app, token, pool, token_use, clients)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert!(!response.active, "{name}");
        assert_eq!(response.inactive_reason, i32::from(reason), "{name}");
        assert!(
            response.sub.is_empty() && response.username.is_empty(),
            "{name}"
        );
    }
    let huge = verify(&app, &"a".repeat(100 * 1024), pool, TokenUse::Either, &[])
        .await
        .expect_err("100 KiB token");
    assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");

    // Two pools, each fetched once: no storm from any of the above.
    let metrics = metrics_text(app.metrics_addr).await;
    assert_eq!(fetches(&metrics), 2, "{metrics}");
    assert!(
        !metrics.contains(&user.username) && !metrics.contains(&access.sub),
        "no claim in the metrics"
    );
}

/// moto's JWKS, as any client would fetch it.
async fn fetch_jwks(endpoint: &str, pool: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = endpoint.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    let request = format!(
        "GET /{pool}/.well-known/jwks.json HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let body = response.split("\r\n\r\n").nth(1).expect("body");
    serde_json::from_str(body).expect("JWKS")
}
