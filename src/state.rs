//! Durable metadata files in the state directory: every write goes to a
//! temporary file, is fsynced, renamed over the old file, and the directory
//! is fsynced, so a crash leaves either the old or the new content.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A failed metadata write.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {source}")]
pub struct StateIoError {
    /// File involved.
    pub path: PathBuf,
    /// What was attempted.
    pub what: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

fn err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> StateIoError {
    let path = path.to_path_buf();
    move |source| StateIoError { path, what, source }
}

/// Replaces `path` with `bytes` atomically and durably, with file `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateIoError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err(&tmp, "cannot create"))?;
    // open() applies the mode only to a new file; a leftover temp file
    // keeps its old mode unless set explicitly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err(&tmp, "cannot set mode"))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(err(&tmp, "cannot write"))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err(path, "cannot replace"))?;
    sync_dir(dir)
}

/// Name of the lock file [`lock_dir`] holds in the state directory.
pub const LOCK_FILE: &str = "essd.lock";

/// Takes an exclusive lock on the state directory for as long as the
/// returned file stays open, so that two servers never share one (each
/// would save its records over the other's). Fails at once if another
/// process holds it.
pub fn lock_dir(dir: &Path) -> Result<File, StateIoError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(err(&path, "cannot open"))?;
    // SAFETY: flock on an fd owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        let e = if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "another essd uses this state directory",
            )
        } else {
            e
        };
        return Err(err(&path, "cannot lock")(e));
    }
    Ok(file)
}

/// fsyncs a directory so created, renamed or removed entries are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StateIoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(dir, "cannot sync directory"))
}

/// Why a JSON record in the state directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordReadError {
    /// The file exists but could not be read.
    #[error("cannot read: {0}")]
    Io(#[source] io::Error),
    /// The file is not a record of the expected shape.
    #[error("cannot parse: {0}")]
    Parse(#[from] serde_json::Error),
}

/// Reads the JSON record at `path`; `None` if there is none yet. The
/// error does not name the file: callers say which record it is.
pub fn read_record<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, RecordReadError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RecordReadError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join(".x.json.tmp").exists());
    }
}
