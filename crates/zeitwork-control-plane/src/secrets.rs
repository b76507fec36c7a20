//! Encryption at rest for secrets (env var values), and the key that does it.
//!
//! XChaCha20-Poly1305 with a random 192-bit nonce per value; the associated data
//! binds a ciphertext to where it is stored, so a value copied to another
//! project or key does not decrypt.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

const PREFIX: &str = "v1:";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The configured key is not 32 bytes of base64.
    #[error("encryption_key must be 32 bytes encoded as base64 (generate one with `openssl rand -base64 32`)")]
    BadKey,
    /// A ciphertext could not be decrypted with this key.
    #[error("a stored secret cannot be decrypted with this key; is encryption_key the same on every operator?")]
    Decrypt,
    #[error("cannot read or write the key file {path}")]
    KeyFile { path: String, source: std::io::Error },
}

#[derive(Clone)]
pub struct Cipher {
    aead: XChaCha20Poly1305,
    /// Key for credentials the operator signs (pull credentials), derived from the encryption key.
    mac_key: [u8; 32],
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    pub fn from_base64(key: &str) -> Result<Self, SecretsError> {
        let bytes = STANDARD.decode(key.trim()).map_err(|_| SecretsError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SecretsError::BadKey);
        }
        use hmac::Mac as _;
        let mut derive =
            <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&bytes).expect("HMAC takes keys of any length");
        derive.update(b"zeitwork signed credentials v1");
        let mac_key: [u8; 32] = derive.finalize().into_bytes().into();
        Ok(Self { aead: XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| SecretsError::BadKey)?, mac_key })
    }

    /// Reads the key file, or creates it (mode 0600) with a fresh random key.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretsError> {
        let err = |source| SecretsError::KeyFile { path: path.display().to_string(), source };
        match std::fs::read_to_string(path) {
            Ok(s) => Self::from_base64(&s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let encoded = STANDARD.encode(key);
                let mut f =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
                f.write_all(encoded.as_bytes()).and_then(|_| f.sync_all()).map_err(err)?;
                Self::from_base64(&encoded)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Encrypts `plain`, bound to `context` (e.g. `env:<project-id>:<KEY>`).
    pub fn encrypt(&self, context: &str, plain: &str) -> String {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain.as_bytes(), aad: context.as_bytes() })
            .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }

    /// HMAC-SHA256 of `message` under the operator's signing key (deterministic).
    pub fn sign(&self, message: &str) -> String {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&self.mac_key)
            .expect("HMAC takes keys of any length");
        mac.update(message.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `signature` is [`Cipher::sign`] of `message`, compared in constant time.
    pub fn verify(&self, message: &str, signature: &str) -> bool {
        use hmac::Mac as _;
        let Ok(sig) = hex::decode(signature) else { return false };
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&self.mac_key)
            .expect("HMAC takes keys of any length");
        mac.update(message.as_bytes());
        mac.verify_slice(&sig).is_ok()
    }

    pub fn decrypt(&self, context: &str, stored: &str) -> Result<String, SecretsError> {
        let raw = stored
            .strip_prefix(PREFIX)
            .and_then(|b| STANDARD.decode(b).ok())
            .filter(|r| r.len() >= 24 + 16)
            .ok_or(SecretsError::Decrypt)?;
        let (nonce, ct) = raw.split_at(24);
        let plain = self
            .aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: context.as_bytes() })
            .map_err(|_| SecretsError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| SecretsError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let c = Cipher::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let ct = c.encrypt("env:p1:DB", "postgres://secret");
        assert!(!ct.contains("secret"));
        assert_eq!(c.decrypt("env:p1:DB", &ct).unwrap(), "postgres://secret");
        assert!(c.decrypt("env:p2:DB", &ct).is_err(), "bound to its context");
        // The same file yields the same key.
        let c2 = Cipher::load_or_create(&path).unwrap();
        assert_eq!(c2.decrypt("env:p1:DB", &ct).unwrap(), "postgres://secret");
        let other = Cipher::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        assert!(other.decrypt("env:p1:DB", &ct).is_err());
        assert!(Cipher::from_base64("short").is_err());
    }
}
