use serde_json::{Value, json};

use super::*;
use crate::{
    domain::ClientId,
    tokens::{
        jwks::{JwksError, JwksSource},
        mint::{self, MintKey},
    },
};

const REGION: &str = "eu-west-1";
const POOL: &str = "eu-west-1_Pool1";
const CLIENT: &str = "client1";

#[derive(Debug)]
struct Serving(Vec<u8>);

#[tonic::async_trait]
impl JwksSource for Serving {
    async fn fetch(&self, _pool: &UserPoolId) -> Result<Vec<u8>, JwksError> {
        Ok(self.0.clone())
    }
}

struct Setup {
    key: MintKey,
    verifier: Verifier,
}

fn setup() -> Setup {
    let key = MintKey::generate("k1");
    let cache = JwksCache::new(
        Arc::new(Serving(mint::jwks(&[&key]))),
        Duration::from_secs(10),
        |_| {},
    );
    let verifier = Verifier::new(Arc::new(cache), Duration::from_secs(5));
    Setup { key, verifier }
}

fn claims() -> Value {
    mint::access_claims(REGION, POOL, CLIENT, now_secs())
}

fn id_claims() -> Value {
    let mut claims = claims();
    let object = claims.as_object_mut().expect("object");
    object.remove("client_id");
    object.remove("username");
    object.insert("aud".into(), json!(CLIENT));
    object.insert("cognito:username".into(), json!("alice"));
    object.insert("token_use".into(), json!("id"));
    claims
}

async fn verify_with(setup: &Setup, token: &str, use_: ExpectedUse, clients: &[&str]) -> Verdict {
    let clients: Vec<ClientId> = clients
        .iter()
        .map(|c| ClientId::parse((*c).to_owned()).expect("client"))
        .collect();
    let expect = Expectations {
        token_use: use_,
        client_ids: &clients,
    };
    let token = BearerToken::parse(token.to_owned()).expect("token");
    let pool = UserPoolId::parse(POOL).expect("pool");
    setup
        .verifier
        .verify(&token, &pool, &expect)
        .await
        .expect("keys available")
}

async fn verify(setup: &Setup, token: &str) -> Verdict {
    verify_with(setup, token, ExpectedUse::Either, &[]).await
}

fn edited(mut claims: Value, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    edit(claims.as_object_mut().expect("object"));
    claims
}

#[tokio::test]
async fn a_well_formed_access_token_is_active_with_its_claims() {
    let setup = setup();
    let token = setup.key.sign(&claims());

    let Verdict::Active(active) = verify_with(&setup, &token, ExpectedUse::Access, &[CLIENT]).await
    else {
        panic!("inactive");
    };

    assert_eq!(active.client_id, CLIENT);
    assert_eq!(active.username, "alice");
    assert_eq!(active.token_use, TokenUse::Access);
    assert_eq!(active.origin_jti, "origin-1");
}

#[tokio::test]
async fn an_id_token_takes_its_client_from_aud_and_its_username_from_cognito_username() {
    let setup = setup();
    let token = setup.key.sign(&id_claims());

    let verdict = verify_with(&setup, &token, ExpectedUse::Id, &[CLIENT]).await;

    assert!(
        matches!(&verdict, Verdict::Active(a) if a.username == "alice" && a.token_use == TokenUse::Id),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn each_check_gives_its_reason() {
    use InactiveReason as R;
    let setup = setup();
    let now = now_secs();
    let other_pool = mint::access_claims(REGION, "eu-west-1_Other1", CLIENT, now);
    let mut cases: Vec<(&str, Value, ExpectedUse, &[&str], R)> = vec![
        (
            "other pool's issuer",
            other_pool,
            ExpectedUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "access where ID required",
            claims(),
            ExpectedUse::Id,
            &[],
            R::WrongTokenUse,
        ),
        (
            "ID where access required",
            id_claims(),
            ExpectedUse::Access,
            &[],
            R::WrongTokenUse,
        ),
        (
            "unknown token_use",
            edited(claims(), |c| {
                c.insert("token_use".into(), json!("refresh"));
            }),
            ExpectedUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "other client",
            claims(),
            ExpectedUse::Either,
            &["someoneelse"],
            R::WrongClient,
        ),
        (
            "other audience",
            id_claims(),
            ExpectedUse::Either,
            &["someoneelse"],
            R::WrongClient,
        ),
        (
            "expired beyond the leeway",
            edited(claims(), |c| {
                c.insert("exp".into(), json!(now - 6));
            }),
            ExpectedUse::Either,
            &[],
            R::Expired,
        ),
        (
            "no exp",
            edited(claims(), |c| {
                c.remove("exp");
            }),
            ExpectedUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "no auth_time",
            edited(claims(), |c| {
                c.remove("auth_time");
            }),
            ExpectedUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "no iat",
            edited(claims(), |c| {
                c.remove("iat");
            }),
            ExpectedUse::Either,
            &[],
            R::Invalid,
        ),
        (
            "no sub",
            edited(claims(), |c| {
                c.remove("sub");
            }),
            ExpectedUse::Either,
            &[],
            R::Invalid,
        ),
    ];
    let issuer = format!("https://cognito-idp.{REGION}.amazonaws.com/{POOL}");
    for (name, iss) in [
        ("issuer with a trailing slash", format!("{issuer}/")),
        ("issuer with more after it", format!("{issuer}x")),
        ("issuer over http", issuer.replacen("https", "http", 1)),
        (
            "the pool's id under another region",
            format!("https://cognito-idp.us-east-1.amazonaws.com/{POOL}"),
        ),
    ] {
        let forged = edited(claims(), |c| {
            c.insert("iss".into(), json!(iss));
        });
        cases.push((name, forged, ExpectedUse::Either, &[], R::Invalid));
    }
    let exp_not_a_number = edited(claims(), |c| {
        c.insert("exp".into(), json!("tomorrow"));
    });
    cases.push((
        "exp not a number",
        exp_not_a_number,
        ExpectedUse::Either,
        &[],
        R::Invalid,
    ));
    for (name, claims, use_, clients, expected) in cases {
        let token = setup.key.sign(&claims);
        assert_eq!(
            verify_with(&setup, &token, use_, clients).await,
            Verdict::Inactive(expected),
            "{name}"
        );
    }
}

#[tokio::test]
async fn within_the_leeway_a_just_expired_token_is_still_active() {
    let setup = setup();
    let token = setup.key.sign(&edited(claims(), |c| {
        c.insert("exp".into(), json!(now_secs() - 2));
    }));

    assert!(matches!(verify(&setup, &token).await, Verdict::Active(_)));
}

#[tokio::test]
async fn forged_and_malformed_tokens_are_invalid() {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let setup = setup();
    let good = setup.key.sign(&claims());
    let parts: Vec<&str> = good.split('.').collect();
    let tampered_claims = edited(claims(), |c| {
        c.insert("username".into(), json!("mallory"));
    });
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        mint::encode_json(&tampered_claims),
        parts[2]
    );
    let alg_none = format!(
        "{}.{}.",
        mint::encode_json(&json!({"alg": "none", "kid": "k1"})),
        parts[1]
    );
    // HS256 keyed with the public key: the classic confusion attack.
    let (n, _) = setup.key.components();
    let hs_header = mint::encode_json(&json!({"alg": "HS256", "kid": "k1"}));
    let hs_message = format!("{hs_header}.{}", parts[1]);
    let hs_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, n.as_bytes());
    let hs_tag = aws_lc_rs::hmac::sign(&hs_key, hs_message.as_bytes());
    let hs256 = format!("{hs_message}.{}", URL_SAFE_NO_PAD.encode(hs_tag.as_ref()));
    let no_kid = setup
        .key
        .sign_with_header(&json!({"alg": "RS256", "typ": "JWT"}), &claims());
    let other_key = MintKey::generate("k1").sign(&claims());

    for (name, token) in [
        ("tampered payload", tampered),
        ("alg none", alg_none),
        ("HS256 with the public key", hs256),
        ("no kid", no_kid),
        ("signed by another key with the same kid", other_key),
        ("two parts", format!("{}.{}", parts[0], parts[1])),
        ("four parts", format!("{good}.x")),
        ("not base64", "!!!.!!!.!!!".to_owned()),
        ("not a JWT", "hello".to_owned()),
    ] {
        assert_eq!(
            verify(&setup, &token).await,
            Verdict::Inactive(InactiveReason::Invalid),
            "{name}"
        );
    }
    assert!(matches!(verify(&setup, &good).await, Verdict::Active(_)));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn any_text_is_a_verdict_never_a_panic(text in "[A-Za-z0-9._-]{1,200}") {
        static SETUP: std::sync::LazyLock<Setup> = std::sync::LazyLock::new(setup);
        let setup = &*SETUP;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let verdict = runtime.block_on(verify(setup, &text));
        proptest::prop_assert_eq!(verdict, Verdict::Inactive(InactiveReason::Invalid));
    }
}
