//! From a Redis message to a journal entry: parse the payload (a plain path, or JSON with
//! a configured field holding it) and resolve the path against the watch roots.
//!
//! Parsing is pure. Resolution stats the file, so callers run it off the runtime.

use std::path::{Component, Path};

use skyferry_common::config::MessageFormat;

use super::{inspect, Rejection, Rules};
use crate::journal::Discovered;

/// Longest payload accepted: a path, or a small JSON object.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The path named by a pub/sub payload, or why the payload is malformed.
pub fn path_from_payload(format: &MessageFormat, payload: &[u8]) -> Result<String, String> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message of {} bytes is longer than {MAX_MESSAGE_BYTES}",
            payload.len()
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|_| "message is not UTF-8".to_string())?;
    match format {
        MessageFormat::Path { .. } => plain_path(text),
        MessageFormat::Json { field } => {
            let value: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| format!("message is not JSON ({e}), but format = \"json\""))?;
            let obj = value
                .as_object()
                .ok_or_else(|| "JSON message is not an object".to_string())?;
            match obj.get(field) {
                Some(serde_json::Value::String(s)) => plain_path(s),
                Some(other) => Err(format!("JSON field {field:?} is not a string: {other}")),
                None => Err(format!("JSON message has no field {field:?}")),
            }
        }
    }
}

/// A path given as text: trimmed, non-empty, one line, no NUL.
pub fn plain_path(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("message holds no path".into());
    }
    if t.contains(['\0', '\n', '\r']) {
        return Err("path contains a NUL or line break".into());
    }
    Ok(t.to_owned())
}

/// Resolves a path from a message: an absolute path must lie under a watch root
/// (directly, or once symlinks are resolved); a relative one is looked up under each root
/// in turn. `..` is refused outright. Blocking: stats the file.
pub fn resolve(rules: &Rules, raw: &str) -> Result<Discovered, Rejection> {
    let path = Path::new(raw);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Rejection::OutsideRoots);
    }
    if path.is_absolute() {
        if let Some((root, _)) = rules.split(path) {
            return inspect(rules, root, path);
        }
        // A root may be reached through a symlink (/data → /mnt/data).
        let canonical = path.canonicalize().map_err(|_| Rejection::OutsideRoots)?;
        let (root, _) = rules.split(&canonical).ok_or(Rejection::OutsideRoots)?;
        return inspect(rules, root, &canonical);
    }
    let mut first = None;
    for root in rules.roots() {
        match inspect(rules, root, &root.join(path)) {
            Err(Rejection::NotFound) => {}
            // The first root where the name exists decides.
            other => return other,
        }
        first.get_or_insert(root);
    }
    Err(if first.is_some() {
        Rejection::NotFound
    } else {
        Rejection::OutsideRoots
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyferry_common::config::{Blocklist, PathFilter};

    fn json() -> MessageFormat {
        MessageFormat::Json {
            field: "path".into(),
        }
    }
    fn plain() -> MessageFormat {
        MessageFormat::Path {
            field: "path".into(),
        }
    }

    #[test]
    fn payloads_parse_or_say_why_not() {
        assert_eq!(
            path_from_payload(&plain(), b" /data/a.fits\n"),
            Ok("/data/a.fits".into())
        );
        assert_eq!(
            path_from_payload(&json(), br#"{"path":"n/a.fits","exposure":7}"#),
            Ok("n/a.fits".into())
        );
        for (format, bad, why) in [
            (plain(), &b""[..], "no path"),
            (plain(), &b"\xff\xfe"[..], "UTF-8"),
            (plain(), &b"a\nb"[..], "line break"),
            (json(), &b"{not json"[..], "not JSON"),
            (json(), &b"[1]"[..], "not an object"),
            (json(), &br#"{"file":"a"}"#[..], "no field \"path\""),
            (json(), &br#"{"path":3}"#[..], "not a string"),
        ] {
            let e = path_from_payload(&format, bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let huge = vec![b'a'; MAX_MESSAGE_BYTES + 1];
        assert!(path_from_payload(&plain(), &huge).is_err());
    }

    #[test]
    fn paths_resolve_against_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(a.join("n")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("n/x.fits"), b"x").unwrap();
        std::fs::write(b.join("y.fits"), b"yy").unwrap();
        std::fs::write(base.join("outside.fits"), b"o").unwrap();
        let none = PathFilter::new(&[], &[]).unwrap();
        let rules = Rules {
            roots: vec![(a.clone(), none.clone()), (b.clone(), none)],
            blocklist: Blocklist::default(),
        };
        let abs = a.join("n/x.fits").display().to_string();
        assert_eq!(resolve(&rules, &abs).unwrap().path, "n/x.fits");
        let d = resolve(&rules, "y.fits").unwrap();
        assert_eq!((d.root, d.size), (b.display().to_string(), 2));
        assert_eq!(resolve(&rules, "n/x.fits").unwrap().size, 1);
        let outside = base.join("outside.fits").display().to_string();
        assert_eq!(resolve(&rules, &outside), Err(Rejection::OutsideRoots));
        let climb = format!("{}/../outside.fits", a.display());
        assert_eq!(resolve(&rules, &climb), Err(Rejection::OutsideRoots));
        assert_eq!(
            resolve(&rules, "../outside.fits"),
            Err(Rejection::OutsideRoots)
        );
        assert_eq!(resolve(&rules, "n/missing.fits"), Err(Rejection::NotFound));
        let missing = a.join("missing.fits").display().to_string();
        assert_eq!(resolve(&rules, &missing), Err(Rejection::NotFound));
    }
}
