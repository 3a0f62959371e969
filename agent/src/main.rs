//! `skyferry-agent`: command line of the agent daemon.
//!
//! Exit codes (docs/operations.md): 0 ok, 64 bad configuration or usage (every problem
//! is listed; an unloadable TLS identity is one), 65 corrupt journal, 1 runtime failure
//! (including a journal another agent holds).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use skyferry_agent::journal::{Journal, State, EXIT_JOURNAL_CORRUPT};
use skyferry_common::config::AgentConfig;
use skyferry_common::daemon::{self, EXIT_FAILURE, EXIT_USAGE};
use tokio_util::sync::CancellationToken;

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
    /// Validate a config file (syntax, TLS identity, journal directory) and report every
    /// problem.
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
    let cli = match daemon::parse_args::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::CheckConfig { config: path } => match AgentConfig::load_checked(&path) {
            Ok(config) => daemon::print_out(&check_report(&path, &config)),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE as u8)
            }
        },
        Command::Status { config, json } => match AgentConfig::load(&config) {
            Ok(c) => match status(&c, json) {
                Ok(text) => daemon::print_out(&text),
                Err(e) => failure(e),
            },
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE as u8)
            }
        },
        Command::Run { config: path } => {
            let (config, warnings) = match AgentConfig::load_for_run(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_USAGE as u8);
                }
            };
            daemon::init_logging();
            for w in warnings {
                tracing::warn!(config = %path.display(), "the receiver will refuse this agent: {w}");
            }
            // The identity, the journal (and its lock) and the tally, before any task.
            let prepared = match skyferry_agent::prepare(config) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(e.exit_code());
                }
            };
            match run(prepared, path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let corrupt = e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<skyferry_agent::JournalError>(),
                            Some(skyferry_agent::JournalError::Corrupt { .. })
                        )
                    });
                    eprintln!("error: {e:#}");
                    ExitCode::from(if corrupt {
                        EXIT_JOURNAL_CORRUPT
                    } else {
                        EXIT_FAILURE as u8
                    })
                }
            }
        }
    }
}

fn failure(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(EXIT_FAILURE as u8)
}

fn check_report(path: &Path, config: &AgentConfig) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "config {} is valid", path.display());
    let r = &config.receiver;
    let _ = writeln!(
        out,
        "  agent {} -> {} (server name {})",
        config.id, r.address, r.server_name
    );
    let _ = writeln!(out, "  journal {}", config.journal.display());
    for w in &config.watches {
        let _ = writeln!(out, "  watch {}", w.root.display());
    }
    for r in &config.redis {
        let _ = writeln!(out, "  {} {}", r.name, r.redacted_url());
    }
    if let Some((file, list)) = &config.blocklist {
        let _ = writeln!(
            out,
            "  blocklist {} ({} patterns)",
            file.display(),
            list.len()
        );
    }
    out
}

fn run(prepared: skyferry_agent::Prepared, config_path: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        daemon::cancel_on_signals(shutdown.clone());
        skyferry_agent::run(prepared, Some(config_path), shutdown).await
    })
}

/// The status report, or an error when there is no journal to report on.
fn status(config: &AgentConfig, json: bool) -> anyhow::Result<String> {
    if !config.journal.is_file() {
        anyhow::bail!(
            "no journal at {} (agent.journal): the agent has not run with this config yet, or the path is wrong",
            config.journal.display()
        );
    }
    let counts = Journal::open_read_only(&config.journal)?.counts()?;
    let tally = skyferry_agent::tally::read(&config.journal);
    let daemon_state = skyferry_common::state_file::read(
        &skyferry_agent::status::state_path(&config.journal),
        "skyferry-agent",
    );
    let mut out = Vec::new();
    if json {
        let mut obj = serde_json::Map::new();
        for s in State::ALL {
            obj.insert(s.name().into(), counts.get(s).into());
        }
        obj.insert("pending_bytes".into(), counts.pending_bytes.into());
        obj.insert("sent_bytes".into(), tally.sent_bytes.into());
        obj.insert("sent_chunks".into(), tally.sent_chunks.into());
        obj.insert(
            "daemon".into(),
            match &daemon_state {
                Ok(r) => {
                    let mut d = r.state.clone();
                    d["running"] = r.running.into();
                    d["state_age_seconds"] = ((r.age.as_secs_f64() * 10.0).round() / 10.0).into();
                    d
                }
                Err(e) => serde_json::json!({ "running": false, "error": e }),
            },
        );
        writeln!(out, "{}", serde_json::Value::Object(obj))?;
    } else {
        for s in State::ALL {
            writeln!(out, "{:<11} {}", s.name(), counts.get(s))?;
        }
        writeln!(
            out,
            "{:<11} {}",
            "pending MB",
            counts.pending_bytes / 1_000_000
        )?;
        writeln!(out, "{:<11} {}", "sent MB", tally.sent_bytes / 1_000_000)?;
        match &daemon_state {
            Ok(r) => daemon_lines(&mut out, r)?,
            Err(e) => writeln!(out, "agent not running ({e})")?,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The running agent's state (see `skyferry_agent::status`), for people.
fn daemon_lines(out: &mut Vec<u8>, r: &skyferry_common::state_file::Read) -> std::io::Result<()> {
    let s = &r.state;
    writeln!(out, "{}", skyferry_common::state_file::verdict(r, "agent"))?;
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    writeln!(
        out,
        "{:<11} {}",
        "connection",
        s["connection"].as_str().unwrap_or("-")
    )?;
    writeln!(
        out,
        "{:<11} {:.1} MB/s",
        "throughput",
        s["throughput_bytes_per_second"].as_f64().unwrap_or(0.0) / 1e6
    )?;
    if let Some(queues) = s["queues"].as_object() {
        for (class, q) in queues {
            writeln!(
                out,
                "queue {class:<5} {} files, {} in flight, {} MB, lag {} s, eta {} s",
                num(&q["pending_files"]),
                num(&q["inflight_files"]),
                q["pending_bytes"].as_u64().unwrap_or(0) / 1_000_000,
                num(&q["lag_seconds"]),
                num(&q["eta_seconds"]),
            )?;
        }
    }
    let rcv = &s["receiver"];
    if rcv.is_null() {
        writeln!(out, "receiver    no heartbeat yet")?;
    } else {
        writeln!(
            out,
            "receiver    storage {}, {} GB free, load {}",
            rcv["storage"].as_str().unwrap_or("-"),
            rcv["free_bytes"].as_u64().unwrap_or(0) / 1_000_000_000,
            skyferry_common::state_file::load_text(&rcv["node_load"]),
        )?;
        if let Some(since) = rcv["stalled_since_unix_s"].as_u64() {
            writeln!(out, "receiver    stalled since {since} (unix seconds)")?;
        }
    }
    writeln!(
        out,
        "{:<11} {}",
        "node load",
        skyferry_common::state_file::load_text(&s["node_load"])
    )
}
