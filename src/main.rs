//! The `hit-counter` binary: `hit-counter` serves, `hit-counter healthcheck` checks `/livez`.
//!
//! Exit codes: 0 after a clean shutdown or a passing health check, 1 on a runtime failure or a
//! failing health check, 2 on bad configuration or usage.

use std::process::ExitCode;

// musl's own allocator halves the throughput of the static build, and glibc's keeps more
// memory after a burst (docs/performance.md). mimalloc is built without transparent huge
// pages: with them, the idle process held 8 MB instead of under 3.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use hit_counter::{App, Config, healthcheck, shutdown_signal, telemetry};

const USAGE: &str = "usage: hit-counter [healthcheck | --help | --version]

  hit-counter              serve http://0.0.0.0:$PORT/ (configuration: environment, see README)
  hit-counter healthcheck  exit 0 if the service on 127.0.0.1:$PORT answers GET /livez with 200";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => match Config::from_env() {
            Ok(config) => serve(config),
            Err(e) => configuration_error(e),
        },
        ["healthcheck"] => match Config::port_from_env().map(healthcheck::check) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("hit-counter: unhealthy: {e}");
                ExitCode::from(1)
            }
            Err(e) => configuration_error(e),
        },
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["--version" | "-V"] => {
            println!("hit-counter {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn configuration_error(e: hit_counter::config::ConfigError) -> ExitCode {
    eprintln!("hit-counter: configuration error: {e}");
    ExitCode::from(2)
}

fn serve(config: Config) -> ExitCode {
    let logs = telemetry::init(config.log_format, &config.log_filter);
    // One event-loop thread per process. Measured (docs/performance.md): concurrent page views
    // then share each write to Redis (automatic pipelining), where worker threads hand the
    // Redis connection to each other and write one command per syscall. A replica uses one
    // core; more load means more replicas, as 12-factor processes scale.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hit-counter: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        match App::build(config).await {
            Ok(app) => {
                app.run_until_stopped(shutdown_signal()).await;
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                ExitCode::from(1)
            }
        }
    });
    logs.finish();
    code
}
