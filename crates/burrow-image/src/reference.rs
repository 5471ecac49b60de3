//! Image references, parsed and normalised as Docker does: `ubuntu` is
//! `docker.io/library/ubuntu:latest`; a first component with a `.` or `:`, or `localhost`, names
//! the registry.

use std::fmt;
use std::str::FromStr;

use crate::{Digest, Error};

pub const DOCKER_HUB: &str = "docker.io";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`, `127.0.0.1:5000`.
    pub registry: String,
    /// `library/ubuntu`, `org/app`.
    pub repository: String,
    /// `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// What to ask the registry's manifest endpoint for: the digest if there is one.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The host the API is served on (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Reference, Error> {
        let bad = |why| Error::BadReference {
            reference: s.to_owned(),
            why,
        };
        if s.is_empty() || s.len() > 512 {
            return Err(bad("a reference is 1 to 512 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(bad)?)),
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && !t.starts_with(['.', '-'])
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(bad(
                    "a tag is up to 128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        if registry.is_empty()
            || registry.contains("..")
            || !registry.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '[')
            || !registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        {
            return Err(bad("bad registry host"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad(
                "a repository is lower-case [a-z0-9._-] components separated by /",
            ));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn references_normalise_like_docker() {
        assert_eq!(norm("ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(norm("ubuntu:24.04"), "docker.io/library/ubuntu:24.04");
        assert_eq!(norm("org/app"), "docker.io/org/app:latest");
        assert_eq!(norm("ghcr.io/o/a:v1"), "ghcr.io/o/a:v1");
        assert_eq!(norm("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(norm("127.0.0.1:5000/x/y:t"), "127.0.0.1:5000/x/y:t");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            norm(&format!("busybox@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        let r: Reference = "localhost:5000/x:1".parse().unwrap();
        assert_eq!(r.api_host(), "localhost:5000");
        assert_eq!(r.manifest_ref(), "1");
    }

    #[test]
    fn bad_references_say_why() {
        for bad in [
            "",
            "UPPER",
            "a//b",
            "x:",
            "x:-t",
            "x@sha256:12",
            "../x",
            "a/b:t/c",
        ] {
            let e = bad.parse::<Reference>().unwrap_err();
            assert_eq!(e.code(), "bad_reference", "{bad}: {e}");
        }
    }
}
