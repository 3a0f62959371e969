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
        "[agent]\nid = \"Kiso 01\"\njournal = \"j.sqlite\"\n[receiver]\naddress = \"nowhere\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[transfer]\nchunk_size = \"1 GiB\"\n[[watch]]\nroot = \"missing-dir\"\ninclude = [\"[unclosed\"]\n",
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
        "missing-dir is not a directory",
        "bad glob \"[unclosed\"",
    ] {
        assert!(
            stderr.contains(problem),
            "missing {problem:?} in:\n{stderr}"
        );
    }
}
