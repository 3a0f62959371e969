//! `skyferry-receiver`: command line of the receiver daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use skyferry_common::config::{validate_agent_id, ReceiverConfig};
use skyferry_common::daemon::{self, EXIT_FAILURE, EXIT_USAGE};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "skyferry-receiver",
    version,
    about = "skyferry cloud-side receiver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the receiver daemon.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and report every problem.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the running receiver's state: agents, storage, stalls, node load.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create and issue TLS identities.
    #[command(subcommand)]
    Certs(Certs),
    /// Query and rebuild the catalog of stored files (docs/catalog.md).
    #[command(subcommand)]
    Catalog(CatalogCommand),
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Rows matching every condition given (current versions only, unless --all-versions).
    Query {
        #[arg(long, short)]
        config: PathBuf,
        /// The observatory night (the date of the evening): 2024-05-01 or 20240501.
        #[arg(long)]
        night: Option<String>,
        /// Observations starting at or after: YYYY-MM-DD[Thh:mm:ss] (UTC) or an MJD.
        #[arg(long)]
        since: Option<String>,
        /// Observations starting at or before: YYYY-MM-DD[Thh:mm:ss] (UTC) or an MJD.
        #[arg(long)]
        until: Option<String>,
        /// target_name (OBJECT), any case.
        #[arg(long)]
        object: Option<String>,
        /// RA,DEC,RADIUS in degrees (RA and Dec also sexagesimal: 05:35:17,-05:23:28,0.5).
        #[arg(long, allow_hyphen_values = true)]
        cone: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        /// Superseded versions too.
        #[arg(long)]
        all_versions: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
        /// Comma-separated columns ("all" for every column).
        #[arg(long)]
        columns: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The nights in the catalog, with their row counts.
    Nights {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Re-derive the catalog from the stored files and the inventory (safe while the
    /// receiver runs).
    Rebuild {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum Certs {
    /// Create a new CA and the receiver's certificate in DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// DNS name agents use to reach the receiver (also accepted: "localhost").
        #[arg(long, default_value = "skyferry-receiver")]
        name: String,
        /// Additional DNS names or IP addresses for the receiver's certificate.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Issue an agent certificate signed by the CA in --ca-dir.
    IssueAgent {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match daemon::parse_args::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let code = match cli.command {
        Command::CheckConfig { config: path } => match ReceiverConfig::load_checked(&path) {
            Ok(c) => {
                return daemon::print_out(&format!(
                    "config {} is valid\n  receiver {} on {}\n  storage {}\n",
                    path.display(),
                    c.id,
                    c.listen,
                    c.storage_root.display()
                ))
            }
            Err(e) => {
                eprintln!("{e}");
                EXIT_USAGE
            }
        },
        Command::Status { config, json } => match ReceiverConfig::load(&config) {
            Err(e) => {
                eprintln!("{e}");
                EXIT_USAGE
            }
            Ok(c) => match skyferry_receiver::status::report(&c.state_file, json) {
                Ok(text) => return daemon::print_out(&text),
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_FAILURE
                }
            },
        },
        Command::Run { config } => match ReceiverConfig::load_for_run(&config) {
            Err(e) => {
                eprintln!("{e}");
                EXIT_USAGE
            }
            Ok((config, warnings)) => report(run(config, warnings)),
        },
        Command::Catalog(c) => return catalog_command(c),
        Command::Certs(Certs::Init { out, name, san }) => {
            let mut names = vec![name, "localhost".to_owned()];
            names.extend(san);
            report(
                skyferry_common::tls::init_ca(&out, &names)
                    .map(|f| {
                        println!(
                            "created CA {} and receiver certificate {} ({})",
                            f.ca_cert.display(),
                            f.receiver_cert.display(),
                            names.join(", ")
                        );
                        println!(
                            "keep {} secret: it issues agent identities",
                            f.ca_key.display()
                        );
                    })
                    .context("creating the CA"),
            )
        }
        Command::Certs(Certs::IssueAgent { ca_dir, name, out }) => {
            if let Err(e) = validate_agent_id(&name) {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE as u8);
            }
            report(
                skyferry_common::tls::issue_agent(&ca_dir, &name, &out)
                    .map(|(cert, key)| {
                        println!(
                            "issued agent {name}: {} and {}",
                            cert.display(),
                            key.display()
                        );
                    })
                    .context("issuing the agent certificate"),
            )
        }
    };
    ExitCode::from(code as u8)
}

/// The catalog commands read only the config's syntax (no TLS identity is needed).
fn catalog_command(c: CatalogCommand) -> ExitCode {
    use skyferry_receiver::catalog::query::{self, Format, Query, QueryError};
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(EXIT_USAGE as u8)
    };
    let load = |path: &PathBuf| ReceiverConfig::load(path).map_err(|e| e.to_string());
    match c {
        CatalogCommand::Query {
            config,
            night,
            since,
            until,
            object,
            cone,
            agent,
            all_versions,
            format,
            columns,
            limit,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => return usage(e),
            };
            let parsed = (|| -> Result<Query, QueryError> {
                let columns: Vec<String> = match columns.as_deref() {
                    None => query::DEFAULT_COLUMNS
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    Some("all") => skyferry_receiver::catalog::arrow_file::schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect(),
                    Some(list) => list.split(',').map(|s| s.trim().to_owned()).collect(),
                };
                let night = night
                    .map(|n| {
                        skyferry_receiver::catalog::night::parse_night(&n).ok_or_else(|| {
                            QueryError::Usage(format!(
                                "--night {n:?}: not a date (YYYY-MM-DD or YYYYMMDD)"
                            ))
                        })
                    })
                    .transpose()?;
                Ok(Query {
                    night,
                    since: since
                        .map(|s| query::parse_time_arg("--since", &s))
                        .transpose()?,
                    until: until
                        .map(|s| query::parse_time_arg("--until", &s))
                        .transpose()?,
                    object,
                    cone: cone.map(|c| query::Cone::parse(&c)).transpose()?,
                    agent,
                    all_versions,
                    limit,
                    columns: Some(columns),
                })
            })();
            let q = match parsed {
                Ok(q) => q,
                Err(e) => return usage(e.to_string()),
            };
            let format = match format {
                OutputFormat::Table => Format::Table,
                OutputFormat::Csv => Format::Csv,
                OutputFormat::Json => Format::Json,
            };
            let result = query::run(&config.catalog.dir, &q).and_then(|m| {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                let columns = q.columns.as_deref().unwrap_or_default();
                query::print(&m, columns, format, &mut out)?;
                std::io::Write::flush(&mut out).map_err(QueryError::Output)
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(QueryError::Usage(m)) => usage(m),
                Err(QueryError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILURE as u8)
                }
            }
        }
        CatalogCommand::Nights { config, format } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => return usage(e),
            };
            match query::read_summary(&config.catalog.dir) {
                Ok(nights) => {
                    let mut text = String::new();
                    let rows: Vec<String> = nights
                        .iter()
                        .map(|n| {
                            let f =
                                |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
                            match format {
                                OutputFormat::Json => serde_json::json!({
                                    "night": n.night.to_string(), "rows": n.rows,
                                    "versions": n.versions, "bytes": n.bytes,
                                    "file_bytes": n.file_bytes, "t_min": n.t_min,
                                    "t_max": n.t_max, "ra_min": n.ra_min, "ra_max": n.ra_max,
                                    "dec_min": n.dec_min, "dec_max": n.dec_max,
                                })
                                .to_string(),
                                OutputFormat::Csv => format!(
                                    "{},{},{},{},{},{}",
                                    n.night,
                                    n.rows,
                                    n.versions,
                                    n.bytes,
                                    f(n.t_min),
                                    f(n.t_max)
                                ),
                                OutputFormat::Table => format!(
                                    "{:<10}  {:>8}  {:>8}  {:>14}  {:>14}  {:>14}",
                                    n.night.to_string(),
                                    n.rows,
                                    n.versions,
                                    n.bytes,
                                    f(n.t_min),
                                    f(n.t_max)
                                ),
                            }
                        })
                        .collect();
                    match format {
                        OutputFormat::Json => text.push_str(&format!("[{}]\n", rows.join(",\n"))),
                        OutputFormat::Csv => {
                            text.push_str("night,rows,versions,bytes,t_min,t_max\n");
                            rows.iter().for_each(|r| text.push_str(&format!("{r}\n")));
                        }
                        OutputFormat::Table => {
                            text.push_str(&format!(
                                "{:<10}  {:>8}  {:>8}  {:>14}  {:>14}  {:>14}\n",
                                "night", "rows", "versions", "bytes", "t_min", "t_max"
                            ));
                            rows.iter().for_each(|r| text.push_str(&format!("{r}\n")));
                        }
                    }
                    daemon::print_out(&text)
                }
                Err(e) => {
                    eprintln!(
                        "error: {e} (has the receiver written a catalog to catalog.dir yet?)"
                    );
                    ExitCode::from(EXIT_FAILURE as u8)
                }
            }
        }
        CatalogCommand::Rebuild { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => return usage(e),
            };
            let mut last = std::time::Instant::now();
            let result = skyferry_receiver::catalog::rebuild::rebuild(
                &config.storage_root,
                &config.catalog,
                |done, total| {
                    if done == total || last.elapsed() >= std::time::Duration::from_secs(1) {
                        last = std::time::Instant::now();
                        eprintln!("rebuild: {done}/{total} file versions");
                    }
                },
            );
            match result {
                Ok(r) => daemon::print_out(&format!(
                    "rebuilt the catalog in {}: {} file versions, {} rows added, {} nights written\n",
                    config.catalog.dir.display(),
                    r.versions_seen,
                    r.rows_added,
                    r.nights
                )),
                Err(e) => {
                    eprintln!("error: catalog rebuild: {e}");
                    ExitCode::from(EXIT_FAILURE as u8)
                }
            }
        }
    }
}

fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_FAILURE
        }
    }
}

fn run(config: ReceiverConfig, warnings: Vec<String>) -> anyhow::Result<()> {
    daemon::init_logging();
    for w in warnings {
        tracing::warn!("agents will refuse this receiver: {w}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        daemon::cancel_on_signals(shutdown.clone());
        skyferry_receiver::run(config, shutdown, |_| {}).await
    })
}
