//! deploy/monitoring against the tools that will run it: promtool checks the
//! rules and runs their unit tests, and a real Prometheus scrapes the real
//! service through healthy traffic, caller errors and a throttling spell from
//! the fake Cognito, after which every recording rule and every dashboard
//! query must return data and the throttling alert must be pending.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, transport::Channel};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, TestApp, scratch_dir, test_config},
    tools,
};

/// The job name the shipped rules and dashboard select on.
const JOB: &str = "session-service";
/// The user the fake does not know: NOT_FOUND, a caller error.
const GHOST: &str = "ghost@example.com";
/// Stands in for Grafana's `$__rate_interval`: long enough for the
/// one-second scrapes of a short run.
const RATE_INTERVAL: &str = "1m";

fn monitoring_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/monitoring")
        .join(name)
}

fn yaml(name: &str) -> Value {
    let text = std::fs::read_to_string(monitoring_file(name)).expect("readable");
    serde_yaml_ng::from_str(&text).expect("valid YAML")
}

/// Every rule of rules.yaml, across groups.
fn rules() -> Vec<Value> {
    yaml("rules.yaml")["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

fn names_of(rules: &[Value], kind: &str) -> Vec<String> {
    rules
        .iter()
        .filter_map(|r| r[kind].as_str().map(str::to_owned))
        .collect()
}

/// Every `targets[].expr` of the dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring_file("dashboard.json")).expect("readable");
    let dashboard: Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    panels
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().expect("title").to_owned();
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "panel {title} has no query");
            targets
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().expect("expr").to_owned()))
        })
        .collect()
}

/// A dashboard query as Grafana would send it for our job.
fn concrete(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${job}", JOB)
        .replace("$job", JOB);
    assert!(!expr.contains('$'), "an unsubstituted variable in {expr}");
    expr
}

// === promtool ===

fn promtool(args: &[&str]) -> String {
    let output = Command::new(tools::promtool())
        .args(args)
        .current_dir(monitoring_file(""))
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "rules.yaml"]);
    let tested = promtool(&["test", "rules", "rules.test.yaml"]);

    println!("$ promtool check rules rules.yaml\n{checked}");
    println!("$ promtool test rules rules.test.yaml\n{tested}");
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Each alert has a unit test where it fires and one where it stays quiet,
/// annotations that say what and why, and a runbook section.
#[test]
fn every_alert_has_firing_and_quiet_unit_tests_and_a_runbook() {
    let tests = yaml("rules.test.yaml");
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fired.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let runbook = std::fs::read_to_string(monitoring_file("README.md")).expect("README");
    let rules = rules();
    let alerts = names_of(&rules, "alert");
    assert!(alerts.len() >= 10, "{alerts:?}");

    for alert in &alerts {
        assert!(fired.contains(alert), "no unit test fires {alert}");
        assert!(quiet.contains(alert), "no unit test keeps {alert} quiet");
        let rule = rules.iter().find(|r| r["alert"] == *alert).expect("rule");
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|v| !v.is_empty()),
                "{alert}: no {key}"
            );
        }
        let anchor = format!("#{}", alert.to_lowercase());
        assert!(
            rule["annotations"]["runbook_url"]
                .as_str()
                .is_some_and(|url| url.ends_with(&anchor)),
            "{alert}: runbook_url must point at {anchor}"
        );
        assert!(
            runbook.contains(&format!("\n### {alert}\n")),
            "deploy/monitoring/README.md has no runbook section for {alert}"
        );
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "{alert}: severity"
        );
    }
}

// === a real Prometheus ===

/// Prometheus on a free loopback port with its own config and data in a
/// scratch directory; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Scrapes `target` every second and evaluates the shipped rules file,
    /// unchanged, every second.
    fn start(target: SocketAddr) -> Self {
        let dir = scratch_dir("prometheus");
        let rules = monitoring_file("rules.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = rules.display().to_string(),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write config");
        // The port is free now; Prometheus takes it a moment later.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(tools::prometheus())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("prometheus starts");
        Self { child, addr, log }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// GET `path` over HTTP/1.0 (so the body is neither chunked nor kept
    /// alive): status and body.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            stream.read_to_string(&mut response),
        )
        .await
        .ok()?
        .ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }

    /// An instant query's result vector (empty when the query failed).
    async fn query(&self, expr: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let Some((200, body)) = self.get(&path).await else {
            return Vec::new();
        };
        let reply: Value = serde_json::from_str(&body).expect("JSON from Prometheus");
        reply["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn alerts(&self) -> Vec<Value> {
        let Some((200, body)) = self.get("/api/v1/alerts").await else {
            return Vec::new();
        };
        let reply: Value = serde_json::from_str(&body).expect("JSON from Prometheus");
        reply["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls until `ready` holds or `limit` passes; whether it held.
    async fn poll_until<F, Fut>(&self, limit: Duration, mut ready: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if ready().await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls until `ready` holds, failing with `what` and Prometheus' log
    /// after `limit`.
    async fn wait_for<F, Fut>(&self, what: &str, limit: Duration, ready: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let held = self.poll_until(limit, ready).await;
        assert!(
            held,
            "{what} within {limit:?}; Prometheus log:\n{}",
            self.log_tail()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// === load ===

/// Calls the server five times a second per kind until aborted: successes,
/// caller errors (INVALID_ARGUMENT, PERMISSION_DENIED, NOT_FOUND), each kind
/// from ten callers at 0.5/s, and one greedy caller at 5/s, over its
/// per-caller limit. About 12 Cognito calls a second: inside the budget.
/// Counts the codes.
fn spawn_load(
    app: &TestApp,
    codes: Arc<Mutex<BTreeMap<String, u32>>>,
) -> tokio::task::JoinHandle<()> {
    let client = app.client.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        // A late tick must not turn into a burst over the budget.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for round in 0u32.. {
            tick.tick().await;
            let one_of_ten = |kind: &str| format!("{kind}-{}", round % 10);
            let calls = [
                (POOL, format!("user-{round}"), one_of_ten("ok")),
                (POOL, "not a valid name".to_owned(), one_of_ten("bad-input")),
                (
                    "eu-west-1_Other",
                    "carol".to_owned(),
                    one_of_ten("wrong-pool"),
                ),
                (POOL, GHOST.to_owned(), one_of_ten("ghost")),
                (POOL, format!("greedy-{round}"), "greedy".to_owned()),
            ];
            for (pool, username, caller) in calls {
                let client = client.clone();
                let codes = codes.clone();
                tokio::spawn(async move {
                    let code = sign_out_as(client, pool, username, &caller).await;
                    *codes
                        .lock()
                        .expect("not poisoned")
                        .entry(format!("{code:?}"))
                        .or_default() += 1;
                });
            }
        }
    })
}

async fn sign_out_as(
    mut client: SessionServiceClient<Channel>,
    pool: &str,
    username: String,
    caller: &str,
) -> Code {
    let mut request = Request::new(GlobalSignOutRequest {
        user_pool_id: pool.into(),
        username,
    });
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().expect("ascii"));
    match client.global_sign_out(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_finds_data_for_every_rule_and_panel_and_a_throttling_alert() {
    let started = Instant::now();
    let fake = FakeCognito::start(Reply::UnknownUser(GHOST)).await;
    let mut config = test_config(&fake.endpoint());
    config.allowed_user_pool_ids = vec![POOL.parse().expect("valid")];
    // Callers at 0.5/s pass; the greedy one at 5/s mostly does not.
    config.per_caller_rps = Some(2.0);
    config.per_caller_burst = Some(2);
    let app = TestApp::spawn(config).await;
    // A refusal before the first scrape: the error ratio subtracts
    // CALLER_RATE_LIMITED refusals from RESOURCE_EXHAUSTED calls, and the two
    // rates are comparable only if both series are in every scrape.
    let mut greedy = Vec::new();
    for n in 0..3 {
        greedy.push(sign_out_as(app.client.clone(), POOL, format!("warm-up-{n}"), "greedy").await);
    }
    assert_eq!(greedy.last(), Some(&Code::ResourceExhausted), "{greedy:?}");
    let prometheus = &Prometheus::start(app.metrics_addr);
    prometheus
        .wait_for("Prometheus ready", Duration::from_secs(20), || async move {
            matches!(prometheus.get("/-/ready").await, Some((200, _)))
        })
        .await;
    let codes = Arc::new(Mutex::new(BTreeMap::new()));
    let load = spawn_load(&app, codes.clone());

    // Healthy traffic and caller errors until Prometheus has seen both grow
    // and recorded the error ratio: caller errors must not count.
    let caller_errors_seen = r#"
        sum(increase(session_rpc_duration_seconds_count{code=~"INVALID_ARGUMENT|NOT_FOUND|PERMISSION_DENIED"}[1m])) > 0
        and sum(increase(session_rate_limit_rejections_total{reason="CALLER_RATE_LIMITED"}[1m])) > 0
        and sum(increase(session_rpc_duration_seconds_count{code="OK"}[1m])) > 0
        and sum(job:session_signout_availability_errors:ratio_rate5m)"#;
    prometheus
        .wait_for(
            "successes and caller errors seen by Prometheus",
            Duration::from_secs(20),
            || async move { !prometheus.query(caller_errors_seen).await.is_empty() },
        )
        .await;
    let healthy = prometheus
        .query("job:session_signout_availability_errors:ratio_rate5m")
        .await;
    println!("error ratio with only caller errors: {healthy:?}");
    assert_eq!(healthy.len(), 1, "{healthy:?}");
    assert_eq!(healthy[0]["value"][1], "0", "caller errors burn no budget");
    // A throttling spell, until Prometheus has seen throttled attempts grow.
    fake.set_reply(Reply::AwsError {
        status: 400,
        code: "TooManyRequestsException",
    });
    prometheus
        .wait_for("throttling seen by Prometheus", Duration::from_secs(20), || async move {
            !prometheus
                .query(
                    r#"increase(session_cognito_requests_total{outcome="TooManyRequestsException"}[1m]) > 0"#,
                )
                .await
                .is_empty()
        })
        .await;
    fake.set_reply(Reply::UnknownUser(GHOST));

    // Then every recording rule and every panel query has data, and the
    // throttling alert is pending (its `for` is 5m: it cannot fire yet).
    let records = names_of(&rules(), "record");
    let queries: Vec<(String, String)> = records
        .iter()
        .map(|r| (format!("recording rule {r}"), r.clone()))
        .chain(
            dashboard_queries()
                .into_iter()
                .map(|(panel, expr)| (format!("panel {panel:?}"), concrete(&expr))),
        )
        .collect();
    let queries = &queries;
    let results: &Mutex<Vec<(String, String, usize)>> = &Mutex::default();
    let active: &Mutex<Vec<Value>> = &Mutex::default();
    let complete = prometheus
        .poll_until(Duration::from_secs(30), || async move {
            let mut counted = Vec::new();
            for (what, expr) in queries {
                let series = prometheus.query(expr).await.len();
                counted.push((what.clone(), expr.clone(), series));
            }
            let alerts = prometheus.alerts().await;
            let throttling = alerts.iter().any(|a| {
                a["labels"]["alertname"] == "SessionServiceCognitoThrottling"
                    && a["state"] == "pending"
            });
            let all = counted.iter().all(|(_, _, n)| *n > 0);
            *results.lock().expect("not poisoned") = counted;
            *active.lock().expect("not poisoned") = alerts;
            all && throttling
        })
        .await;
    load.abort();

    let results = results.lock().expect("not poisoned").clone();
    let alerts = active.lock().expect("not poisoned").clone();
    for (what, expr, series) in &results {
        println!("{series:>3} series  {what}\n          {expr}");
    }
    for alert in &alerts {
        println!(
            "alert {} {} value={} labels={}",
            alert["labels"]["alertname"], alert["state"], alert["value"], alert["labels"]
        );
    }
    let empty: Vec<_> = results.iter().filter(|(_, _, n)| *n == 0).collect();
    assert!(empty.is_empty(), "no data within 30 s: {empty:#?}");
    assert!(
        complete,
        "SessionServiceCognitoThrottling not pending within 30 s: {alerts:#?}"
    );
    let names: Vec<_> = alerts
        .iter()
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or_default())
        .collect();
    for quiet in [
        "SessionServiceUpstreamAuthFailed",
        "SessionServiceConfigReloadFailed",
        "SessionServiceDown",
    ] {
        assert!(!names.contains(&quiet), "{quiet} is active: {alerts:#?}");
    }
    println!(
        "responses by code: {:?}; Cognito saw {} requests; {:?} in all",
        codes.lock().expect("not poisoned"),
        fake.requests().len(),
        started.elapsed()
    );
}
