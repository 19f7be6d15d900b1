//! Users of the management API: names and argon2id password hashes, kept in
//! `STATE_DIR/users.json` (mode 0600) as a JSON object mapping each user
//! name to a PHC hash string.
//!
//! The store owns that file: it loads it once at start-up, keeps the users
//! in memory behind a mutex, and rewrites the whole file atomically (temp
//! file, fsync, rename, fsync of the directory) on every change, so a crash
//! leaves either the old or the new set of users, never a torn file.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// File name of the user store inside the state directory.
pub const USERS_FILE: &str = "users.json";
/// Longest accepted user name.
pub const MAX_NAME_LEN: usize = 32;
/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest accepted password, in bytes (bounds the hashing work per request).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Why a user-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The file could not be read, written or synced.
    #[error("user store {path}: {what}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// What was attempted.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file exists but its contents are not a valid user store.
    #[error("user store {path}: {message}")]
    Corrupt {
        /// The users file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The user name does not match `[a-z_][a-z0-9_-]{0,31}`.
    #[error("invalid user name {0:?}: use 1 to 32 characters from a-z, 0-9, '_' and '-', not starting with a digit or '-'")]
    InvalidName(String),
    /// The password is too short or too long.
    #[error("password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters long")]
    InvalidPassword,
    /// A user of that name already exists.
    #[error("user {0} already exists")]
    Exists(String),
    /// No user of that name exists.
    #[error("user {0} does not exist")]
    NotFound(String),
    /// Hashing the password failed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The users of the management API; shared by reference, internally locked.
#[derive(Debug)]
pub struct UserStore {
    path: PathBuf,
    users: Mutex<BTreeMap<String, String>>,
}

/// Checks a user name against `[a-z_][a-z0-9_-]{0,31}`.
pub fn validate_name(name: &str) -> Result<(), UserError> {
    let bytes = name.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|&b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if first_ok && rest_ok && bytes.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(UserError::InvalidName(name.to_string()))
    }
}

/// Checks a new password's length.
pub fn validate_password(password: &str) -> Result<(), UserError> {
    if password.chars().count() < MIN_PASSWORD_LEN || password.len() > MAX_PASSWORD_LEN {
        Err(UserError::InvalidPassword)
    } else {
        Ok(())
    }
}

fn hash_password(password: &str) -> Result<String, UserError> {
    let salt = SaltString::generate(&mut rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// A hash of a random password, checked against when the user is unknown so
/// that a wrong name costs as much time as a wrong password.
fn decoy_hash() -> Option<&'static str> {
    static DECOY: OnceLock<Option<String>> = OnceLock::new();
    DECOY
        .get_or_init(|| {
            let mut secret = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
            let text: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            hash_password(&text).ok()
        })
        .as_deref()
}

/// Computes the decoy hash now, so that the first login of an unknown user
/// does not also pay for making it (twice the time of a wrong password).
/// Call before the TCP API takes requests.
pub fn prepare_decoy() {
    let _ = decoy_hash();
}

fn check(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

impl UserStore {
    /// Opens the user store in `state_dir`, loading `users.json` if it
    /// exists; a missing file is an empty store (created on first add).
    pub fn open(state_dir: &Path) -> Result<Self, UserError> {
        let path = state_dir.join(USERS_FILE);
        let users = match std::fs::read(&path) {
            Ok(bytes) => Self::parse(&path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(UserError::Io {
                    path,
                    what: "cannot read",
                    source,
                })
            }
        };
        Ok(UserStore {
            path,
            users: Mutex::new(users),
        })
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, String>, UserError> {
        let corrupt = |message: String| UserError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let users: BTreeMap<String, String> = serde_json::from_slice(bytes).map_err(|e| {
            corrupt(format!(
                "expected a JSON object of user name to password hash: {e}"
            ))
        })?;
        for (name, hash) in &users {
            validate_name(name).map_err(|e| corrupt(e.to_string()))?;
            PasswordHash::new(hash)
                .map_err(|e| corrupt(format!("user {name}: invalid password hash: {e}")))?;
        }
        Ok(users)
    }

    /// Path of the users file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        // A panic while holding the lock cannot leave the map half-changed
        // (every change is a single insert or remove), so poison is ignored.
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True when no user exists.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// User names, sorted.
    pub fn list(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Whether a user of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Adds a user with an argon2id hash of `password` and saves the file.
    /// Hashing is deliberately slow: call from a blocking context.
    pub fn add(&self, name: &str, password: &str) -> Result<(), UserError> {
        validate_name(name)?;
        validate_password(password)?;
        if self.contains(name) {
            return Err(UserError::Exists(name.to_string()));
        }
        let hash = hash_password(password)?;
        let mut users = self.lock();
        if users.contains_key(name) {
            return Err(UserError::Exists(name.to_string()));
        }
        users.insert(name.to_string(), hash);
        if let Err(e) = self.save(&users) {
            users.remove(name);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a user and saves the file.
    pub fn remove(&self, name: &str) -> Result<(), UserError> {
        let mut users = self.lock();
        let Some(hash) = users.remove(name) else {
            return Err(UserError::NotFound(name.to_string()));
        };
        if let Err(e) = self.save(&users) {
            users.insert(name.to_string(), hash);
            return Err(e);
        }
        Ok(())
    }

    /// Whether `password` is the password of user `name`. Unknown users
    /// cost the same time as wrong passwords. Slow: call from a blocking
    /// context.
    pub fn verify(&self, name: &str, password: &str) -> bool {
        if password.len() > MAX_PASSWORD_LEN {
            return false;
        }
        let hash = self.lock().get(name).cloned();
        match hash {
            Some(hash) => check(&hash, password),
            None => {
                if let Some(decoy) = decoy_hash() {
                    let _ = check(decoy, password);
                }
                false
            }
        }
    }

    /// Writes `users` to the file atomically with mode 0600.
    fn save(&self, users: &BTreeMap<String, String>) -> Result<(), UserError> {
        let mut text = serde_json::to_vec_pretty(users).map_err(|e| UserError::Corrupt {
            path: self.path.clone(),
            message: format!("cannot encode: {e}"),
        })?;
        text.push(b'\n');
        crate::state::write_atomic(&self.path, &text, 0o600).map_err(|e| UserError::Io {
            path: e.path,
            what: e.what,
            source: e.source,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_and_wrong_password() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::open(dir.path()).unwrap();
        assert!(store.is_empty());
        store.add("alice", "correct horse").unwrap();
        assert!(!store.is_empty());
        assert!(store.verify("alice", "correct horse"));
        assert!(!store.verify("alice", "correct horsE"));
        assert!(!store.verify("bob", "correct horse"));
        assert!(matches!(
            store.add("alice", "another password"),
            Err(UserError::Exists(_))
        ));
        assert_eq!(store.list(), vec!["alice".to_string()]);
    }

    #[test]
    fn validates_names_and_passwords() {
        for good in ["a", "_svc", "ops-1", "abcdefghijklmnopqrstuvwxyz012345"] {
            validate_name(good).unwrap();
        }
        for bad in [
            "",
            "1abc",
            "-x",
            "Alice",
            "a b",
            "a:b",
            "abcdefghijklmnopqrstuvwxyz0123456",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_password("1234567").is_err());
        validate_password("12345678").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.add("Bob", "long enough"),
            Err(UserError::InvalidName(_))
        ));
        assert!(matches!(
            store.add("bob", "short"),
            Err(UserError::InvalidPassword)
        ));
        assert!(store.is_empty());
        assert!(!dir.path().join(USERS_FILE).exists());
    }

    #[test]
    fn persists_across_reopen_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = UserStore::open(dir.path()).unwrap();
            store.add("alice", "password-a").unwrap();
            store.add("bob", "password-b").unwrap();
        }
        let store = UserStore::open(dir.path()).unwrap();
        assert_eq!(store.list(), vec!["alice".to_string(), "bob".to_string()]);
        assert!(store.verify("bob", "password-b"));
        store.remove("alice").unwrap();
        assert!(matches!(store.remove("alice"), Err(UserError::NotFound(_))));
        let again = UserStore::open(dir.path()).unwrap();
        assert_eq!(again.list(), vec!["bob".to_string()]);
        assert!(!again.verify("alice", "password-a"));
    }

    #[test]
    fn file_is_private_json_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::open(dir.path()).unwrap();
        store.add("alice", "password-a").unwrap();
        let path = dir.path().join(USERS_FILE);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let map: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(map["alice"].starts_with("$argon2id$"));
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(USERS_FILE)]);
    }

    #[test]
    fn refuses_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(USERS_FILE);
        std::fs::write(&path, b"[1, 2]").unwrap();
        let err = UserStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("users.json"), "{err}");
        std::fs::write(&path, br#"{"alice": "not a hash"}"#).unwrap();
        let err = UserStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("user alice: invalid password hash"), "{err}");
    }
}
