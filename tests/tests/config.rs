//! Bad configuration: every problem reported at once, exit code 64.

use std::process::Command;

use skyferry_tests::binaries::binary;

#[test]
fn receiver_config_with_three_problems_lists_all_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("receiver.toml");
    std::fs::write(
        &cfg,
        "[receiver]\nlisten = \"0.0.0.0:seven\"\ncolour = \"blue\"\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n",
    )
    .expect("write config");
    for cmd in ["check-config", "run"] {
        let out = Command::new(binary("skyferry-receiver").expect("binary"))
            .args([cmd, "--config"])
            .arg(&cfg)
            .output()
            .expect("run receiver");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {stderr}");
        for problem in [
            "unknown key receiver.colour",
            "receiver.storage_root is required",
            "\"0.0.0.0:seven\" is not an ip:port address",
        ] {
            assert!(
                stderr.contains(problem),
                "{cmd}: missing {problem:?} in:\n{stderr}"
            );
        }
    }
}

#[test]
fn agent_config_problems_are_listed_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[agent]\nid = \"Kiso 01\"\njournal = \"j.sqlite\"\n[receiver]\naddress = \"nowhere\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[transfer]\nchunk_size = \"1 GiB\"\nchunks_in_flight = 4\nwindow = \"2 GiB\"\nmax_udp_payload = 9000\nparallel_files = 2\nconnections = 3\n[[watch]]\nroot = \"missing-dir\"\ninclude = [\"[unclosed\"]\n",
    )
    .expect("write config");
    let out = Command::new(binary("skyferry-agent").expect("binary"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .expect("run agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for problem in [
        "agent id \"Kiso 01\" is not valid",
        "\"nowhere\" is not a host:port address",
        "transfer.chunk_size",
        "transfer.chunks_in_flight was replaced by transfer.window",
        "transfer.window = 2147483648 bytes is out of range",
        "transfer.max_udp_payload = 9000 is out of range",
        "transfer.connections = 3 is more than transfer.parallel_files = 2",
        "missing-dir is not a directory",
        "bad glob \"[unclosed\"",
    ] {
        assert!(
            stderr.contains(problem),
            "missing {problem:?} in:\n{stderr}"
        );
    }
}

/// Configs that parse but cannot run: `check-config` and `run` list every such problem
/// and exit 64, before anything starts.
#[test]
fn agent_configs_that_cannot_run_are_not_valid() {
    let pair = skyferry_tests::Pair::new(skyferry_tests::PairOptions::default()).expect("pair");
    let foreign = pair.foreign_agent_identity("kiso-01").expect("foreign");
    let other = pair.issue_agent_identity("kiso-02").expect("identity");
    let me = pair.agent_identity().clone();
    let certs = pair.certs_dir();
    let missing_dir = pair.dir().join("no-such-dir");
    let mut text = pair.agent_config();
    // The key of another agent, the receiver's certificate with the wrong name, the journal
    // in a directory that does not exist.
    text = text.replace(
        &me.key.display().to_string(),
        &other.key.display().to_string(),
    );
    text = text.replace(
        &pair.journal().display().to_string(),
        &missing_dir.join("journal.sqlite").display().to_string(),
    );
    text = text.replace(
        "server_name = \"skyferry-receiver\"",
        &format!(
            "server_name = \"archive.example.org\"\nserver_cert = \"{}\"",
            certs.join("receiver.pem").display()
        ),
    );
    let cfg = pair.dir().join("bad-agent.toml");
    std::fs::write(&cfg, &text).expect("write");
    let expected = [
        format!("{} is not the private key of", other.key.display()),
        format!(
            "receiver.server_name = \"archive.example.org\" is not a name in the certificate {}",
            certs.join("receiver.pem").display()
        ),
        format!("agent.journal: directory {}", missing_dir.display()),
    ];
    // `run` refuses what cannot load or cannot be written; a name the receiver would
    // refuse is only a warning there (the receiver's refusal then says so too).
    let for_run = [expected[0].clone(), expected[2].clone()];
    for (cmd, problems) in [("check-config", &expected[..]), ("run", &for_run[..])] {
        let out = Command::new(binary("skyferry-agent").expect("binary"))
            .args([cmd, "--config"])
            .arg(&cfg)
            .output()
            .expect("run agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {stderr}");
        for problem in problems {
            assert!(
                stderr.contains(problem.as_str()),
                "{cmd}: missing {problem:?} in:\n{stderr}"
            );
        }
        let n = format!("{} problems", problems.len());
        assert!(stderr.contains(&n), "{cmd}: {stderr}");
    }

    // A certificate from another CA, whose name is not agent.id.
    let text = pair
        .agent_config()
        .replace(
            &me.cert.display().to_string(),
            &foreign.cert.display().to_string(),
        )
        .replace(
            &me.key.display().to_string(),
            &foreign.key.display().to_string(),
        )
        .replace("id = \"kiso-01\"", "id = \"kiso-09\"");
    std::fs::write(&cfg, &text).expect("write");
    let out = Command::new(binary("skyferry-agent").expect("binary"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .expect("run agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for problem in [
        format!(
            "{} does not verify against the CA in {}",
            foreign.cert.display(),
            certs.join("ca.pem").display()
        ),
        "agent.id = \"kiso-09\" is not a name in the certificate".to_owned(),
    ] {
        assert!(
            stderr.contains(&problem),
            "missing {problem:?} in:\n{stderr}"
        );
    }
}

#[test]
fn receiver_configs_that_cannot_run_are_not_valid() {
    let pair = skyferry_tests::Pair::new(skyferry_tests::PairOptions::default()).expect("pair");
    let certs = pair.certs_dir();
    let other = pair.foreign_agent_identity("kiso-01").expect("foreign");
    let not_pem = pair.dir().join("ca-not-pem.pem");
    std::fs::write(&not_pem, "-----BEGIN NOTHING-----\n").expect("write");
    let text = pair
        .receiver_config()
        .replace(
            &certs.join("receiver.key").display().to_string(),
            &other.key.display().to_string(),
        )
        .replace(
            &certs.join("ca.pem").display().to_string(),
            &not_pem.display().to_string(),
        );
    let cfg = pair.dir().join("bad-receiver.toml");
    std::fs::write(&cfg, &text).expect("write");
    for cmd in ["check-config", "run"] {
        let out = Command::new(binary("skyferry-receiver").expect("binary"))
            .args([cmd, "--config"])
            .arg(&cfg)
            .output()
            .expect("run receiver");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {stderr}");
        for problem in [
            format!("{}: not valid PEM", not_pem.display()),
            format!("{} is not the private key of", other.key.display()),
        ] {
            assert!(
                stderr.contains(&problem),
                "{cmd}: missing {problem:?} in:\n{stderr}"
            );
        }
    }
}
