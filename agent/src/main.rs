//! `skyferry-agent`: command line of the agent daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use skyferry_agent::journal::{Journal, State};
use skyferry_common::config::AgentConfig;
use skyferry_common::daemon::{self, EXIT_FAILURE, EXIT_USAGE};
use tokio_util::sync::CancellationToken;

/// Exit code when the journal is corrupt (sysexits EX_DATAERR): the operator must rebuild
/// it (docs/operations.md), a restart alone will not help.
pub const EXIT_JOURNAL_CORRUPT: u8 = 65;

#[derive(Parser)]
#[command(name = "skyferry-agent", version, about = "skyferry site-side agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent daemon.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and report every problem.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show how many files are pending, in flight, done, vanished or failed.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (Command::Run { config }
    | Command::CheckConfig { config }
    | Command::Status { config, .. }) = &cli.command;
    let config_path = config.clone();
    let config = match AgentConfig::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    match cli.command {
        Command::CheckConfig { .. } => {
            println!("config {} is valid", config_path.display());
            for w in &config.watches {
                println!("  watch {}", w.root.display());
            }
            for r in &config.redis {
                println!("  {} {}", r.name, r.redacted_url());
            }
            if let Some((file, list)) = &config.blocklist {
                println!("  blocklist {} ({} patterns)", file.display(), list.len());
            }
            ExitCode::SUCCESS
        }
        Command::Status { json, .. } => exit(status(&config, json)),
        Command::Run { .. } => {
            daemon::init_logging();
            let journal = match skyferry_agent::open_journal(&config) {
                Ok(j) => j,
                Err(e @ skyferry_agent::JournalError::Corrupt { .. }) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_JOURNAL_CORRUPT);
                }
                Err(e) => return exit(Err(e.into())),
            };
            exit(run(config, config_path, journal))
        }
    }
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE as u8)
        }
    }
}

fn run(config: AgentConfig, config_path: PathBuf, journal: Journal) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        daemon::cancel_on_signals(shutdown.clone());
        skyferry_agent::run(config, Some(config_path), journal, shutdown).await
    })
}

fn status(config: &AgentConfig, json: bool) -> anyhow::Result<()> {
    let counts = if config.journal.exists() {
        Journal::open_read_only(&config.journal)?.counts()?
    } else {
        Default::default()
    };
    let tally = skyferry_agent::tally::read(&config.journal);
    if json {
        let mut obj = serde_json::Map::new();
        for s in State::ALL {
            obj.insert(s.name().into(), counts.get(s).into());
        }
        obj.insert("pending_bytes".into(), counts.pending_bytes.into());
        obj.insert("sent_bytes".into(), tally.sent_bytes.into());
        obj.insert("sent_chunks".into(), tally.sent_chunks.into());
        println!("{}", serde_json::Value::Object(obj));
    } else {
        for s in State::ALL {
            println!("{:<11} {}", s.name(), counts.get(s));
        }
        println!("{:<11} {}", "pending MB", counts.pending_bytes / 1_000_000);
        println!("{:<11} {}", "sent MB", tally.sent_bytes / 1_000_000);
    }
    Ok(())
}
