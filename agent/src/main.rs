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

// Parsed once at start: the size of the replay variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Queue files again (a backfill, a resend after storage loss on the receiver), or
    /// list, show, pause, resume or cancel replays.
    #[command(args_conflicts_with_subcommands = true)]
    Replay {
        #[command(subcommand)]
        action: Option<ReplayAction>,
        #[command(flatten)]
        start: ReplayStart,
    },
}

#[derive(clap::Args)]
struct ReplayStart {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A tree to walk (need not be a watch root, e.g. an old archive volume).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Files whose mtime falls in this observatory night (noon to noon, agent.timezone).
    #[arg(long, conflicts_with_all = ["since", "until"])]
    night: Option<String>,
    /// Files modified at or after this local time (2024-05-01 or 2024-05-01T18:00).
    #[arg(long)]
    since: Option<String>,
    /// Files modified before this local time.
    #[arg(long)]
    until: Option<String>,
    /// Only paths (relative to their root) matching this glob.
    #[arg(long)]
    glob: Option<String>,
    /// One path per line (absolute, or relative to --root); `-` for stdin.
    #[arg(long)]
    from_list: Option<PathBuf>,
    /// Queue files already done again: the receiver acknowledges what it still holds
    /// without data and takes the rest.
    #[arg(long)]
    resend: bool,
    /// Print what would be queued (files, bytes, ETA) and queue nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    name: Option<String>,
    /// A cap of this replay's own, e.g. 100MB/s.
    #[arg(long)]
    max_rate: Option<String>,
}

#[derive(Subcommand)]
enum ReplayAction {
    /// Every replay with its progress.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One replay's progress; with --follow until it ends, then a summary.
    Show {
        #[arg(long, short)]
        config: PathBuf,
        id: String,
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop sending a replay's files (they stay queued).
    Pause {
        #[arg(long, short)]
        config: PathBuf,
        id: String,
    },
    Resume {
        #[arg(long, short)]
        config: PathBuf,
        id: String,
    },
    /// Unqueue a replay's files not yet sent (stored files stay stored).
    Cancel {
        #[arg(long, short)]
        config: PathBuf,
        id: String,
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
        Command::Replay { action, start } => match replay_command(action, start) {
            Ok(text) => daemon::print_out(&text),
            Err(ReplayError::Usage(e)) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_USAGE as u8)
            }
            Err(ReplayError::Failed(e)) => failure(e),
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
    let secs = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("-".into(), |x| skyferry_agent::progress::duration(x as u64))
    };
    for class in ["all", "live", "backlog", "replay"] {
        let q = &s["queues"][class];
        if q.is_null() {
            continue;
        }
        writeln!(
            out,
            "queue {class:<7} {} files, {} in flight, {}, lag {}, {}, ETA {}",
            num(&q["pending_files"]),
            num(&q["inflight_files"]),
            skyferry_agent::progress::bytes(q["pending_bytes"].as_u64().unwrap_or(0)),
            secs(&q["lag_seconds"]),
            skyferry_agent::progress::rate(q["throughput_bytes_per_second"].as_f64()),
            skyferry_agent::progress::eta(q["eta_seconds"].as_u64()),
        )?;
    }
    let replays: Vec<skyferry_agent::replay_show::Line> =
        serde_json::from_value(s["replays"].clone()).unwrap_or_default();
    for r in replays {
        writeln!(out, "{}", r.text())?;
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

enum ReplayError {
    Usage(String),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for ReplayError {
    fn from(e: anyhow::Error) -> Self {
        ReplayError::Failed(e)
    }
}

impl From<skyferry_agent::JournalError> for ReplayError {
    fn from(e: skyferry_agent::JournalError) -> Self {
        ReplayError::Failed(e.into())
    }
}

fn load(config: &Path) -> Result<AgentConfig, ReplayError> {
    AgentConfig::load(config).map_err(|e| ReplayError::Usage(e.to_string()))
}

fn shared_journal(config: &AgentConfig) -> Result<Journal, ReplayError> {
    if !config.journal.is_file() {
        return Err(ReplayError::Failed(anyhow::anyhow!(
            "no journal at {} (agent.journal): start the agent once with this config first",
            config.journal.display()
        )));
    }
    Ok(Journal::open_shared(&config.journal)?)
}

fn replay_id(id: &str) -> Result<i64, ReplayError> {
    skyferry_agent::replay::parse_id(id).map_err(ReplayError::Usage)
}

fn replay_command(action: Option<ReplayAction>, start: ReplayStart) -> Result<String, ReplayError> {
    use skyferry_agent::replay::ReplayState;
    let set = |config: PathBuf, id: String, to: ReplayState, done: &str| {
        let c = load(&config)?;
        let id = replay_id(&id)?;
        shared_journal(&c)?
            .set_replay_state(id, to)
            .map_err(|e| ReplayError::Failed(anyhow::anyhow!(e)))?;
        Ok(format!("replay {id} {done}\n"))
    };
    match action {
        None => replay_start(start),
        Some(ReplayAction::List { config, json }) => {
            let c = load(&config)?;
            let replays = shared_journal(&c)?.replays()?;
            if json {
                return Ok(format!(
                    "{}\n",
                    serde_json::to_string(&replays).map_err(anyhow::Error::from)?
                ));
            }
            let mut out = String::new();
            for r in &replays {
                out.push_str(&skyferry_agent::replay_show::Line::of(r, None).text());
                out.push('\n');
            }
            if replays.is_empty() {
                out.push_str("no replays\n");
            }
            Ok(out)
        }
        Some(ReplayAction::Show {
            config,
            id,
            follow,
            json,
        }) => {
            let c = load(&config)?;
            let id = replay_id(&id)?;
            let mut j = shared_journal(&c)?;
            let get = |j: &mut Journal| -> Result<skyferry_agent::replay::Replay, ReplayError> {
                j.replay(id)?.ok_or_else(|| {
                    ReplayError::Usage(format!(
                        "no replay {id} in this journal (see `replay list`)"
                    ))
                })
            };
            // Unknown id: a usage error, before anything is printed.
            get(&mut j)?;
            let mut out = std::io::stdout().lock();
            skyferry_agent::replay_show::show(
                || {
                    get(&mut j).map_err(|e| match e {
                        ReplayError::Usage(e) => anyhow::anyhow!(e),
                        ReplayError::Failed(e) => e,
                    })
                },
                follow,
                json,
                &mut out,
            )?;
            Ok(String::new())
        }
        Some(ReplayAction::Pause { config, id }) => set(config, id, ReplayState::Paused, "paused"),
        Some(ReplayAction::Resume { config, id }) => {
            set(config, id, ReplayState::Active, "resumed")
        }
        Some(ReplayAction::Cancel { config, id }) => {
            set(config, id, ReplayState::Cancelled, "cancelled")
        }
    }
}

/// A local time of `tz`: `2024-05-01` (midnight) or `2024-05-01T18:00[:00]`.
fn local_time_ns(s: &str, tz: chrono_tz::Tz, flag: &str) -> Result<i64, ReplayError> {
    use chrono::{NaiveDate, NaiveDateTime, TimeZone};
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
        .or_else(|_| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default())
        })
        .map_err(|_| {
            ReplayError::Usage(format!(
                "{flag} {s:?}: not a local time (2024-05-01 or 2024-05-01T18:00)"
            ))
        })?;
    let t = tz
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| ReplayError::Usage(format!("{flag} {s:?}: no such local time in {tz}")))?;
    t.timestamp_nanos_opt()
        .ok_or_else(|| ReplayError::Usage(format!("{flag} {s:?}: out of range")))
}

fn replay_start(a: ReplayStart) -> Result<String, ReplayError> {
    use skyferry_agent::replay_cli::{self, Selection};
    let Some(config) = a.config.as_deref() else {
        return Err(ReplayError::Usage(
            "replay needs --config (or a subcommand: list, show, pause, resume, cancel)".into(),
        ));
    };
    let c = load(config)?;
    let mut sel = Selection {
        root: a.root.clone(),
        from_list: a.from_list.clone(),
        glob: a.glob.clone(),
        ..Selection::default()
    };
    if let Some(n) = &a.night {
        let night = skyferry_common::night::parse_night(n).ok_or_else(|| {
            ReplayError::Usage(format!(
                "--night {n:?}: not a date (YYYY-MM-DD or YYYYMMDD)"
            ))
        })?;
        let (start, end) = skyferry_common::night::night_bounds(night, c.timezone);
        sel.since_ns = start.timestamp_nanos_opt();
        sel.until_ns = end.timestamp_nanos_opt();
    }
    if let Some(s) = &a.since {
        sel.since_ns = Some(local_time_ns(s, c.timezone, "--since")?);
    }
    if let Some(s) = &a.until {
        sel.until_ns = Some(local_time_ns(s, c.timezone, "--until")?);
    }
    let max_rate = a
        .max_rate
        .as_deref()
        .map(|r| {
            skyferry_common::config::parse_rate(r)
                .map_err(|e| ReplayError::Usage(format!("--max-rate: {e}")))
        })
        .transpose()?
        .flatten();
    let selection = format!(
        "root={:?} from_list={:?} night={:?} since={:?} until={:?} glob={:?} resend={}",
        a.root, a.from_list, a.night, a.since, a.until, a.glob, a.resend
    );
    if a.dry_run {
        let w = replay_cli::walk(&c, &sel, |_| Ok(Default::default()))?;
        let rate = max_rate.or_else(|| current_rate(&c));
        return Ok(format!(
            "would queue {} files, {} bytes ({} MB){}; ETA {}\n",
            w.selected,
            w.selected_bytes,
            w.selected_bytes / 1_000_000,
            if w.refused > 0 {
                format!(", {} refused", w.refused)
            } else {
                String::new()
            },
            match skyferry_agent::progress::eta_seconds(w.selected_bytes, rate.map(|r| r as f64)) {
                Some(s) => format!(
                    "{} at {:.1} MB/s",
                    skyferry_agent::progress::duration(s),
                    rate.unwrap_or(0) as f64 / 1e6
                ),
                None => "unknown (no cap and nothing being sent now)".into(),
            }
        ));
    }
    let mut j = shared_journal(&c)?;
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("replay {}", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")));
    let id = j.create_replay(&name, &selection, max_rate)?;
    let w = replay_cli::enqueue(&c, &mut j, id, &sel, a.resend)?;
    Ok(format!(
        "replay {id} {name:?}: queued {} files ({} bytes), {} already queued or done{}, {} refused\n",
        w.batch.queued,
        w.batch.queued_bytes,
        w.batch.skipped,
        if a.resend { "" } else { " (--resend queues done files again)" },
        w.refused
    ))
}

/// The rate a replay would get now: the tightest cap in force, else what the agent sent
/// over the last second (from the tally), if anything.
fn current_rate(c: &AgentConfig) -> Option<u64> {
    use chrono::Timelike;
    let local = chrono::Utc::now().with_timezone(&c.timezone);
    let minute = (local.hour() * 60 + local.minute()) as u16;
    let caps = [
        c.transfer.max_rate.at(minute),
        c.transfer.rates.replay.at(minute),
    ];
    if let Some(cap) = caps.into_iter().flatten().min() {
        return Some(cap);
    }
    let before = skyferry_agent::tally::read(&c.journal).sent_bytes;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let sent = skyferry_agent::tally::read(&c.journal)
        .sent_bytes
        .saturating_sub(before);
    (sent > 0).then_some(sent)
}
