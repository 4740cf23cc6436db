//! Encryption of page secrets at rest (ChaCha20-Poly1305) with the master key, and the key file
//! that holds a generated master key beside a SQLite database.
//!
//! A sealed value is `version (1 byte) || nonce (12 bytes) || ciphertext+tag`. The associated data
//! names the row and column the value belongs to, so a ciphertext copied into another page's row
//! or another column does not decrypt.

use std::{
    fmt,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{
    ChaCha20Poly1305, KeyInit,
    aead::{Aead, AeadCore, OsRng, Payload},
};
use secrecy::{ExposeSecret, SecretBox, SecretString};

const SEALED_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// The 32-byte key that encrypts page secrets. Never printed.
pub struct MasterKey(SecretBox<[u8; 32]>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

impl Clone for MasterKey {
    fn clone(&self) -> Self {
        MasterKey(SecretBox::new(Box::new(*self.0.expose_secret())))
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let key: [u8; 32] = bytes.try_into().ok()?;
        Some(MasterKey(SecretBox::new(Box::new(key))))
    }

    pub fn generate() -> Self {
        let key = ChaCha20Poly1305::generate_key(&mut OsRng);
        MasterKey(SecretBox::new(Box::new(key.into())))
    }

    fn to_base64(&self) -> String {
        BASE64.encode(self.0.expose_secret())
    }

    /// Reads the key file, or creates it (mode 0600) with a new key when it does not exist.
    /// Two processes starting at once agree on one key: creation is exclusive, the loser reads.
    pub fn load_or_create_file(path: &Path) -> anyhow::Result<(Self, KeyFileOutcome)> {
        match Self::create_file(path) {
            Ok(key) => Ok((key, KeyFileOutcome::Created)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok((Self::read_file(path)?, KeyFileOutcome::Loaded))
            }
            Err(e) => Err(e).with_context(|| {
                format!("Failed to create the master key file {}", path.display())
            }),
        }
    }

    fn create_file(path: &Path) -> std::io::Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        let key = Self::generate();
        file.write_all(format!("{}\n", key.to_base64()).as_bytes())?;
        file.sync_all()?;
        Ok(key)
    }

    fn read_file(path: &Path) -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .with_context(|| format!("Failed to stat {}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                bail!(
                    "the master key file {} is readable by other users (mode {:o}); run `chmod 600` on it",
                    path.display(),
                    mode & 0o777
                );
            }
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Failed to read the master key file {}", path.display()))?;
        let bytes = BASE64
            .decode(text.trim())
            .with_context(|| format!("the master key file {} is not base64", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| {
            format!(
                "the master key file {} does not hold a 32-byte key",
                path.display()
            )
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFileOutcome {
    Created,
    Loaded,
}

/// HMAC-SHA256 (webhook signatures, appsecret_proof).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Compares secrets without leaking, through timing, how much of them matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Where the generated key of a SQLite database lives: beside it, named after it.
pub fn key_file_for(database_file: &Path) -> PathBuf {
    let mut name = database_file.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

/// Seals and opens secrets with the master key.
#[derive(Clone)]
pub struct SecretCipher {
    cipher: ChaCha20Poly1305,
    /// Keys [`SecretCipher::digest`]: derived from the master key, never used to encrypt.
    digest_key: [u8; 32],
}

impl fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretCipher")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the sealed value is malformed")]
    Malformed,
    #[error("the sealed value does not decrypt with this master key")]
    WrongKey,
}

impl SecretCipher {
    pub fn new(key: &MasterKey) -> Self {
        SecretCipher {
            cipher: ChaCha20Poly1305::new(key.0.expose_secret().into()),
            digest_key: hmac_sha256(key.0.expose_secret().as_slice(), b"otnd digest key v1"),
        }
    }

    /// A keyed digest (hex HMAC-SHA256 under a key derived from the master key) of `value` in
    /// `context`: the same inputs always give the same digest, from which nobody without the
    /// master key can tell the value, not even by trying every possible one. How an erased
    /// subscriber is remembered without keeping who it was.
    pub fn digest(&self, context: &str, value: &str) -> String {
        let mut message = Vec::with_capacity(context.len() + 1 + value.len());
        message.extend_from_slice(context.as_bytes());
        message.push(0);
        message.extend_from_slice(value.as_bytes());
        hex::encode(hmac_sha256(&self.digest_key, &message))
    }

    /// `context` names where the value is stored (e.g. `pages/123/access_token`).
    pub fn seal(&self, plaintext: &str, context: &str) -> Vec<u8> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encryption only fails for inputs beyond 256 GiB");
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(SEALED_VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    pub fn open(&self, sealed: &[u8], context: &str) -> Result<SecretString, OpenError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != SEALED_VERSION {
            return Err(OpenError::Malformed);
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        let plaintext = self
            .cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| OpenError::WrongKey)?;
        String::from_utf8(plaintext)
            .map(SecretString::from)
            .map_err(|_| OpenError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secret_opens_only_in_its_context_and_with_its_key() {
        let cipher = SecretCipher::new(&MasterKey::generate());
        let sealed = cipher.seal("EAAB-token", "pages/1/access_token");
        assert!(!sealed.windows(10).any(|w| w == b"EAAB-token"));
        assert_eq!(
            cipher
                .open(&sealed, "pages/1/access_token")
                .unwrap()
                .expose_secret(),
            "EAAB-token"
        );
        assert!(matches!(
            cipher.open(&sealed, "pages/2/access_token"),
            Err(OpenError::WrongKey)
        ));
        let other = SecretCipher::new(&MasterKey::generate());
        assert!(matches!(
            other.open(&sealed, "pages/1/access_token"),
            Err(OpenError::WrongKey)
        ));
        assert!(matches!(
            cipher.open(&[9, 9], "x"),
            Err(OpenError::Malformed)
        ));
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file_for(&dir.path().join("otnd.db"));
        let (first, outcome) = MasterKey::load_or_create_file(&path).unwrap();
        assert_eq!(outcome, KeyFileOutcome::Created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (second, outcome) = MasterKey::load_or_create_file(&path).unwrap();
        assert_eq!(outcome, KeyFileOutcome::Loaded);
        assert_eq!(first.to_base64(), second.to_base64());
    }
}
