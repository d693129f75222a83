//! The rendered Kubernetes manifests keep what operations rely on, so a later
//! edit cannot silently drop a probe, a security setting or the timing that
//! makes rollouts lossless. Renders with `kubectl kustomize` (required).

use std::{path::Path, process::Command, time::Duration};

use clap::Parser;
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
fn probes_are_native_grpc_health_checks_on_the_serving_port() {
    for r in rendered() {
        let container = r.container();
        let listen = r.port_of("SESSION_LISTEN").expect("SESSION_LISTEN");
        let ports = container["ports"].as_array().expect("ports");
        assert!(
            ports.iter().any(|p| p["containerPort"] == listen),
            "{}: the listen port is declared",
            r.name
        );
        // With TLS on the API port, probes use the plaintext health port.
        let probed = r.port_of("SESSION_HEALTH_LISTEN").unwrap_or(listen);
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

/// Until the budget is shared (Redis), each pod has its own, and in any one
/// second a pod's GCRA admits at most `rps + burst` calls (retries
/// included: each attempt takes a permit). The most pods that can call
/// Cognito at once:
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
/// So `(maxReplicas + maxSurge + 3) × (rps + burst) ≤ 25 − headroom`. Not
/// covered: several evictions at once by tools that do not wait, and a new
/// revision pushed mid-rollout; the shared budget (Redis) ends the guesswork.
#[test]
fn the_fleet_cannot_exceed_cognitos_quota_in_any_second() {
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
        let max_replicas = hpa["maxReplicas"].as_f64().expect("maxReplicas");
        let max_surge = deployment["strategy"]["rollingUpdate"]["maxSurge"]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: maxSurge as a number of pods", r.name));
        let flag = |name: &str| {
            r.config()[name]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{}: the ConfigMap sets {name}", r.name))
        };
        let per_pod = flag("SESSION_RATE_LIMIT_RPS") + flag("SESSION_RATE_LIMIT_BURST");
        let pods = max_replicas + max_surge + 3.0;
        let max_unavailable = r.one("PodDisruptionBudget")["spec"]["maxUnavailable"].as_u64();
        assert_eq!(
            max_unavailable,
            Some(1),
            "{}: one eviction at a time",
            r.name
        );

        println!(
            "{}: ({max_replicas} + {max_surge} + 3) pods × {per_pod}/s = {}/s ≤ {COGNITO_ACCOUNT_RPS} − {HEADROOM_RPS}",
            r.name,
            pods * per_pod
        );
        assert!(
            pods * per_pod <= COGNITO_ACCOUNT_RPS - HEADROOM_RPS,
            "{}: {pods} pods × (rps + burst) {per_pod}/s exceeds {}/s",
            r.name,
            COGNITO_ACCOUNT_RPS - HEADROOM_RPS
        );
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
/// rendered ConfigMaps' data, test certificates for the TLS Secret, a test
/// key for the log-hash Secret.
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
        let files: Vec<(String, String)> = if let Some(name) = volume["configMap"]["name"].as_str()
        {
            let data = r.named("ConfigMap", name)["data"]
                .as_object()
                .expect("data");
            data.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_owned()))
                .collect()
        } else if volume["secret"]["secretName"] == "session-service-tls" {
            vec![
                ("tls.crt".into(), server.cert_pem.clone()),
                ("tls.key".into(), server.key_pem.clone()),
                ("ca.crt".into(), ca.pem()),
            ]
        } else {
            vec![("key".into(), "deploy-test-key".into())]
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
        let explicit_env = r.container()["env"].as_array().cloned().unwrap_or_default();
        let env = r
            .config()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_owned()))
            .chain(explicit_env.iter().filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_owned(),
                    e["value"].as_str()?.to_owned(),
                ))
            }))
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
