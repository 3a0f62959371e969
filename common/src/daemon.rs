//! What both daemons' `main` share: exit codes, argument parsing, output, logging setup
//! ([`journald`]), signal handling, and the service manager's notifications ([`systemd`]).

use std::io::Write;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

pub mod journald;
pub mod systemd;

/// Exit codes (sysexits-style): 0 ok, 64 bad config or usage, 1 runtime failure.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 64;

/// Parses the command line. `--help` and `--version` print and give exit code 0; any
/// usage error prints clap's message and gives 64 (clap's own default is 2).
pub fn parse_args<T: clap::Parser>() -> Result<T, ExitCode> {
    use clap::error::ErrorKind;
    match T::try_parse() {
        Ok(t) => Ok(t),
        Err(e) => {
            // Nothing sensible is left to do if printing the message fails.
            let _ = e.print();
            Err(match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE as u8),
            })
        }
    }
}

/// Writes a command's output to stdout. A closed pipe (`| head`) ends the output
/// quietly with code 0, as the reader wanted no more; any other write error is reported
/// and gives 1.
pub fn print_out(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}

/// Logs to journald with structured fields when stderr is the journal (see
/// [`journald`]), to stderr otherwise, filtered by `RUST_LOG` (default `info`). When
/// journald is wanted but cannot be reached, logs go to stderr with a warning saying so.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let var = std::env::var(journald::LOG_TARGET_VAR).ok();
    let stream = std::env::var("JOURNAL_STREAM").ok();
    let (target, mut warning) = journald::choose(var.as_deref(), stream.as_deref());
    if target == journald::LogTarget::Journald {
        // Fields keep their names (`agent`, `path`: AGENT=, PATH= in the journal).
        match tracing_journald::layer() {
            Ok(layer) => {
                let installed = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer.with_field_prefix(None))
                    .try_init();
                if installed.is_ok() {
                    if let Some(w) = warning {
                        tracing::warn!("{w}");
                    }
                }
                return;
            }
            Err(e) => {
                warning = Some(format!(
                    "cannot log to journald ({e}); logging to stderr instead"
                ))
            }
        }
    }
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    if let (Ok(()), Some(w)) = (installed, warning) {
        tracing::warn!("{w}");
    }
}

/// Cancels `token` on SIGTERM or SIGINT. A second signal exits at once.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting immediately");
        std::process::exit(EXIT_FAILURE);
    });
}
