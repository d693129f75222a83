//! Entry point: parse flags, start logging, load the AWS chain, serve until
//! SIGTERM/SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use session_service::{
    config::{self, Config},
    startup::{self, Application},
    telemetry,
};

/// glibc's malloc cost a tenth of the service's CPU under load, and its
/// per-thread arenas grew resident memory round after round of 1,000 calls
/// in flight (BENCHMARKS.md has the before and after).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: the command line or environment was wrong.
const EXIT_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        // --help and --version are "errors" that belong on stdout.
        Err(help) if !help.use_stderr() => {
            let _ = help.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{}", config::one_line_error(&error));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Built inside the runtime: the OTLP exporter's channel lives there.
    let tracer_provider =
        match telemetry::otlp_endpoint_from_env().map(|e| telemetry::tracer_provider(&e)) {
            None => None,
            Some(Ok(provider)) => Some(provider),
            Some(Err(error)) => {
                eprintln!("error: OpenTelemetry exporter: {error}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
    let (log_writer, _flush_logs_on_exit) = telemetry::stdout_writer();
    let log_drops = log_writer.error_counter();
    telemetry::init(telemetry::subscriber(
        config.log_format,
        "info",
        log_writer,
        tracer_provider.as_ref(),
    ));

    let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    if config.check_config {
        return match startup::check(&config, &sdk_config) {
            Ok(_) => {
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(error.exit_code())
            }
        };
    }
    let mut app = match Application::build(&config, &sdk_config).await {
        Ok(app) => app,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(error.exit_code());
        }
    };
    app.count_log_drops(log_drops);
    let result = app.run_until_stopped(startup::shutdown_signal()).await;
    // Export the spans still buffered.
    if let Some(provider) = tracer_provider
        && let Err(error) = provider.shutdown()
    {
        eprintln!("warning: flushing traces: {error}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
