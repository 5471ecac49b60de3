//! API keys: generated from the OS's randomness, shown once, stored only as a SHA-256 hash.

use rand::{distributions::Alphanumeric, Rng};
use sha2::{Digest, Sha256};

/// Keys we issue look like `burrow_<40 hex>`; any string of 32 or more characters is accepted as
/// an operator-chosen admin key (`BURROW_ADMIN_KEY`).
pub const KEY_PREFIX: &str = "burrow_";
pub const MIN_KEY_LEN: usize = 32;

pub fn generate_key() -> String {
    let bytes: [u8; 20] = rand::random();
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// A key in E2B's shape (`e2b_<40 hex>`), for teams that point the e2b SDKs at burrow.
pub fn generate_e2b_key() -> String {
    let bytes: [u8; 20] = rand::random();
    format!("e2b_{}", hex::encode(bytes))
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// What may be shown of a key later (listings, logs) without revealing it.
pub fn key_display_prefix(key: &str) -> String {
    key.chars().take(12).collect()
}

/// Random lowercase id that is also a valid DNS label (ports are routed as `<port>-<id>.<domain>`).
pub fn new_id(len: usize) -> String {
    let mut rng = rand::thread_rng();
    let first = rng.gen_range(b'a'..=b'z') as char;
    let rest: String = (&mut rng)
        .sample_iter(&Alphanumeric)
        .map(|b| (b as char).to_ascii_lowercase())
        .take(len - 1)
        .collect();
    format!("{first}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_prefixed_and_hash_stably() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 40);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
        let e = generate_e2b_key();
        assert!(
            e.starts_with("e2b_") && e.len() == 44 && e[4..].bytes().all(|b| b.is_ascii_hexdigit())
        );
    }

    #[test]
    fn ids_are_dns_labels() {
        for _ in 0..100 {
            let id = new_id(20);
            assert_eq!(id.len(), 20);
            assert!(id.chars().next().unwrap().is_ascii_lowercase());
            assert!(id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        }
    }
}
