//! P6: VerifyToken against its floor, a bare tonic hop plus one RS256
//! verification in-process (the `floor-grpc` role given the key), and the
//! JWKS fetches it causes once warm (the goal: none).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use session_service::{
    proto::{TokenUse, VerifyTokenRequest, VerifyTokenResponse},
    telemetry::code_name,
    tokens::mint::{self, MintKey},
};
use tokio::net::TcpListener;

use crate::{
    children::{spawn_role, spawn_service},
    clients::POOL,
    load::{Call, Stop, closed_loop},
    report::Row,
    scenarios::{Plan, alternate, micros},
};

/// The floor's verification: one RS256 signature check by jsonwebtoken, as
/// the service does, with no claim checks, cache or policy around it.
pub(crate) fn floor_verify(key: &DecodingKey, token: &str) -> VerifyTokenResponse {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let active = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).is_ok();
    VerifyTokenResponse {
        active,
        ..VerifyTokenResponse::default()
    }
}

/// Serves one JWKS document for every pool and counts the fetches.
pub(crate) async fn jwks_server(document: Vec<u8>) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fetches = Arc::new(AtomicU64::new(0));
    let counted = fetches.clone();
    let document = Bytes::from(document);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (fetches, document) = (counted.clone(), document.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let body = Full::new(document.clone());
                    async move { Ok::<_, Infallible>(Response::new(body)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, fetches)
}

/// Calls VerifyToken with `token`; "OK" only for an active verdict.
pub(crate) async fn verify_call(addr: SocketAddr, token: String) -> Call {
    let clients = crate::clients::connect_clients(addr).await;
    Arc::new(move |n| {
        let mut client = clients[n as usize % clients.len()].clone();
        let request = VerifyTokenRequest {
            token: token.clone(),
            user_pool_id: POOL.into(),
            token_use: TokenUse::Access.into(),
            client_ids: vec![],
        };
        Box::pin(async move {
            match client.verify_token(request).await {
                Ok(response) if response.get_ref().active => "OK",
                Ok(_) => "INACTIVE",
                Err(status) => code_name(status.code()),
            }
        })
    })
}

pub(crate) async fn p6_verify_token(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let key = MintKey::generate("bench-key");
    let (n, e) = key.components();
    let (jwks_addr, fetches) = jwks_server(mint::jwks(&[&key])).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let token = key.sign(&mint::access_claims("us-east-1", POOL, "benchclient", now));
    let floor = spawn_role(&["floor-grpc", "--jwk-n", &n, "--jwk-e", &e]);
    let service = spawn_service(service_bin, jwks_addr, &[]);
    let targets = [
        verify_call(service.addr, token.clone()).await,
        verify_call(floor.addr, token).await,
    ];
    for target in &targets {
        closed_loop(target, 1, Stop::Calls(plan.p1_calls.min(200))).await;
    }
    let warm_fetches = fetches.load(Ordering::SeqCst);
    let (latency, _) = alternate(
        &targets,
        plan.p1_rounds,
        1,
        Stop::Calls(plan.p1_calls),
        service.pid(),
    )
    .await;
    let (throughput, _) = alternate(
        &targets,
        plan.p2_rounds,
        64,
        Stop::After(plan.p2_duration),
        service.pid(),
    )
    .await;
    let measured_fetches = fetches.load(Ordering::SeqCst) - warm_fetches;
    let [service_1, floor_1] = &latency[..] else {
        unreachable!("two targets")
    };
    let [service_64, floor_64] = &throughput[..] else {
        unreachable!("two targets")
    };
    let all_ok =
        service_1.ok_count() == service_1.total() && service_64.ok_count() == service_64.total();
    let mut rows = Vec::new();
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let s = service_1.ok.value_at_quantile(q);
        let f = floor_1.ok.value_at_quantile(q);
        let ratio = s as f64 / f as f64;
        rows.push(Row::ratio(
            &format!("P6 VerifyToken latency {name}, concurrency 1"),
            micros(s),
            format!("{} (tonic hop + RS256)", micros(f)),
            ratio,
            "≤ 1.2",
            ratio <= 1.2 && all_ok,
        ));
    }
    let ratio = service_64.ok_per_sec() / floor_64.ok_per_sec();
    rows.push(Row::ratio(
        "P6 VerifyToken throughput, concurrency 64",
        format!("{:.0} req/s", service_64.ok_per_sec()),
        format!("{:.0} req/s (tonic hop + RS256)", floor_64.ok_per_sec()),
        ratio,
        "≥ 0.8, all active",
        ratio >= 0.8 && all_ok,
    ));
    let verifications = service_1.total() + service_64.total();
    rows.push(Row::ratio(
        "P6 JWKS fetches per verification once cached",
        format!("{measured_fetches} in {verifications}"),
        format!("{warm_fetches} to warm up"),
        measured_fetches as f64 / verifications.max(1) as f64,
        "0",
        measured_fetches == 0,
    ));
    rows.push(Row::note(
        "P6 calls (service / floor, c=1 then c=64)",
        format!(
            "{} / {}; {} / {}",
            service_1.codes_text(),
            floor_1.codes_text(),
            service_64.codes_text(),
            floor_64.codes_text()
        ),
    ));
    rows
}
