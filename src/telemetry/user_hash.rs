//! Users appear in logs as a keyed hash: the same user gives the same value
//! (so an operator can follow one user), but the value reveals nothing
//! without the key.

use std::{fmt, io, path::Path};

use aws_lc_rs::hmac;

use crate::domain::Username;

/// Why a key file gives no key.
#[derive(Debug, thiserror::Error)]
pub enum HashKeyError {
    /// The file cannot be read.
    #[error("{0}")]
    Read(#[from] io::Error),
    /// The file holds nothing but, at most, a newline.
    #[error("the file is empty")]
    Empty,
}

/// HMAC-SHA256 of usernames, truncated to 96 bits (24 hex characters).
#[derive(Clone)]
pub struct UserHasher {
    key: hmac::Key,
}

impl fmt::Debug for UserHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserHasher(<key>)")
    }
}

impl UserHasher {
    /// A hasher with a fixed key: hashes match across replicas and restarts.
    pub fn with_key(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// A hasher with the key in `path` (one trailing newline ignored), so
    /// the key can come from a mounted Secret.
    pub fn from_key_file(path: &Path) -> Result<Self, HashKeyError> {
        let key = std::fs::read(path)?;
        let key = key.strip_suffix(b"\n").unwrap_or(&key);
        if key.is_empty() {
            return Err(HashKeyError::Empty);
        }
        Ok(Self::with_key(key))
    }

    /// A hasher with a random key: hashes match only within this process.
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        // The system RNG failing is not something to limp on with.
        aws_lc_rs::rand::fill(&mut key).expect("the system random generator works");
        Self::with_key(&key)
    }

    /// The user's hash, for logs.
    pub fn hash(&self, username: &Username) -> String {
        let tag = hmac::sign(&self.key, username.expose().as_bytes());
        tag.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Username {
        Username::parse(name).expect("valid")
    }

    #[test]
    fn the_same_key_gives_the_same_hash_and_never_the_name() {
        let a = UserHasher::with_key(b"k1");
        let b = UserHasher::with_key(b"k1");
        let hash = a.hash(&user("alice@example.com"));
        assert_eq!(hash, b.hash(&user("alice@example.com")));
        assert_eq!(hash.len(), 24);
        assert!(!hash.contains("alice"));
    }

    #[test]
    fn different_users_and_keys_give_different_hashes() {
        let hasher = UserHasher::with_key(b"k1");
        assert_ne!(hasher.hash(&user("alice")), hasher.hash(&user("bob")));
        assert_ne!(
            hasher.hash(&user("alice")),
            UserHasher::with_key(b"k2").hash(&user("alice"))
        );
    }
}
