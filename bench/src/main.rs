//! The benchmark suite: the service against its physical floors, in one run,
//! on loopback. `scripts/bench` builds the release binaries and runs it;
//! `BENCHMARKS.md` explains the scenarios and holds the last full table.

mod children;
mod clients;
mod fleet;
mod load;
mod report;
mod revocations;
mod roles;
mod scenarios;
mod verify;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::scenarios::Plan;

/// Benchmarks session-service (P1 latency, P2 throughput, P3 limiter
/// accuracy, P4 memory, P5 start-up, P6 VerifyToken, P7–P8 the fleet's budget
/// in Redis, P9 VerifyToken with a million revocation watermarks) against its
/// floors: a bare tonic server (the gRPC hop alone) and the AWS SDK calling a
/// fake Cognito directly (the SigV4 + HTTP cost alone).
#[derive(Parser)]
#[command(about, long_about)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,

    /// Run every scenario once, briefly (the test suite does), instead of
    /// the full benchmark.
    #[arg(long)]
    smoke: bool,

    /// The service binary to measure. Default: `session-service` next to
    /// this binary (`cargo build --release --bins` at the workspace root builds both).
    #[arg(long, value_name = "PATH")]
    service_bin: Option<PathBuf>,

    /// Also write the table, with the machine it ran on, to this file.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,

    /// Only these scenarios (comma list of p1..p9). Default: all.
    #[arg(long, value_delimiter = ',', value_name = "P1,...")]
    only: Vec<String>,

    /// P9's live watermarks instead of the plan's (1,000,000; 20,000 in
    /// smoke mode). 0 runs both services against an empty log: the
    /// comparison's own noise.
    #[arg(long, value_name = "N")]
    p9_watermarks: Option<u64>,
}

#[derive(Subcommand)]
enum Role {
    /// (internal) Serve a fake Cognito that answers `{}` after DELAY.
    FakeCognito {
        /// How long each answer waits.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        delay: Duration,
    },
    /// (internal) Serve the gRPC floor: the same API answering at once
    /// (VerifyToken after one RS256 check when given a key).
    FloorGrpc {
        /// The RSA modulus, base64url.
        #[arg(long, requires = "jwk_e")]
        jwk_n: Option<String>,
        /// The RSA exponent, base64url.
        #[arg(long, requires = "jwk_n")]
        jwk_e: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::FakeCognito { delay }) => roles::fake_cognito(delay).await,
        Some(Role::FloorGrpc { jwk_n, jwk_e }) => roles::floor_grpc(jwk_n.zip(jwk_e)).await,
        None => return run(cli).await,
    }
    ExitCode::SUCCESS
}

async fn run(cli: Cli) -> ExitCode {
    let mut plan = if cli.smoke { Plan::SMOKE } else { Plan::FULL };
    if let Some(watermarks) = cli.p9_watermarks {
        plan.p9_watermarks = watermarks;
    }
    let service_bin = cli.service_bin.unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("session-service")
    });
    let wanted =
        |id: &str| cli.only.is_empty() || cli.only.iter().any(|o| o.eq_ignore_ascii_case(id));
    let mut rows = Vec::new();
    if wanted("p1") {
        rows.extend(scenarios::p1_latency(&plan, &service_bin).await);
    }
    if wanted("p2") {
        rows.extend(scenarios::p2_throughput(&plan, &service_bin).await);
    }
    if wanted("p3") {
        rows.extend(scenarios::p3_limiter(&plan, &service_bin).await);
    }
    if wanted("p4") {
        rows.extend(scenarios::p4_memory(&plan, &service_bin).await);
    }
    if wanted("p5") {
        rows.extend(scenarios::p5_startup(&plan, &service_bin).await);
    }
    if wanted("p6") {
        rows.extend(verify::p6_verify_token(&plan, &service_bin).await);
    }
    if wanted("p7") {
        rows.extend(fleet::p7_fleet(&plan, &service_bin).await);
    }
    if wanted("p8") {
        rows.extend(fleet::p8_redis_cost(&plan, &service_bin).await);
    }
    if wanted("p9") {
        rows.extend(revocations::p9_watermarks(&plan, &service_bin).await);
    }
    let table = report::markdown(&rows);
    let machine = report::machine();
    println!("{table}\n{machine}");
    if let Some(path) = cli.markdown {
        let text = format!("Measured on: {machine}\n\n{table}");
        if let Err(error) = std::fs::write(&path, text) {
            eprintln!("cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let missed = rows.iter().filter(|r| r.missed()).count();
    if missed > 0 {
        println!("{missed} goal(s) missed (a benchmark does not fail on speed; see BENCHMARKS.md)");
    }
    ExitCode::SUCCESS
}
