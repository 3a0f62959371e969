//! What both daemons' `main` share: exit codes, argument parsing, output, logging setup,
//! signal handling.

use std::io::Write;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

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

/// Logs to stderr (captured by journald under systemd), filtered by `RUST_LOG`
/// (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
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
