//! The benchmark suite is not a test of speed, but it must not rot: every
//! scenario runs once, briefly, against the debug binaries.

use std::{path::PathBuf, process::Command};

/// The service binary the same `cargo test` built: cargo builds the binaries
/// of every package it tests into one directory, and `cargo test` at the
/// root tests both crates of the workspace (its `default-members`).
fn service_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_bench")).with_file_name("session-service");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo test` at the repository root, which builds both crates",
        bin.display()
    );
    bin
}

#[test]
fn the_benchmark_runs_every_scenario_in_smoke_mode() {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--smoke")
        .arg("--service-bin")
        .arg(service_bin())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for scenario in [
        "P1 latency p50",
        "P1 latency p99",
        "P2 throughput",
        "P3 admitted",
        "P3 busiest",
        "P4 RSS idle",
        "P4 RSS peak",
        "P4 RSS after",
        "P5 start",
        "P5 binary size",
        "P6 VerifyToken latency p50",
        "P6 VerifyToken throughput",
        "P6 JWKS fetches per verification once cached",
        "P7 fleet admitted",
        "P7 fleet busiest",
        "P8 shared budget's added latency p50",
        "P9 VerifyToken latency p50 with 20000 watermarks",
        "P9 VerifyToken throughput with 20000 watermarks",
        "P9 RSS per watermark, loaded",
        "P9 start → log loaded, 20000 entries",
    ] {
        assert!(stdout.contains(scenario), "no {scenario} row in:\n{stdout}");
    }
    // Every call of the closed-loop scenarios succeeded.
    for line in stdout.lines().filter(|l| l.contains(" calls (")) {
        assert!(
            !line.contains("UNAVAILABLE")
                && !line.contains("SDK_ERROR")
                && !line.contains("INACTIVE"),
            "{line}"
        );
    }
}
