//! The real binary: exit codes and signals. Each child gets an explicit,
//! minimal environment; the test process's own environment is never changed.

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::helpers::{binary, sigterm, wait_for_exit};

/// The binary with the minimal test environment of [`binary`].
fn service() -> Command {
    binary()
}

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().expect("binary runs")
}

#[test]
fn a_bad_flag_is_a_one_line_error_and_exit_code_64() {
    let output = run(service().args(["--upstream-timeout", "soon"]));

    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--upstream-timeout"), "{stderr}");
}

#[test]
fn a_bad_environment_variable_is_exit_code_64() {
    let output = run(service().env("SESSION_ALLOWED_USER_POOL_IDS", "eu-west-1_A,not a pool"));

    assert_eq!(output.status.code(), Some(64));
}

#[test]
fn a_bad_redis_url_is_exit_code_64_and_its_password_is_never_printed() {
    let url = "redis://:Sup3rSecret@cache:notaport";
    let flag =
        run(service()
            .env("AWS_REGION", "eu-west-1")
            .args(["--check-config", "--redis-url", url]));
    let env = run(service()
        .env("AWS_REGION", "eu-west-1")
        .env("SESSION_REDIS_URL", url)
        .arg("--check-config"));

    for output in [flag, env] {
        assert_eq!(output.status.code(), Some(64));
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(printed.contains("--redis-url"), "{printed}");
        assert!(!printed.contains("Sup3rSecret"), "{printed}");
    }
}

#[test]
fn a_missing_region_is_exit_code_64() {
    let output = run(service().args(["--listen", "127.0.0.1:0"]));

    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("AWS_REGION"));
}

#[test]
fn a_default_pool_outside_the_allow_list_is_exit_code_64() {
    let output = run(service().env("AWS_REGION", "us-east-1").args([
        "--listen",
        "127.0.0.1:0",
        "--default-user-pool-id",
        "eu-west-1_B",
        "--allowed-user-pool-ids",
        "eu-west-1_A",
    ]));

    assert_eq!(output.status.code(), Some(64));
}

#[test]
fn check_config_validates_without_serving() {
    let valid = run(service()
        .env("AWS_REGION", "eu-west-1")
        .arg("--check-config"));
    let invalid = run(service().arg("--check-config"));

    assert_eq!(valid.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&valid.stdout).contains("configuration OK"));
    assert_eq!(invalid.status.code(), Some(64), "no region");
}

#[test]
fn a_missing_or_empty_hash_key_file_is_exit_code_64() {
    let empty =
        std::env::temp_dir().join(format!("session-service-empty-key-{}", std::process::id()));
    std::fs::write(&empty, "\n").expect("write temp file");
    let region = || {
        let mut command = service();
        command.env("AWS_REGION", "eu-west-1").arg("--check-config");
        command
    };

    let missing = run(region().args(["--log-user-hash-key-file", "/nonexistent/key"]));
    let blank = run(region().arg("--log-user-hash-key-file").arg(&empty));
    let both = run(region().args(["--log-user-hash-key", "k", "--log-user-hash-key-file", "/x"]));
    let _ = std::fs::remove_file(&empty);

    for output in [&missing, &blank, &both] {
        assert_eq!(
            output.status.code(),
            Some(64),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(String::from_utf8_lossy(&blank.stderr).contains("empty"));
}

#[test]
fn help_documents_an_environment_variable_for_every_flag() {
    let output = run(service().arg("--help"));

    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let flags = help
        .lines()
        .filter(|l| l.trim_start().starts_with("--"))
        .count();
    let envs = help.matches("[env: SESSION_").count();
    assert!(flags >= 10, "{help}");
    // `-h, --help` and `-V, --version` are not counted (their lines start
    // with `-h`/`-V`); --check-config is a command, not configuration.
    assert_eq!(envs, flags - 1, "{help}");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut child = service()
        .env("AWS_REGION", "us-east-1")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--drain-delay",
            "0s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts");
    // Wait for the "serving" log line rather than for time to pass.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    while !line.contains("serving session.v1.SessionService") {
        line.clear();
        let read = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read log");
        assert!(read > 0, "exited before serving");
    }

    sigterm(&child);
    let status = wait_for_exit(&mut child, Duration::from_secs(30));

    assert_eq!(status.code(), Some(0));
}

#[test]
fn unusable_security_files_are_exit_code_64_naming_the_problem() {
    let dir = crate::helpers::scratch_dir("cli-security");
    let ca = crate::pki::TestCa::new("cli CA");
    let files = crate::pki::ServerFiles::write(&dir, &ca.server("cli"), &ca);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let valid = write(
        "ok.toml",
        "[[rules]]\ncaller = \"spiffe://a/*\"\npools = [\"*\"]\n",
    );
    let unknown_key = write(
        "unknown.yaml",
        "rules:\n  - caller: a\n    pools: [\"*\"]\n    color: red\n",
    );
    let bad_pattern = write(
        "pattern.yaml",
        "rules:\n  - caller: a*b\n    pools: [\"*\"]\n",
    );
    let bad_pool = write(
        "pool.toml",
        "[[rules]]\ncaller = \"a\"\npools = [\"nope\"]\n",
    );
    let (cert, key, client_ca) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
        files.client_ca.display().to_string(),
    );
    let mtls = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca,
    ];
    let check = |args: &[&str]| {
        run(service()
            .env("AWS_REGION", "eu-west-1")
            .arg("--check-config")
            .args(args))
    };

    let ok = check(&[&mtls[..], &["--authz-policy", &valid]].concat());
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    for (args, expected) in [
        (
            vec!["--authz-policy", unknown_key.as_str()],
            "unknown field `color`",
        ),
        (
            vec!["--authz-policy", bad_pattern.as_str()],
            "only allowed at the end",
        ),
        (vec!["--authz-policy", bad_pool.as_str()], "pools"),
        (
            vec!["--authz-policy", "/nonexistent/policy.yaml"],
            "/nonexistent/policy.yaml",
        ),
        (
            vec!["--tls-cert", key.as_str(), "--tls-key", key.as_str()],
            "certificate",
        ),
        (
            vec!["--tls-cert", cert.as_str(), "--tls-key", cert.as_str()],
            "private key",
        ),
        (vec!["--tls-cert", cert.as_str()], "--tls-key"),
    ] {
        let args = if args[0] == "--authz-policy" {
            [&mtls[..], &args[..]].concat()
        } else {
            args
        };
        let output = check(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    // A policy with no way to verify callers would refuse everything.
    let unverifiable = check(&["--authz-policy", &valid]);
    assert_eq!(unverifiable.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&unverifiable.stderr).contains("--tls-client-ca"));
}

#[test]
fn a_connection_budget_the_open_files_limit_cannot_hold_is_exit_code_64() {
    let under_256_fds = |args: &[&str]| {
        let template = service();
        let mut command = Command::new(crate::tools::prlimit());
        command
            .env_clear()
            .envs(template.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .env("AWS_REGION", "us-east-1")
            .args([
                "--nofile=256",
                "--",
                template.get_program().to_str().expect("utf-8"),
            ])
            .arg("--check-config")
            .args(args);
        run(&mut command)
    };

    let derived = under_256_fds(&[]);
    let too_many = under_256_fds(&["--max-connections", "1000"]);

    assert_eq!(
        derived.status.code(),
        Some(0),
        "the budget fits what is left"
    );
    assert_eq!(too_many.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&too_many.stderr);
    assert!(
        stderr.contains("open-files limit (256)") && stderr.contains("--max-connections"),
        "{stderr}"
    );
}
