//! Validation of relative paths that cross the wire.
//!
//! The agent sends paths relative to its watch root; the receiver joins them under
//! `<storage root>/<agent id>/`. A path is accepted only if it cannot name anything
//! outside that directory: relative, `/`-separated, no empty, `.` or `..` components, no
//! NUL or backslash, and within length limits. Control characters (C0, DEL, C1) are
//! refused too: a path is written to logs, and a newline or an escape sequence in it
//! would forge log lines or rewrite an operator's terminal. (Symlinks already on the receiver's disk
//! are checked by the receiver's storage when it creates directories.)

use crate::protocol::MAX_PATH_LEN;

/// Longest single path component, the common filesystem limit.
pub const MAX_COMPONENT_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; only paths relative to the watch root are accepted")]
    Absolute(String),
    #[error("path {0:?} contains a `..`, `.` or empty component")]
    Traversal(String),
    #[error("path {0:?} contains a NUL or backslash character")]
    BadCharacter(String),
    #[error("path {0:?} contains a control character (U+{1:04X}); newlines, tabs and escape sequences are not accepted")]
    ControlCharacter(String, u32),
    #[error("path of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("path {0:?} has a component longer than 255 bytes")]
    ComponentTooLong(String),
}

/// C0 controls (U+0000..=U+001F), DEL (U+007F) and C1 controls (U+0080..=U+009F).
fn is_control(c: char) -> bool {
    c.is_control()
}

/// A validated relative path (`a/b/c.fits`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    pub fn parse(s: &str) -> Result<RelPath, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong {
                len: s.len(),
                max: MAX_PATH_LEN,
            });
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_owned()));
        }
        if s.contains('\0') || s.contains('\\') {
            return Err(PathError::BadCharacter(s.to_owned()));
        }
        if let Some(c) = s.chars().find(|&c| is_control(c)) {
            return Err(PathError::ControlCharacter(s.to_owned(), u32::from(c)));
        }
        for part in s.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(PathError::Traversal(s.to_owned()));
            }
            if part.len() > MAX_COMPONENT_LEN {
                return Err(PathError::ComponentTooLong(s.to_owned()));
            }
        }
        Ok(RelPath(s.to_owned()))
    }

    /// Builds a wire path from a filesystem path relative to a root.
    pub fn from_relative(path: &std::path::Path) -> Result<RelPath, PathError> {
        let s = path
            .to_str()
            .ok_or_else(|| PathError::BadCharacter(path.to_string_lossy().into_owned()))?;
        RelPath::parse(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for ok in [
            "a.fits",
            "2026-11-21/TMQ1/det07.fits",
            "x..y/z",
            ".hidden/a",
        ] {
            assert_eq!(RelPath::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_escapes() {
        let cases = [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute("/etc/passwd".into())),
            ("../x", PathError::Traversal("../x".into())),
            ("a/../../x", PathError::Traversal("a/../../x".into())),
            ("a//b", PathError::Traversal("a//b".into())),
            ("a/./b", PathError::Traversal("a/./b".into())),
            ("a/", PathError::Traversal("a/".into())),
            ("a\\..\\b", PathError::BadCharacter("a\\..\\b".into())),
            ("a\0b", PathError::BadCharacter("a\0b".into())),
        ];
        for (input, err) in cases {
            assert_eq!(RelPath::parse(input), Err(err), "{input:?}");
        }
        for bad in [
            "a\nb",
            "a\rb",
            "a\tb",
            "a\x1b[31mb",
            "a\u{7f}",
            "a\u{85}b",
            "a\u{9b}b",
        ] {
            assert!(
                matches!(RelPath::parse(bad), Err(PathError::ControlCharacter(..))),
                "{bad:?}"
            );
        }
        let e = RelPath::parse("x\n2099-01-01 INFO forged")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "the message escapes the path: {e}");
        // Printable non-ASCII is fine.
        assert!(RelPath::parse("観測/ß-é.fits").is_ok());
        assert!(matches!(
            RelPath::parse(&"a/".repeat(3000)),
            Err(PathError::TooLong { .. })
        ));
        assert!(matches!(
            RelPath::parse(&"a".repeat(300)),
            Err(PathError::ComponentTooLong(_))
        ));
    }
}
