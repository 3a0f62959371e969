//! The command lines as an operator meets them: exit codes (0 ok, 64 bad configuration
//! or usage, 1 runtime failure), an agent that cannot load its TLS identity, output into
//! a closed pipe, `status` without a journal, messages that state their cause once, and
//! the README's deployment commands with the shipped example configs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use skyferry_tests::binaries::binary;
use skyferry_tests::{Pair, PairOptions};

fn agent_bin() -> PathBuf {
    binary("skyferry-agent").expect("agent binary")
}
fn receiver_bin() -> PathBuf {
    binary("skyferry-receiver").expect("receiver binary")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Starts the pair's agent and waits for it to exit on its own within `timeout`.
fn agent_exits_within(pair: &mut Pair, timeout: Duration) -> (Option<i32>, Duration) {
    let started = Instant::now();
    pair.start_agent().expect("start agent");
    loop {
        if let Some(s) = pair.agent_exit().expect("exit status") {
            return (s.code(), started.elapsed());
        }
        assert!(
            started.elapsed() < timeout,
            "the agent still runs {timeout:?} after its start\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_agent_whose_key_does_not_match_its_certificate_exits_64_at_once_naming_the_key() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    let other = pair.issue_agent_identity("kiso-02").expect("identity");
    let mut identity = pair.agent_identity().clone();
    identity.key = other.key.clone();
    pair.set_agent_identity(identity).expect("config");
    let (code, took) = agent_exits_within(&mut pair, Duration::from_secs(5));
    assert_eq!(code, Some(64), "{}", pair.diagnostics());
    let log = pair.agent_log().expect("log");
    assert!(
        log.contains(&format!(
            "{} is not the private key of",
            other.key.display()
        )),
        "names the key file: {log}"
    );
    eprintln!("exited 64 after {took:?}");
}

#[test]
fn an_agent_whose_ca_file_is_not_pem_exits_64_at_once_naming_it() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    let bad = pair.dir().join("not-a-ca.pem");
    fs::write(&bad, "this is not PEM\n").expect("write");
    let ca = pair.certs_dir().join("ca.pem").display().to_string();
    let bad_text = bad.display().to_string();
    pair.write_agent_config(|t| *t = t.replace(&ca, &bad_text))
        .expect("config");
    let (code, _) = agent_exits_within(&mut pair, Duration::from_secs(5));
    assert_eq!(code, Some(64), "{}", pair.diagnostics());
    let log = pair.agent_log().expect("log");
    assert!(
        log.contains(&format!("{bad_text} holds no PEM certificate")),
        "names the CA file: {log}"
    );
}

#[test]
fn usage_errors_exit_64_and_help_and_version_exit_0() {
    for bin in [agent_bin(), receiver_bin()] {
        for args in [&["--no-such-flag"][..], &[], &["run"], &["no-such-command"]] {
            let out = output(Command::new(&bin).args(args));
            assert_eq!(
                out.status.code(),
                Some(64),
                "{} {args:?}: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for args in [&["--help"][..], &["--version"], &["run", "--help"]] {
            let out = output(Command::new(&bin).args(args));
            assert_eq!(out.status.code(), Some(0), "{} {args:?}", bin.display());
            assert!(!out.stdout.is_empty(), "{} {args:?} prints", bin.display());
        }
    }
}

/// `check-config | head -0`: the reader is gone before the first line is written.
#[test]
fn check_config_into_a_closed_pipe_does_not_panic() {
    let pair = Pair::new(PairOptions::default()).expect("pair");
    for (bin, config) in [
        (agent_bin(), pair.agent_config_path()),
        (receiver_bin(), pair.receiver_config_path()),
    ] {
        let mut child = Command::new(&bin)
            .args(["check-config", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // Close the read end before the child has read its config, let alone printed.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{}: {stderr}", bin.display());
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", bin.display());
    }
}

#[test]
fn status_without_a_journal_is_an_error_naming_the_path() {
    let pair = Pair::new(PairOptions::default()).expect("pair");
    for json in [false, true] {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["status", "--config"])
            .arg(pair.agent_config_path());
        if json {
            cmd.arg("--json");
        }
        let out = output(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("no journal at {}", pair.journal().display())),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "no counts printed");
    }
}

#[test]
fn an_error_states_its_cause_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = output(
        Command::new(receiver_bin())
            .args(["certs", "issue-agent", "--name", "kiso-01", "--ca-dir"])
            .arg(dir.path().join("no-ca-here"))
            .arg("--out")
            .arg(dir.path()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ca.pem"), "names the file: {stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the cause once: {stderr}"
    );
}

/// The README's "Running it for real" commands, run literally (with `/etc`, `/var`,
/// `/srv`, `/data` and `./` moved into a temporary directory per host), and the shipped
/// example configs with those paths: `check-config` finds both valid.
#[test]
fn the_readme_commands_and_the_example_configs_give_valid_configs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = fs::read_to_string(repo.join("README.md")).expect("README");
    let section = readme
        .split("## Running it for real")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("a sh block under \"Running it for real\"");
    let tmp = tempfile::tempdir().expect("tempdir");
    let receiver_host = tmp.path().join("receiver-host");
    let agent_host = tmp.path().join("agent-host");
    let on = |host: &Path, text: &str| {
        let h = host.display();
        text.replace("/etc/", &format!("{h}/etc/"))
            .replace("/var/", &format!("{h}/var/"))
            .replace("/srv/", &format!("{h}/srv/"))
            .replace("/data/", &format!("{h}/data/"))
            .replace(" ./", &format!(" {h}/"))
    };
    for host in [&receiver_host, &agent_host] {
        fs::create_dir_all(host.join("etc/skyferry/tls")).expect("mkdir");
    }
    fs::create_dir_all(receiver_host.join("srv/skyferry/data")).expect("mkdir");
    fs::create_dir_all(agent_host.join("var/lib/skyferry/agent")).expect("mkdir");
    fs::create_dir_all(agent_host.join("data/tomoe/raw")).expect("mkdir");
    let receiver_toml =
        fs::read_to_string(repo.join("systemd/receiver.toml.example")).expect("receiver example");
    fs::write(
        receiver_host.join("etc/skyferry/receiver.toml"),
        on(&receiver_host, &receiver_toml),
    )
    .expect("write");
    let agent_toml =
        fs::read_to_string(repo.join("systemd/agent.toml.example")).expect("agent example");
    // The optional check of server_name against the receiver's certificate, on (the
    // copy of receiver.pem goes beside ca.pem, as the README says).
    let mut agent_toml = agent_toml.replace("# server_cert = ", "server_cert = ");
    if !agent_toml.contains("\nserver_cert = ") {
        let key_line = agent_toml
            .lines()
            .find(|l| l.starts_with("key = "))
            .expect("a key = line in [receiver]")
            .to_owned();
        agent_toml = agent_toml.replacen(
            &key_line,
            &format!("{key_line}\nserver_cert = \"/etc/skyferry/tls/receiver.pem\""),
            1,
        );
    }
    fs::write(
        agent_host.join("etc/skyferry/agent.toml"),
        on(&agent_host, &agent_toml),
    )
    .expect("write");

    let mut ran = Vec::new();
    let mut host = &receiver_host;
    for line in section.lines().map(str::trim) {
        if line.starts_with("# on the agent") {
            // What the README says to copy over.
            let tls = receiver_host.join("etc/skyferry/tls");
            for (from, name) in [
                (tls.join("ca.pem"), "ca.pem"),
                (tls.join("receiver.pem"), "receiver.pem"),
                (receiver_host.join("kiso-01/kiso-01.pem"), "kiso-01.pem"),
                (receiver_host.join("kiso-01/kiso-01.key"), "kiso-01.key"),
            ] {
                fs::copy(&from, agent_host.join("etc/skyferry/tls").join(name))
                    .unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            }
            host = &agent_host;
            continue;
        }
        let words: Vec<String> = on(host, line)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let (bin, rest) = match words.split_first() {
            Some((b, rest)) if b == "skyferry-receiver" => (receiver_bin(), rest),
            Some((b, rest)) if b == "skyferry-agent" => (agent_bin(), rest),
            _ => continue, // comments and blank lines
        };
        if rest.first().is_some_and(|c| c == "run" || c == "status") {
            continue; // daemons and reports: not part of setting up
        }
        let out = output(Command::new(&bin).args(rest).current_dir(host));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "README command `{line}` failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if rest.first().is_some_and(|c| c == "check-config") {
            assert!(stdout.contains("is valid"), "`{line}`: {stdout}");
        }
        ran.push(line.to_owned());
    }
    let checks = ran.iter().filter(|l| l.contains("check-config")).count();
    assert_eq!(checks, 2, "both check-config commands ran: {ran:?}");
    assert!(ran.iter().any(|l| l.contains("certs init")), "{ran:?}");
    assert!(
        ran.iter().any(|l| l.contains("certs issue-agent")),
        "{ran:?}"
    );
}
