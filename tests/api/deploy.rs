//! The rendered Kubernetes manifests keep what operations rely on, so a later
//! edit cannot silently drop a probe, a security setting or the timing that
//! makes rollouts lossless. Renders with `kubectl kustomize` (required).

use std::{path::Path, process::Command, time::Duration};

use clap::{CommandFactory, Parser};
use serde::Deserialize;
use serde_json::Value;
use session_service::config::Config;

const KUSTOMIZATIONS: &[&str] = &[
    "deploy/k8s/base",
    "deploy/k8s/overlays/production",
    "deploy/k8s/overlays/mtls",
];
/// Overlays that include the deploy/monitoring component.
const MONITORED: &[&str] = &["deploy/k8s/overlays/production", "deploy/k8s/overlays/mtls"];
/// The monitoring component's Service, there for the ServiceMonitor alone.
const METRICS_SERVICE: &str = "session-service-metrics";
/// Cognito's UserUpdate quota per account and Region.
const COGNITO_ACCOUNT_RPS: f64 = 25.0;
/// ElastiCache's default port, TLS included.
const REDIS_PORT: u64 = 6379;
/// The Secrets' keys that the manifests use, as the test stands them in (the
/// TLS Secret's files are made per run, from a test CA).
const TEST_SECRETS: &[(&str, &str, &str)] = &[
    ("session-service-log-hash", "key", "deploy-test-key"),
    // The service starts with Redis down (it goes local and connects in
    // the background); --check-config does not connect at all.
    (
        "session-service-redis",
        "url",
        "rediss://redis.deploy-test.invalid:6379",
    ),
    ("session-service-redis", "password", "deploy-test-password"),
];

fn test_secret(secret: &str, key: &str) -> &'static str {
    TEST_SECRETS
        .iter()
        .find(|(s, k, _)| *s == secret && *k == key)
        .map(|(_, _, value)| *value)
        .unwrap_or_else(|| panic!("no stand-in for key {key} of Secret {secret}: add one"))
}

struct Rendered {
    name: &'static str,
    docs: Vec<Value>,
}

impl Rendered {
    fn render(kustomization: &'static str) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(kustomization);
        let output = Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .expect("kubectl is required (scripts/test installs it where the machine lacks it)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("UTF-8 YAML");
        let docs = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("valid YAML document"))
            .collect();
        Self {
            name: kustomization,
            docs,
        }
    }

    fn one(&self, kind: &str) -> &Value {
        let mut found = self.docs.iter().filter(|d| d["kind"] == kind);
        let doc = found
            .next()
            .unwrap_or_else(|| panic!("{}: no {kind}", self.name));
        assert!(found.next().is_none(), "{}: several {kind}s", self.name);
        doc
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.name))
    }

    /// The server's environment ConfigMap.
    fn config(&self) -> &serde_json::Map<String, Value> {
        self.named("ConfigMap", "session-service")["data"]
            .as_object()
            .expect("ConfigMap data")
    }

    fn port_of(&self, env: &str) -> Option<u64> {
        let addr = self.config().get(env)?.as_str().expect("address");
        Some(addr.rsplit(':').next()?.parse().expect("port"))
    }

    fn pod(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]
    }

    fn container(&self) -> &Value {
        &self.pod()["spec"]["containers"][0]
    }

    /// The container's environment as Kubernetes builds it: the ConfigMap,
    /// then `env` entries (which win), Secret references stood in for.
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .config()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_owned()))
            .collect();
        for entry in self.container()["env"].as_array().into_iter().flatten() {
            let name = entry["name"].as_str().expect("env name").to_owned();
            let secret = &entry["valueFrom"]["secretKeyRef"];
            let value = match entry["value"].as_str() {
                Some(value) => value.to_owned(),
                None if secret.is_object() => test_secret(
                    secret["name"].as_str().expect("Secret name"),
                    secret["key"].as_str().expect("Secret key"),
                )
                .to_owned(),
                None => panic!("{}: env {name}: neither a value nor a Secret", self.name),
            };
            env.retain(|(k, _)| *k != name);
            env.push((name, value));
        }
        env
    }

    /// The server's configuration from [`Self::env`], parsed by the server's
    /// own flags (each variable given as the flag that reads it, so the
    /// test's environment is never touched); defaults fill the rest.
    fn server_config(&self) -> Config {
        let command = Config::command();
        let mut args = vec!["session-service".to_owned()];
        for (name, value) in self.env() {
            let Some(arg) = command
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            else {
                continue; // AWS_REGION and the like: not the server's flags.
            };
            let long = arg.get_long().expect("every flag has a long name");
            if arg.get_action().takes_values() {
                args.push(format!("--{long}={value}"));
            } else if matches!(value.as_str(), "true" | "1" | "yes" | "on") {
                args.push(format!("--{long}"));
            }
        }
        Config::try_parse_from(&args).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// A duration flag as the server will see it: the ConfigMap's value, or
    /// the server's own default.
    fn duration(&self, env: &str, default: Duration) -> Duration {
        match self.config().get(env) {
            Some(value) => humantime::parse_duration(value.as_str().expect("string"))
                .unwrap_or_else(|e| panic!("{}: {env}: {e}", self.name)),
            None => default,
        }
    }
}

fn rendered() -> Vec<Rendered> {
    KUSTOMIZATIONS.iter().map(|k| Rendered::render(k)).collect()
}

fn server_defaults() -> Config {
    Config::try_parse_from(["session-service"]).expect("defaults parse")
}

#[test]
fn probes_are_native_grpc_health_checks_on_a_health_port_of_their_own() {
    for r in rendered() {
        let container = r.container();
        let listen = r.port_of("SESSION_LISTEN").expect("SESSION_LISTEN");
        let ports = container["ports"].as_array().expect("ports");
        assert!(
            ports.iter().any(|p| p["containerPort"] == listen),
            "{}: the listen port is declared",
            r.name
        );
        // Never the API port: a flood that fills its connection budget
        // would fail the probes and restart the pods (and kubelet probes
        // cannot speak TLS).
        let probed = r
            .port_of("SESSION_HEALTH_LISTEN")
            .unwrap_or_else(|| panic!("{}: no SESSION_HEALTH_LISTEN", r.name));
        assert_ne!(probed, listen, "{}: probes on the API port", r.name);
        assert!(
            ports.iter().any(|p| p["containerPort"] == probed),
            "{}: the probed port is declared",
            r.name
        );
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                container[probe]["grpc"]["port"], probed,
                "{}: {probe}",
                r.name
            );
        }
        assert_eq!(
            container["readinessProbe"]["grpc"]["service"], "session.v1.SessionService",
            "{}: readiness follows the API's own health",
            r.name
        );
    }
}

#[test]
fn pods_meet_the_restricted_pod_security_standard() {
    for r in rendered() {
        let pod = &r.pod()["spec"];
        let container = &r.container()["securityContext"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", r.name);
        assert!(
            pod["securityContext"]["runAsUser"].as_u64() > Some(0),
            "{}",
            r.name
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(container["allowPrivilegeEscalation"], false, "{}", r.name);
        assert_eq!(container["readOnlyRootFilesystem"], true, "{}", r.name);
        assert_eq!(
            container["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{}",
            r.name
        );
        assert_eq!(pod["automountServiceAccountToken"], false, "{}", r.name);
    }
}

#[test]
fn resources_are_requested_and_memory_is_limited() {
    for r in rendered() {
        let resources = &r.container()["resources"];
        for path in ["/requests/cpu", "/requests/memory", "/limits/memory"] {
            assert!(
                resources.pointer(path).is_some_and(Value::is_string),
                "{}: {path}",
                r.name
            );
        }
    }
}

#[test]
fn prestop_drain_and_grace_fit_in_the_termination_grace_period() {
    let defaults = server_defaults();
    for r in rendered() {
        let pre_stop = r.container()["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .map(Duration::from_secs)
            .expect("preStop sleep");
        let drain = r.duration("SESSION_DRAIN_DELAY", defaults.drain_delay);
        let grace = r.duration("SESSION_SHUTDOWN_GRACE", defaults.shutdown_grace);
        let termination = r.pod()["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .map(Duration::from_secs)
            .expect("terminationGracePeriodSeconds");

        assert!(
            pre_stop > Duration::ZERO && drain > Duration::ZERO,
            "{}",
            r.name
        );
        assert!(
            pre_stop + drain + grace < termination,
            "{}: preStop {pre_stop:?} + drain {drain:?} + grace {grace:?} must end before the kubelet's {termination:?}",
            r.name
        );
    }
}

/// Requests per second of the account's UserUpdate quota left to everyone
/// else (the console, admin scripts, other services): the fleet never plans
/// to use them.
const HEADROOM_RPS: f64 = 4.0;

/// The most pods that can call Cognito at once:
/// - `maxReplicas` from the HPA;
/// - `maxSurge` more during a rollout;
/// - one pod still draining from the rollout: a rollout step waits for the
///   new pod to be available for `minReadySeconds`, which must cover a whole
///   termination (`terminationGracePeriodSeconds`), so the previous old pod
///   is gone before the next is stopped;
/// - one pod still draining from an HPA scale-down (followed at once by a
///   scale-up): the HPA removes at most one pod per period, and the period
///   must cover a whole termination too;
/// - one pod still draining from an eviction or a deletion (a node drain,
///   `kubectl delete pod`): the PDB lets one go at a time, and `kubectl
///   drain` waits for it to terminate before it moves on.
///
/// Not covered: several evictions at once by tools that do not wait, and a
/// new revision pushed mid-rollout.
///
/// In any one second a GCRA admits at most `rps + burst` calls (retries
/// included: each attempt takes a permit).
/// - **Without Redis** each pod has its own budget:
///   `pods × (rps + burst) ≤ 25 − headroom`.
/// - **With Redis** `rps + burst` is the whole fleet's, whatever `pods`.
///   But a pod that cannot reach Redis spends its own fallback budget, and
///   in an outage pods do not all notice at once (nor a partition, nor a
///   slow Redis timing some calls out): the pods still reaching Redis spend
///   the fleet's budget between them while every other pod spends its
///   fallback, and in the second a pod switches, slots it reserved in Redis
///   still fire. So, conservatively, every pod in fallback *and* the fleet's
///   budget spent: `(rps + burst) + pods × (fallback + fallback burst) ≤
///   25 − headroom`, with the fallback as the server derives it (its flag, or
///   the fleet's rate ÷ `--expected-replicas`). The replicas the fleet
///   usually runs (`--expected-replicas`) lie within the HPA's range.
#[test]
fn the_fleet_cannot_exceed_cognitos_quota_in_any_second() {
    let quota = COGNITO_ACCOUNT_RPS - HEADROOM_RPS;
    for r in rendered() {
        let deployment = &r.one("Deployment")["spec"];
        let hpa = &r.one("HorizontalPodAutoscaler")["spec"];
        let termination = r.pod()["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds");
        let min_ready = deployment["minReadySeconds"].as_u64().unwrap_or(0);
        assert!(
            min_ready >= termination,
            "{}: minReadySeconds {min_ready} < terminationGracePeriodSeconds {termination}: \
             several old pods could drain at once during a rollout",
            r.name
        );
        let scale_down = hpa["behavior"]["scaleDown"]["policies"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: the HPA sets scale-down policies", r.name));
        for policy in scale_down {
            assert_eq!(policy["type"], "Pods", "{}: {policy}", r.name);
            assert_eq!(policy["value"], 1, "{}: {policy}", r.name);
            let period = policy["periodSeconds"].as_u64().expect("periodSeconds");
            assert!(
                period >= termination,
                "{}: a scale-down period of {period}s lets several pods drain at once",
                r.name
            );
        }
        let max_unavailable = r.one("PodDisruptionBudget")["spec"]["maxUnavailable"].as_u64();
        assert_eq!(
            max_unavailable,
            Some(1),
            "{}: one eviction at a time",
            r.name
        );
        let min_replicas = hpa["minReplicas"].as_u64().unwrap_or(1);
        let max_replicas = hpa["maxReplicas"].as_u64().expect("maxReplicas");
        let max_surge = deployment["strategy"]["rollingUpdate"]["maxSurge"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: maxSurge as a number of pods", r.name));
        let pods = (max_replicas + max_surge + 3) as f64;

        let config = r.server_config();
        let budget = config.rate_limit_rps + f64::from(config.rate_limit_burst);
        if config.redis.redis_url.is_none() {
            println!(
                "{}: ({max_replicas} + {max_surge} + 3) pods × {budget}/s = {}/s ≤ {quota}",
                r.name,
                pods * budget
            );
            assert!(
                pods * budget <= quota,
                "{}: {pods} pods × (rps + burst) {budget}/s exceeds {quota}/s",
                r.name
            );
            continue;
        }
        let expected = u64::from(config.redis.expected_replicas);
        assert!(
            (min_replicas..=max_replicas).contains(&expected),
            "{}: --expected-replicas {expected} outside the HPA's {min_replicas} to {max_replicas}",
            r.name
        );
        let fallback_rate = config.redis.fallback_rate(config.rate_limit_rps);
        let fallback = fallback_rate + f64::from(config.redis.fallback_rate_limit_burst);
        let worst = budget + pods * fallback;
        println!(
            "{}: fleet {budget}/s + ({max_replicas} + {max_surge} + 3) pods × fallback {fallback}/s \
             = {worst}/s ≤ {quota}",
            r.name
        );
        assert!(
            worst <= quota,
            "{}: the fleet's rps + burst {budget}/s and {pods} pods in fallback at \
             {fallback_rate}/s + burst {} exceed {quota}/s: lower --fallback-rate-limit-rps \
             (or the fleet's rate)",
            r.name,
            config.redis.fallback_rate_limit_burst
        );
    }
}

/// With the fleet's budget in Redis, the URL and the password come from a
/// Secret (the password as a mounted file), never from the ConfigMap, and
/// the NetworkPolicy lets the pods reach Redis.
#[test]
fn overlays_with_redis_take_it_from_a_secret_and_may_reach_it() {
    let mut with_redis = Vec::new();
    for r in rendered() {
        if r.server_config().redis.redis_url.is_none() {
            continue;
        }
        with_redis.push(r.name);
        for env in [
            "SESSION_REDIS_URL",
            "SESSION_REDIS_PASSWORD",
            "SESSION_REDIS_PASSWORD_FILE",
        ] {
            assert!(
                !r.config().contains_key(env),
                "{}: {env} belongs with the Secret, not in the ConfigMap",
                r.name
            );
        }
        let env = r.container()["env"].as_array().expect("env");
        let named = |name: &str| env.iter().find(|e| e["name"] == name);
        assert!(
            named("SESSION_REDIS_URL").is_some_and(|e| e["valueFrom"]["secretKeyRef"].is_object()),
            "{}: SESSION_REDIS_URL from a Secret",
            r.name
        );
        assert!(
            named("SESSION_REDIS_PASSWORD").is_none(),
            "{}: the password as a file, not in the environment",
            r.name
        );
        let password_file = named("SESSION_REDIS_PASSWORD_FILE")
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{}: SESSION_REDIS_PASSWORD_FILE", r.name));
        let mount = r.container()["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|dir| password_file.starts_with(&format!("{dir}/")))
            })
            .unwrap_or_else(|| panic!("{}: {password_file} is not mounted", r.name));
        let volume = r.pod()["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("every mount has a volume");
        assert!(
            volume["secret"]["secretName"].is_string(),
            "{}: {password_file} comes from a Secret",
            r.name
        );
        let egress = r.one("NetworkPolicy")["spec"]["egress"]
            .as_array()
            .expect("egress rules");
        assert!(
            egress.iter().any(|rule| {
                rule["ports"].as_array().is_some_and(|ports| {
                    ports
                        .iter()
                        .any(|p| p["port"] == REDIS_PORT && p["protocol"] == "TCP")
                })
            }),
            "{}: the NetworkPolicy lets the pods reach Redis on TCP {REDIS_PORT}",
            r.name
        );
    }
    assert!(
        with_redis.contains(&"deploy/k8s/overlays/production"),
        "the production overlay shares its budget through Redis; with Redis: {with_redis:?}"
    );
}

/// kustomize's `includeSelectors` writes the app's labels into every
/// selector, the NetworkPolicy's peers included (kube-dns, the callers),
/// which then match nothing: DNS and every caller would be cut off.
#[test]
fn network_policy_peers_select_other_pods_than_ours() {
    for r in rendered() {
        let spec = &r.one("NetworkPolicy")["spec"];
        let rules = |direction: &str, peers: &str| -> Vec<Value> {
            spec[direction]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|rule| rule[peers].as_array().cloned().unwrap_or_default())
                .collect()
        };
        for peer in rules("ingress", "from")
            .iter()
            .chain(&rules("egress", "to"))
        {
            assert_ne!(
                peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "session-service",
                "{}: a peer selects our own pods: {peer}",
                r.name
            );
        }
        assert!(
            rules("egress", "to")
                .iter()
                .any(|peer| peer["podSelector"]["matchLabels"]
                    == serde_json::json!({"k8s-app": "kube-dns"})),
            "{}: DNS is reachable",
            r.name
        );
    }
}

/// A Secret mounted with a mode that hides it from others (0400) is root's:
/// the pod's user reads it only through `fsGroup`, which the kubelet gives
/// the files (and makes them 0440).
#[test]
fn mounted_secrets_are_readable_by_the_pods_user() {
    for r in rendered() {
        let pod = &r.pod()["spec"];
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            let secret = &volume["secret"];
            if !secret.is_object() {
                continue;
            }
            let mode = secret["defaultMode"].as_u64().unwrap_or(0o644);
            assert!(
                mode & 0o004 != 0 || pod["securityContext"]["fsGroup"].is_u64(),
                "{}: Secret volume {} (mode {mode:o}) is unreadable by the pod's user without fsGroup",
                r.name,
                volume["name"]
            );
        }
    }
}

#[test]
fn every_selector_matches_the_pods() {
    for r in rendered() {
        let labels = r.pod()["metadata"]["labels"]
            .as_object()
            .expect("pod labels");
        let matches = |selector: &Value, what: &str| {
            let selector = selector
                .as_object()
                .unwrap_or_else(|| panic!("{}: {what} has no selector", r.name));
            assert!(
                !selector.is_empty(),
                "{}: {what} selects everything",
                r.name
            );
            for (key, value) in selector {
                assert_eq!(
                    labels.get(key),
                    Some(value),
                    "{}: {what} selects {key}",
                    r.name
                );
            }
        };
        matches(
            &r.one("Deployment")["spec"]["selector"]["matchLabels"],
            "Deployment",
        );
        matches(
            &r.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            "PDB",
        );
        matches(
            &r.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
            "NetworkPolicy",
        );
        let services = r.all("Service");
        for service in &services {
            matches(&service["spec"]["selector"], "Service");
        }
        let api = services
            .iter()
            .filter(|s| s["metadata"]["name"] != METRICS_SERVICE)
            .count();
        assert_eq!(api, 2, "{}: ClusterIP and headless", r.name);
        assert!(
            r.all("Service")
                .iter()
                .any(|s| s["spec"]["clusterIP"] == "None"),
            "{}: a headless Service for per-call balancing",
            r.name
        );
    }
}

/// Writes the files the pod would see under its mounts into `root`: the
/// rendered ConfigMaps' data, test certificates for the TLS Secret, the
/// stand-ins of [`TEST_SECRETS`] for the others.
fn materialize_mounts(r: &Rendered, root: &Path) {
    let ca = crate::pki::TestCa::new("deploy test CA");
    let server = ca.server("session-service");
    for mount in r.container()["volumeMounts"].as_array().expect("mounts") {
        let mount_path = mount["mountPath"].as_str().expect("mountPath");
        let volume = r.pod()["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("every mount has a volume");
        let secret = volume["secret"]["secretName"].as_str();
        let files: Vec<(String, String)> = if let Some(name) = volume["configMap"]["name"].as_str()
        {
            let data = r.named("ConfigMap", name)["data"]
                .as_object()
                .expect("data");
            data.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_owned()))
                .collect()
        } else if secret == Some("session-service-tls") {
            vec![
                ("tls.crt".into(), server.cert_pem.clone()),
                ("tls.key".into(), server.key_pem.clone()),
                ("ca.crt".into(), ca.pem()),
            ]
        } else if let Some(secret) = secret {
            match volume["secret"]["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|item| {
                        let key = item["key"].as_str().expect("item key");
                        let path = item["path"].as_str().expect("item path");
                        (path.to_owned(), test_secret(secret, key).to_owned())
                    })
                    .collect(),
                None => TEST_SECRETS
                    .iter()
                    .filter(|(s, ..)| *s == secret)
                    .map(|(_, key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect(),
            }
        } else {
            panic!(
                "{}: volume {} is neither a ConfigMap nor a Secret",
                r.name, volume["name"]
            );
        };
        let dir = root.join(mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).expect("mount dir");
        for (name, contents) in files {
            std::fs::write(dir.join(name), contents).expect("mounted file");
        }
    }
}

#[test]
fn the_server_accepts_every_rendered_configmap_with_its_mounted_files() {
    for r in rendered() {
        let root = crate::helpers::scratch_dir("deploy-mounts");
        materialize_mounts(&r, &root);
        let env = r
            .env()
            .into_iter()
            // Absolute paths are read under the materialized mounts.
            .map(|(k, v)| match v.strip_prefix('/') {
                Some(path) => (k, root.join(path).display().to_string()),
                None => (k, v),
            });
        let output = Command::new(env!("CARGO_BIN_EXE_session-service"))
            .env_clear()
            .envs(env)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .arg("--check-config")
            .output()
            .expect("binary runs");
        assert!(
            output.status.success(),
            "{}: {}",
            r.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_mtls_overlay_mounts_the_certificate_it_requests() {
    let r = Rendered::render("deploy/k8s/overlays/mtls");
    let certificate = &r.one("Certificate")["spec"];
    let tls_volume = r.pod()["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["secret"]["secretName"] == certificate["secretName"])
        .expect("the Certificate's Secret is mounted");
    assert_eq!(certificate["privateKey"]["rotationPolicy"], "Always");
    assert!(certificate["issuerRef"]["name"].is_string());
    let mounted_at = r.container()["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == tls_volume["name"])
        .expect("mounted")["mountPath"]
        .as_str()
        .expect("path")
        .to_owned();
    for env in [
        "SESSION_TLS_CERT",
        "SESSION_TLS_KEY",
        "SESSION_TLS_CLIENT_CA",
    ] {
        let path = r.config()[env].as_str().expect(env);
        assert!(
            path.starts_with(&mounted_at),
            "{env}={path} is not under {mounted_at}"
        );
    }
}

// === monitoring (deploy/monitoring, a kustomize component) ===

fn monitoring_file(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/monitoring")
        .join(name)
}

/// The ServiceMonitor finds the metrics Service, which finds the pods' metrics
/// port, and names the job "session-service" that the rules select on.
#[test]
fn the_service_monitor_scrapes_every_pods_metrics_port_as_the_job_the_rules_expect() {
    for name in MONITORED {
        let r = Rendered::render(name);
        let monitor = &r.one("ServiceMonitor")["spec"];
        let service = r.named("Service", METRICS_SERVICE);
        let labels = service["metadata"]["labels"].as_object().expect("labels");
        for (key, value) in monitor["selector"]["matchLabels"]
            .as_object()
            .expect("matchLabels")
        {
            assert_eq!(labels.get(key), Some(value), "{name}: selects {key}");
        }
        let job_label = monitor["jobLabel"].as_str().expect("jobLabel");
        assert_eq!(labels[job_label], "session-service", "{name}: the job name");
        assert_eq!(
            monitor["namespaceSelector"],
            Value::Null,
            "{name}: same namespace"
        );
        let endpoint = &monitor["endpoints"][0];
        assert_eq!(endpoint["path"], "/metrics");
        let port = service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == endpoint["port"])
            .unwrap_or_else(|| panic!("{name}: the Service has the monitored port"));
        let container_port = r.container()["ports"]
            .as_array()
            .expect("container ports")
            .iter()
            .find(|p| p["name"] == port["targetPort"])
            .unwrap_or_else(|| panic!("{name}: targetPort names a container port"));
        let listen = r
            .port_of("SESSION_METRICS_LISTEN")
            .unwrap_or_else(|| server_defaults().metrics_listen.port().into());
        assert_eq!(container_port["containerPort"], listen, "{name}");
    }
}

/// One source of truth: the PrometheusRule carries rules.yaml unchanged
/// (scripts/gen-prometheusrule writes it).
#[test]
fn the_prometheus_rule_carries_exactly_the_rules_file() {
    let text = std::fs::read_to_string(monitoring_file("rules.yaml")).expect("rules.yaml");
    let rules: Value = serde_yaml_ng::from_str(&text).expect("YAML");
    for name in MONITORED {
        let r = Rendered::render(name);
        assert_eq!(
            r.one("PrometheusRule")["spec"]["groups"],
            rules["groups"],
            "{name}: run scripts/gen-prometheusrule after editing rules.yaml"
        );
    }
}

#[test]
fn the_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar() {
    let text = std::fs::read_to_string(monitoring_file("dashboard.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("JSON");
    for name in MONITORED {
        let r = Rendered::render(name);
        let map = r.named("ConfigMap", "session-service-dashboard");
        assert_eq!(
            map["metadata"]["labels"]["grafana_dashboard"], "1",
            "{name}"
        );
        let data = map["data"]["session-service.json"]
            .as_str()
            .expect("the dashboard file");
        let shipped: Value = serde_json::from_str(data).expect("JSON");
        assert_eq!(shipped, dashboard, "{name}");
    }
}
