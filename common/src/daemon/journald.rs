//! Where the daemons' logs go: to journald with structured fields when stderr is
//! connected to the journal (systemd sets `JOURNAL_STREAM=<device>:<inode>` of that
//! stream; systemd.exec(5) says to compare it with stderr's) or when
//! `SKYFERRY_LOG_TARGET=journald`; to stderr otherwise.

use std::os::fd::AsFd;

/// The environment variable that overrides the choice: `auto` (default), `journald`,
/// `stderr`.
pub const LOG_TARGET_VAR: &str = "SKYFERRY_LOG_TARGET";

/// Where logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// The target asked for by [`LOG_TARGET_VAR`] and `JOURNAL_STREAM`, with a warning to log
/// when the variable holds something else than the values it takes.
pub fn choose(
    target_var: Option<&str>,
    journal_stream: Option<&str>,
) -> (LogTarget, Option<String>) {
    let auto = || {
        if journal_stream.is_some_and(stderr_is) {
            LogTarget::Journald
        } else {
            LogTarget::Stderr
        }
    };
    match target_var.map(str::trim) {
        None | Some("") | Some("auto") => (auto(), None),
        Some("journald") => (LogTarget::Journald, None),
        Some("stderr") => (LogTarget::Stderr, None),
        Some(other) => (
            auto(),
            Some(format!(
                "{LOG_TARGET_VAR}={other:?} is not one of auto, journald, stderr; using auto"
            )),
        ),
    }
}

/// `<device>:<inode>` as systemd writes `JOURNAL_STREAM`, both decimal.
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// True when `journal_stream` names the file stderr is open on.
fn stderr_is(journal_stream: &str) -> bool {
    parse_journal_stream(journal_stream).is_some_and(|id| same_file(std::io::stderr().as_fd(), id))
}

/// True when `fd` is open on the file with device and inode `id`.
// `st_dev` and `st_ino` are not u64 on every platform.
#[allow(clippy::unnecessary_cast)]
pub fn same_file(fd: std::os::fd::BorrowedFd<'_>, id: (u64, u64)) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| (st.st_dev as u64, st.st_ino as u64) == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:1234"), Some((8, 1234)));
        assert_eq!(parse_journal_stream(" 8:1234\n"), Some((8, 1234)));
        assert_eq!(parse_journal_stream("8-1234"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream(":"), None);
    }

    #[test]
    fn a_descriptor_matches_only_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let fa = std::fs::File::create(&a).unwrap();
        std::fs::File::create(&b).unwrap();
        let (ma, mb) = (a.metadata().unwrap(), b.metadata().unwrap());
        assert!(same_file(fa.as_fd(), (ma.dev(), ma.ino())));
        assert!(!same_file(fa.as_fd(), (mb.dev(), mb.ino())));
    }

    #[test]
    fn the_variable_overrides_and_a_bad_value_is_reported() {
        assert_eq!(choose(Some("journald"), None).0, LogTarget::Journald);
        assert_eq!(choose(Some("stderr"), Some("1:2")).0, LogTarget::Stderr);
        // No JOURNAL_STREAM, or one that is not stderr: stderr.
        assert_eq!(choose(None, None), (LogTarget::Stderr, None));
        assert_eq!(choose(Some("auto"), Some("0:0")).0, LogTarget::Stderr);
        let (target, warning) = choose(Some("syslog"), None);
        assert_eq!(target, LogTarget::Stderr);
        assert!(warning.unwrap().contains("\"syslog\""));
    }
}
