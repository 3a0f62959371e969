//! The published tree `<root>/<agent id>/<path>` seen from an agent's side: what paths it
//! can hold (the effective name and path limits) and how it is read without ever
//! following a symlink out of the agent's directory.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use skyferry_common::relpath::{RelPath, MAX_COMPONENT_LEN};

use super::StorageError;

/// Linux `PATH_MAX`: the longest path a system call takes, counting the final NUL.
pub const PATH_MAX: usize = 4096;

/// Suffix of a kept earlier version: `.` + 16 hex digits of its BLAKE3.
pub const VERSION_SUFFIX_LEN: usize = 17;

/// What the receiver adds around a path in its longest form,
/// `<root>/.skyferry/versions/<agent>/<path>.<16 hex>`, besides the root and the agent id:
/// `/.skyferry/versions/` (20 bytes), `/` after the agent, the version suffix, the NUL.
const VERSIONS_OVERHEAD: usize = "/.skyferry/versions/".len() + 1 + VERSION_SUFFIX_LEN + 1;

/// The paths this storage can hold, computed once from the storage root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathLimits {
    /// Longest file or directory name of the storage filesystem (`statvfs` `f_namemax`,
    /// at most the protocol's 255).
    pub name_max: usize,
    /// Bytes of the storage root as configured (it prefixes every path used).
    pub root_len: usize,
}

impl PathLimits {
    pub fn of(root: &Path) -> PathLimits {
        let name_max = rustix::fs::statvfs(root)
            .ok()
            .and_then(|st| usize::try_from(st.f_namemax).ok())
            .filter(|&n| n > VERSION_SUFFIX_LEN)
            .map_or(MAX_COMPONENT_LEN, |n| n.min(MAX_COMPONENT_LEN));
        PathLimits {
            name_max,
            root_len: root.as_os_str().len(),
        }
    }

    /// Longest file name (the last component): a kept version appends its suffix.
    pub fn file_name_max(&self) -> usize {
        self.name_max - VERSION_SUFFIX_LEN
    }

    /// Longest relative path for `agent`.
    pub fn path_max(&self, agent: &str) -> usize {
        PATH_MAX.saturating_sub(VERSIONS_OVERHEAD + self.root_len + agent.len())
    }

    /// Refuses (`bad_path`, permanent) a path this storage cannot hold, naming the limit.
    pub fn check(&self, agent: &str, rel: &RelPath) -> Result<(), StorageError> {
        let path_max = self.path_max(agent);
        if rel.as_str().len() > path_max {
            return Err(StorageError::Unsafe(format!(
                "path of {} bytes is longer than this receiver can store for agent {agent:?}: at most {path_max} bytes (PATH_MAX {PATH_MAX} less the storage root, the agent id and the receiver's own prefix and version suffix); path {:?}",
                rel.as_str().len(),
                abbreviated(rel.as_str())
            )));
        }
        let mut comps = rel.components().peekable();
        while let Some(comp) = comps.next() {
            let last = comps.peek().is_none();
            let max = if last {
                self.file_name_max()
            } else {
                self.name_max
            };
            if comp.len() > max {
                let what = if last {
                    format!("file name of {} bytes", comp.len())
                } else {
                    format!("directory name of {} bytes", comp.len())
                };
                let why = if last {
                    format!(
                        "the filesystem's name limit {} less {VERSION_SUFFIX_LEN} for the suffix of a kept version",
                        self.name_max
                    )
                } else {
                    "the filesystem's name limit".to_string()
                };
                return Err(StorageError::Unsafe(format!(
                    "{what} is longer than this receiver can store: at most {max} bytes ({why}); path {:?}",
                    abbreviated(rel.as_str())
                )));
            }
        }
        Ok(())
    }
}

/// The first 200 bytes of a long path (cut at a character boundary), for messages that
/// must stay short enough to reach the agent whole.
fn abbreviated(s: &str) -> String {
    const SHOWN: usize = 200;
    if s.len() <= SHOWN {
        return s.to_owned();
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What is at a path of the published tree.
#[derive(Debug)]
pub enum Found {
    /// Nothing (some component does not exist).
    Absent,
    /// A regular file, opened for reading.
    File(File),
}

/// Opens `<root>/<agent>/<rel>` for reading one component at a time with `O_NOFOLLOW`,
/// so that no symlink (in any component, not only the last) and no special file is ever
/// followed or opened. A symlink, or a non-directory where a directory must be, or a
/// target that is not a regular file, is [`StorageError::Unsafe`] (`bad_path`).
pub fn open_published(root: &Path, agent: &str, rel: &RelPath) -> Result<Found, StorageError> {
    let io = |doing: String| move |e: Errno| StorageError::io(doing, e.into());
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    // The root itself is the operator's configuration: it may be a symlink.
    let mut dir: OwnedFd = rustix::fs::openat(CWD, root, dir_flags, Mode::empty())
        .map_err(io(format!("opening {}", root.display())))?;
    let comps: Vec<&str> = std::iter::once(agent).chain(rel.components()).collect();
    let (name, dirs) = comps.split_last().unwrap_or((&"", &[]));
    for comp in dirs {
        match rustix::fs::openat(&dir, *comp, dir_flags | OFlags::NOFOLLOW, Mode::empty()) {
            Ok(next) => dir = next,
            Err(Errno::NOENT) => return Ok(Found::Absent),
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(StorageError::Unsafe(format!(
                    "{:?}: component {comp:?} is a symlink or not a directory on the receiver (symlinks are not followed)",
                    rel.as_str()
                )))
            }
            Err(e) => return Err(io(format!("opening {comp:?} of {:?}", rel.as_str()))(e)),
        }
    }
    let not_regular = || {
        StorageError::Unsafe(format!(
            "{:?}: the target exists and is not a regular file (symlinks are not followed)",
            rel.as_str()
        ))
    };
    // Look before opening: opening a FIFO or a device could block or have effects.
    let st = match rustix::fs::statat(&dir, *name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(Found::Absent),
        Err(e) => return Err(io(format!("checking {:?}", rel.as_str()))(e)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(not_regular());
    }
    let fd = match rustix::fs::openat(
        &dir,
        *name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Found::Absent),
        Err(Errno::LOOP) => return Err(not_regular()),
        Err(e) => return Err(io(format!("opening {:?}", rel.as_str()))(e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(io(format!("checking {:?}", rel.as_str())))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(not_regular());
    }
    Ok(Found::File(File::from(fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_room_for_the_version_suffix_and_the_prefixes() {
        let l = PathLimits {
            name_max: 255,
            root_len: "/srv/skyferry".len(),
        };
        assert_eq!(l.file_name_max(), 238);
        // 4096 - 20 - 1 - 17 - 1 - 13 - 7
        assert_eq!(l.path_max("kiso-01"), 4037);
        let ok = |p: &str| l.check("kiso-01", &RelPath::parse(p).unwrap());
        assert!(ok(&format!("{}/{}", "d".repeat(255), "f".repeat(238))).is_ok());
        let e = ok(&"f".repeat(239)).unwrap_err().to_string();
        assert!(e.contains("at most 238 bytes"), "{e}");
        let long = vec!["d".repeat(202); 20].join("/"); // 4059 bytes
        let e = ok(&long).unwrap_err().to_string();
        assert!(e.contains("at most 4037 bytes"), "{e}");
        assert!(matches!(
            ok(&"f".repeat(239)).unwrap_err().to_reject().code,
            skyferry_common::protocol::ErrorCode::BadPath
        ));
    }
}
