//! Content digests (`sha256:<64 hex>`, the only algorithm registries use today) and a reader that
//! hashes and counts what passes through it.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A `sha256:` digest, validated: 64 lower-case hex digits, so it is safe as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hash(Sha256::digest(bytes).into())
    }

    pub(crate) fn from_hash(hash: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, as `ls` shows ids.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

impl FromStr for Digest {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Digest, &'static str> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err("only sha256 digests are supported");
        };
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("a sha256 digest is 64 lower-case hex digits");
        }
        Ok(Digest(s.to_owned()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes everything read through it and counts the bytes; reading past `max` bytes is an
/// error (and sets [`HashingReader::over`]) so a decompression bomb stops at the limit.
pub(crate) struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    pub count: u64,
    max: u64,
    pub over: bool,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, max: u64) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
            count: 0,
            max,
            over: false,
        }
    }

    pub fn digest(self) -> Digest {
        Digest::from_hash(self.hash.finalize().into())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.max {
            self.over = true;
            return Err(io::Error::other("size limit"));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Incremental sha256 for bytes that arrive in chunks (a download).
pub(crate) struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Hasher(Sha256::new())
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes)
    }
    pub fn finish(self) -> Digest {
        Digest::from_hash(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_validated() {
        let d = Digest::of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.as_str().parse::<Digest>().unwrap(), d);
        assert!("sha256:../../etc".parse::<Digest>().is_err());
        assert!("sha512:00".parse::<Digest>().is_err());
        assert!(format!("sha256:{}", "A".repeat(64))
            .parse::<Digest>()
            .is_err());
    }
}
