//! JWKS documents over HTTP(S): hyper's client with rustls on aws-lc-rs and
//! the system's roots, the stack the AWS SDK already builds here.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use super::jwks::{JwksError, JwksSource};
use crate::domain::UserPoolId;

/// Cognito's JWKS holds two keys in about 1 KiB; a much bigger answer is
/// not one, and is not read.
const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Fetches `{base}/{pool}/.well-known/jwks.json`.
#[derive(Debug, Clone)]
pub struct HttpJwksSource {
    /// `--cognito-endpoint`; without it, the pool's regional endpoint.
    endpoint: Option<String>,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

/// The system's root certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the system's root certificates for the JWKS client: {0}")]
pub struct NoRootCertificates(#[from] std::io::Error);

impl HttpJwksSource {
    /// `endpoint`: `--cognito-endpoint` when set, else each pool's
    /// `https://cognito-idp.{region}.amazonaws.com`. `timeout` bounds a
    /// whole fetch, body included.
    pub fn new(endpoint: Option<&str>, timeout: Duration) -> Result<Self, NoRootCertificates> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            endpoint: endpoint.map(|e| e.trim_end_matches('/').to_owned()),
            timeout,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The JWKS URL of `pool`; none for a pool id that names no AWS region.
    pub fn url(&self, pool: &UserPoolId) -> Option<String> {
        let region = pool.aws_region()?;
        Some(match &self.endpoint {
            Some(endpoint) => format!("{endpoint}/{}/.well-known/jwks.json", pool.as_str()),
            None => format!(
                "https://cognito-idp.{region}.amazonaws.com/{}/.well-known/jwks.json",
                pool.as_str()
            ),
        })
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, JwksError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| JwksError::Unreachable(format!("bad URL: {e}")))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| JwksError::Unreachable(crate::error::ErrorChain(&e).to_string()))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(JwksError::Status(response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| JwksError::BadDocument(format!("body: {e}")))?;
        Ok(body.to_bytes().to_vec())
    }
}

#[tonic::async_trait]
impl JwksSource for HttpJwksSource {
    async fn fetch(&self, pool: &UserPoolId) -> Result<Vec<u8>, JwksError> {
        let url = self
            .url(pool)
            .ok_or_else(|| JwksError::Unreachable("the pool id names no AWS region".into()))?;
        tokio::time::timeout(self.timeout, self.get(&url))
            .await
            .map_err(|_| JwksError::Timeout)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jwks_is_fetched_in_the_pools_own_region_unless_an_endpoint_is_set() {
        let pool = UserPoolId::parse("eu-west-1_Pool1").expect("pool");
        let regional = HttpJwksSource::new(None, Duration::from_secs(1)).expect("roots");
        assert_eq!(
            regional.url(&pool).as_deref(),
            Some(
                "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Pool1/.well-known/jwks.json"
            )
        );
        for not_a_region in ["s3_X1", "s3-us-west-2_X1", "US-EAST-1_X1", "us-east_X1"] {
            let pool = UserPoolId::parse(not_a_region).expect("valid shape");
            assert_eq!(regional.url(&pool), None, "{not_a_region}");
        }
        let gov = UserPoolId::parse("us-gov-west-1_X1").expect("pool");
        assert!(regional.url(&gov).is_some());
        let moto = HttpJwksSource::new(Some("http://127.0.0.1:5000/"), Duration::from_secs(1))
            .expect("roots");
        assert_eq!(
            moto.url(&pool).as_deref(),
            Some("http://127.0.0.1:5000/eu-west-1_Pool1/.well-known/jwks.json")
        );
    }
}
