//! mTLS, verified caller identity and the authorization policy, end to end:
//! certificates made in the test, the real server on port 0, the generated
//! client over TLS, and a fake Cognito that must see no refused call.

use std::{net::SocketAddr, path::Path, time::Duration};

use session_service::{
    config::Config,
    proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient},
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_types::StatusExt;

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, TestApp, assert_error, scratch_dir, test_config},
    pki::{Leaf, ServerFiles, TestCa},
    tls_probe::TlsProbe,
};

const BILLING: &str = "spiffe://prod.test/ns/billing/sa/api";
const STRANGER: &str = "spiffe://prod.test/ns/games/sa/api";
const OTHER_POOL: &str = "us-east-1_OtherPool1";

/// Billing may act on POOL only.
const POLICY: &str =
    "rules:\n  - caller: spiffe://prod.test/ns/billing/*\n    pools: [us-east-1_TestPool1]\n";

/// A server with mTLS and [`POLICY`], plus what the clients need.
struct MtlsSetup {
    fake: FakeCognito,
    app: TestApp,
    ca: TestCa,
    files: ServerFiles,
}

fn write_policy(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("policy.yaml");
    let aside = dir.join("policy.yaml.new");
    std::fs::write(&aside, text).expect("write policy");
    std::fs::rename(&aside, &path).expect("rename policy");
    path
}

fn secure_config(fake: &FakeCognito, files: &ServerFiles, policy: Option<&Path>) -> Config {
    let mut config = test_config(&fake.endpoint());
    config.security.tls_cert = Some(files.cert.clone());
    config.security.tls_key = Some(files.key.clone());
    config.security.tls_client_ca = Some(files.client_ca.clone());
    config.security.authz_policy = policy.map(Path::to_path_buf);
    config.security.reload_interval = Duration::from_millis(50);
    config
}

/// A fake Cognito, a CA, and server files (certificate from that CA, which
/// is also the client CA) in a scratch directory of `name`.
async fn pki(name: &str) -> (FakeCognito, TestCa, ServerFiles) {
    let fake = FakeCognito::start(Reply::Ok).await;
    let ca = TestCa::new("test CA");
    let files = ServerFiles::write(&scratch_dir(name), &ca.server("server-1"), &ca);
    (fake, ca, files)
}

async fn mtls_setup(name: &str) -> MtlsSetup {
    let (fake, ca, files) = pki(name).await;
    let policy = write_policy(files.cert.parent().expect("dir"), POLICY);
    let app = TestApp::spawn(secure_config(&fake, &files, Some(&policy))).await;
    MtlsSetup {
        fake,
        app,
        ca,
        files,
    }
}

/// A TLS client that trusts `server_ca` and presents `identity`, if any.
fn tls_client(
    addr: SocketAddr,
    server_ca: &TestCa,
    identity: Option<&Leaf>,
) -> SessionServiceClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("client TLS config")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    SessionServiceClient::new(channel)
}

fn request(pool: &str, metadata: &[(&'static str, &str)]) -> Request<GlobalSignOutRequest> {
    let mut request = Request::new(GlobalSignOutRequest {
        user_pool_id: pool.into(),
        username: "alice@example.com".into(),
    });
    for (key, value) in metadata {
        request
            .metadata_mut()
            .insert(*key, value.parse().expect("ascii metadata"));
    }
    request
}

/// One row of the refusal matrix, printed so the closing note can quote it.
fn report(
    case: &str,
    result: &Result<tonic::Response<impl Sized>, tonic::Status>,
    upstream: usize,
) {
    let (code, reason) = match result {
        Ok(_) => ("OK".to_owned(), String::new()),
        Err(status) => (
            format!("{:?}", status.code()),
            status
                .get_details_error_info()
                .map(|info| info.reason)
                .unwrap_or_else(|| format!("(no ErrorInfo: {})", status.message())),
        ),
    };
    println!(
        "refusal matrix: {case:<48} | {code:<16} | {reason:<28} | Cognito calls so far: {upstream}"
    );
}

#[tokio::test]
async fn the_refusal_matrix_under_mtls_and_a_policy() {
    let setup = mtls_setup("mtls-matrix").await;
    let (addr, ca) = (setup.app.addr, &setup.ca);
    let billing = ca.spiffe_client(BILLING);
    let stranger = ca.spiffe_client(STRANGER);
    let foreign_ca = TestCa::new("someone else's CA");
    let forged = foreign_ca.spiffe_client(BILLING);
    let calls = || setup.fake.requests().len();

    // Handshake failures: no certificate, or one from another CA.
    let no_cert = tls_client(addr, ca, None)
        .global_sign_out(request(POOL, &[]))
        .await;
    report("no client certificate", &no_cert, calls());
    let status = no_cert.expect_err("refused");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status:?}"
    );
    let alert = TlsProbe::new(ca, None).refusal(addr).await;
    println!("refusal matrix:   TLS alert without a certificate: {alert}");
    assert!(alert.contains("CertificateRequired"), "{alert}");

    let other_ca = tls_client(addr, ca, Some(&forged))
        .global_sign_out(request(POOL, &[]))
        .await;
    report(
        "certificate from another CA (claims billing)",
        &other_ca,
        calls(),
    );
    let status = other_ca.expect_err("refused");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "{status:?}"
    );
    let alert = TlsProbe::new(ca, Some(&forged)).refusal(addr).await;
    println!("refusal matrix:   TLS alert for another CA's certificate: {alert}");
    assert!(alert.contains("UnknownCA"), "{alert}");
    assert_eq!(calls(), 0, "no upstream call after failed handshakes");

    // Verified, but outside the policy.
    let outside = tls_client(addr, ca, Some(&stranger))
        .global_sign_out(request(POOL, &[]))
        .await;
    report("verified identity outside the policy", &outside, calls());
    assert_error(
        &outside.expect_err("denied"),
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
        false,
    );

    // The header cannot claim what the certificate does not say.
    let claimed = tls_client(addr, ca, Some(&stranger))
        .global_sign_out(request(
            POOL,
            &[("x-caller-id", "spiffe://prod.test/ns/billing/sa/api")],
        ))
        .await;
    report(
        "outside the policy, x-caller-id claims billing",
        &claimed,
        calls(),
    );
    assert_error(
        &claimed.expect_err("denied"),
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
        false,
    );

    // XFCC is not trusted by default.
    let xfcc = format!("By=spiffe://prod.test/ns/session/sa/api;URI={BILLING}");
    let untrusted = tls_client(addr, ca, Some(&stranger))
        .global_sign_out(request(POOL, &[("x-forwarded-client-cert", &xfcc)]))
        .await;
    report(
        "outside the policy, untrusted XFCC names billing",
        &untrusted,
        calls(),
    );
    assert_error(
        &untrusted.expect_err("denied"),
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
        false,
    );

    // An allowed caller on a pool outside its rule.
    let wrong_pool = tls_client(addr, ca, Some(&billing))
        .global_sign_out(request(OTHER_POOL, &[]))
        .await;
    report("billing on a pool outside its rule", &wrong_pool, calls());
    assert_error(
        &wrong_pool.expect_err("denied"),
        Code::PermissionDenied,
        "POOL_NOT_ALLOWED_FOR_CALLER",
        false,
    );
    assert_eq!(calls(), 0, "no refusal reached Cognito");

    // The allowed SPIFFE identity on its own pool.
    let allowed = tls_client(addr, ca, Some(&billing))
        .global_sign_out(request(POOL, &[]))
        .await;
    report("billing on its own pool", &allowed, calls());
    allowed.expect("allowed");
    assert_eq!(calls(), 1);
}

#[tokio::test]
async fn the_verified_identity_is_the_rate_limited_caller_whatever_the_header_says() {
    let (fake, ca, files) = pki("mtls-rate").await;
    let mut config = secure_config(&fake, &files, None);
    config.per_caller_rps = Some(0.01);
    config.per_caller_burst = Some(1);
    let app = TestApp::spawn(config).await;
    let mut client = tls_client(app.addr, &ca, Some(&ca.spiffe_client(BILLING)));

    client
        .global_sign_out(request(POOL, &[("x-caller-id", "first-name")]))
        .await
        .expect("first call within the burst");
    let second = client
        .global_sign_out(request(POOL, &[("x-caller-id", "another-name")]))
        .await
        .expect_err("same certificate, same allowance");

    assert_error(
        &second,
        Code::ResourceExhausted,
        "CALLER_RATE_LIMITED",
        true,
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_trusted_forwarded_client_cert_names_the_caller() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let dir = scratch_dir("xfcc");
    let policy = write_policy(&dir, POLICY);
    // Plaintext behind a sidecar: the sidecar did the mTLS.
    let mut config = test_config(&fake.endpoint());
    config.security.trust_forwarded_client_cert = true;
    config.security.authz_policy = Some(policy);
    let app = TestApp::spawn(config).await;
    let mut client = app.client.clone();
    let by = "By=spiffe://prod.test/ns/session/sa/api;Hash=0f";
    let calls = || fake.requests().len();

    let billing_xfcc = format!("{by};URI={BILLING}");
    let allowed = client
        .global_sign_out(request(POOL, &[("x-forwarded-client-cert", &billing_xfcc)]))
        .await;
    report("trusted XFCC names billing", &allowed, calls());
    allowed.expect("allowed");

    let stranger_xfcc = format!("{by};URI={STRANGER}");
    let outside = client
        .global_sign_out(request(
            POOL,
            &[("x-forwarded-client-cert", &stranger_xfcc)],
        ))
        .await;
    report("trusted XFCC names a stranger", &outside, calls());
    assert_error(
        &outside.expect_err("denied"),
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
        false,
    );

    let missing = client
        .global_sign_out(request(POOL, &[("x-caller-id", BILLING)]))
        .await;
    report("no XFCC, x-caller-id claims billing", &missing, calls());
    assert_error(
        &missing.expect_err("denied"),
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
        false,
    );

    let broken = client
        .global_sign_out(request(
            POOL,
            &[("x-forwarded-client-cert", "URI=\"spiffe://open")],
        ))
        .await;
    report("malformed trusted XFCC", &broken, calls());
    assert_error(
        &broken.expect_err("refused"),
        Code::Unauthenticated,
        "CALLER_IDENTITY_INVALID",
        false,
    );
    assert_eq!(calls(), 1, "only the allowed call reached Cognito");
}

#[tokio::test]
async fn a_rotated_server_certificate_serves_new_connections_while_open_ones_keep_working() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let dir = scratch_dir("rotation");
    let ca = TestCa::new("test CA");
    let first = ca.server("server-1");
    let files = ServerFiles::write(&dir, &first, &ca);
    let app = TestApp::spawn(secure_config(&fake, &files, None)).await;
    let client_leaf = ca.spiffe_client(BILLING);
    let tls = TlsProbe::new(&ca, Some(&client_leaf));
    let mut open = tls_client(app.addr, &ca, Some(&client_leaf));
    open.global_sign_out(request(POOL, &[]))
        .await
        .expect("before rotation");
    assert_eq!(tls.server_leaf(app.addr).await, tls.leaf_der(&first));

    let second = ca.server("server-2");
    files.install(&second);
    // The reloader polls every 50 ms; wait for the event, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tls.server_leaf(app.addr).await != tls.leaf_der(&second) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    open.global_sign_out(request(POOL, &[]))
        .await
        .expect("the connection opened before the rotation still works");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_changed_policy_applies_and_a_broken_one_is_ignored() {
    let setup = mtls_setup("policy-reload").await;
    let dir = setup.files.cert.parent().expect("dir").to_path_buf();
    let billing = setup.ca.spiffe_client(BILLING);
    let stranger = setup.ca.spiffe_client(STRANGER);
    let mut billing_client = tls_client(setup.app.addr, &setup.ca, Some(&billing));
    let mut stranger_client = tls_client(setup.app.addr, &setup.ca, Some(&stranger));
    billing_client
        .global_sign_out(request(POOL, &[]))
        .await
        .expect("allowed at first");

    write_policy(
        &dir,
        "rules:\n  - caller: spiffe://prod.test/ns/games/sa/api\n    pools: [\"*\"]\n",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stranger_client
        .global_sign_out(request(POOL, &[]))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now_denied = billing_client
        .global_sign_out(request(POOL, &[]))
        .await
        .expect_err("billing is no longer in the policy");
    assert_error(
        &now_denied,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
        false,
    );

    write_policy(
        &dir,
        "rules:\n  - caller: spiffe://x\n    pools: [\"*\"]\n    extra: 1\n",
    );
    let failures = r#"session_config_reloads_total{kind="authz_policy",result="error"} 1"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !crate::helpers::metrics_text(setup.app.metrics_addr)
        .await
        .contains(failures)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "broken policy never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stranger_client
        .global_sign_out(request(POOL, &[]))
        .await
        .expect("the previous policy is still in force");
}

#[tokio::test]
async fn kubelet_probes_get_plaintext_health_while_the_api_needs_mtls() {
    let (fake, _, files) = pki("health-listen").await;
    let mut config = secure_config(&fake, &files, None);
    config.security.health_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let app = TestApp::spawn(config).await;
    let health_addr = app.health_addr.expect("health listener bound");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        crate::helpers::channel(health_addr).await,
    );

    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "session.v1.SessionService".into(),
        })
        .await
        .expect("plaintext health check")
        .into_inner()
        .status;

    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let api_in_plaintext = app.sign_out(POOL, "alice@example.com").await;
    assert!(api_in_plaintext.is_err(), "the API port speaks TLS only");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn grpcurl_calls_over_mtls_as_the_readme_shows() {
    let setup = mtls_setup("grpcurl-mtls").await;
    let dir = setup.files.cert.parent().expect("dir").to_path_buf();
    let billing = setup.ca.spiffe_client(BILLING);
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client-key.pem"),
    );
    std::fs::write(&ca, setup.ca.pem()).expect("write");
    std::fs::write(&cert, &billing.cert_pem).expect("write");
    std::fs::write(&key, &billing.key_pem).expect("write");
    let run = |with_cert: bool| {
        let mut command = tokio::process::Command::new(crate::tools::grpcurl());
        command.args(["-cacert", ca.to_str().expect("utf-8")]);
        if with_cert {
            command.args(["-cert", cert.to_str().expect("utf-8")]);
            command.args(["-key", key.to_str().expect("utf-8")]);
        }
        command.args(["-servername", "localhost", "-d"]);
        command.arg(format!(r#"{{"user_pool_id":"{POOL}","username":"alice"}}"#));
        command.args([
            &setup.app.addr.to_string(),
            "session.v1.SessionService/GlobalSignOut",
        ]);
        command.output()
    };

    let (with_cert, without) = tokio::join!(run(true), run(false));
    let (with_cert, without) = (
        with_cert.expect("grpcurl runs"),
        without.expect("grpcurl runs"),
    );

    let stdout = String::from_utf8_lossy(&with_cert.stdout);
    assert!(
        with_cert.status.success() && stdout.contains("awsRequestId"),
        "{stdout}{}",
        String::from_utf8_lossy(&with_cert.stderr)
    );
    assert!(!without.status.success(), "no client certificate, no call");
    assert_eq!(setup.fake.requests().len(), 1);
}
