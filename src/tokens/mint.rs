//! Tokens signed with keys made on the spot: for the tests' and the
//! benchmark's own JWKS servers, never used on the request path. RSA is
//! aws-lc-rs's; only the JWT's three-part framing is written here.

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::KeySize,
    signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// An RSA key and its `kid`.
#[derive(Debug)]
pub struct MintKey {
    kid: String,
    pair: RsaKeyPair,
}

impl MintKey {
    /// A fresh 2048-bit key.
    pub fn generate(kid: &str) -> Self {
        Self {
            kid: kid.to_owned(),
            pair: RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation works"),
        }
    }

    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let public = self.pair.public_key();
        json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
        })
    }

    /// The modulus and exponent, base64url (what `DecodingKey` takes).
    pub fn components(&self) -> (String, String) {
        let jwk = self.jwk();
        let field = |name: &str| jwk[name].as_str().unwrap_or_default().to_owned();
        (field("n"), field("e"))
    }

    /// An RS256 JWT of `claims`, with this key's `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    /// A JWT with any header, signed RS256 with this key (for tokens that
    /// lie about their algorithm or lack a `kid`).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let message = format!("{}.{}", encode_json(header), encode_json(claims));
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message.as_bytes(),
                &mut signature,
            )
            .expect("RSA signing works");
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// A JWKS document listing `keys`.
pub fn jwks(keys: &[&MintKey]) -> Vec<u8> {
    let keys: Vec<Value> = keys.iter().map(|key| key.jwk()).collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

/// Cognito-shaped access-token claims for `pool` in `region`, valid for an
/// hour from `now` (seconds since the epoch).
pub fn access_claims(region: &str, pool: &str, client_id: &str, now: i64) -> Value {
    json!({
        "iss": format!("https://cognito-idp.{region}.amazonaws.com/{pool}"),
        "sub": "5f1c1d7e-0000-4000-8000-000000000001",
        "client_id": client_id,
        "username": "alice",
        "token_use": "access",
        "scope": "aws.cognito.signin.user.admin",
        "auth_time": now,
        "iat": now,
        "exp": now + 3600,
        "jti": "jti-1",
        "origin_jti": "origin-1",
    })
}

/// Base64url of a JSON value.
pub fn encode_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}
