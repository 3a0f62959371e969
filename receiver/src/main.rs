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
    /// Create and issue TLS identities.
    #[command(subcommand)]
    Certs(Certs),
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
        Command::Run { config } => match ReceiverConfig::load_for_run(&config) {
            Err(e) => {
                eprintln!("{e}");
                EXIT_USAGE
            }
            Ok((config, warnings)) => report(run(config, warnings)),
        },
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
