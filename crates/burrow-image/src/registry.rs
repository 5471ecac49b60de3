//! A client of the OCI distribution API (`/v2/...`): manifests and blobs, bearer-token and
//! basic auth, manifest lists resolved to this platform, every byte checked against its digest.
//!
//! Registries on loopback (`localhost`, `127.0.0.0/8`, `[::1]`) and those named in
//! [`RegistryConfig::plain_http`] are spoken to over plain HTTP, as Docker does; every other over
//! HTTPS with the system's roots.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};

use crate::digest::Hasher;
use crate::error::io_err;
use crate::spec::{
    choose, AnyManifest, Descriptor, Platform, DOCKER_LIST, DOCKER_MANIFEST, MAX_JSON, OCI_INDEX,
    OCI_MANIFEST,
};
use crate::{Digest, Error, Reference, Result};

#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Credentials by registry (`ghcr.io`, `localhost:5000`).
    pub credentials: HashMap<String, Credentials>,
    /// Registries besides loopback ones reached over plain HTTP.
    pub plain_http: Vec<String>,
    /// The platform manifest lists are resolved to (this host's by default).
    pub platform: Platform,
    /// Connecting and each read; a stalled download fails instead of hanging.
    pub timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            credentials: HashMap::new(),
            plain_http: vec![],
            platform: Platform::host(),
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: Arc<RegistryConfig>,
    /// Bearer tokens by `registry/repository`.
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<RegistryClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .user_agent(concat!("burrow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::io("making the registry client", std::io::Error::other(e)))?;
        Ok(RegistryClient {
            http,
            config: Arc::new(config),
            tokens: Arc::default(),
        })
    }

    pub fn platform(&self) -> &Platform {
        &self.config.platform
    }

    fn base(&self, r: &Reference) -> String {
        let host = r.api_host();
        let bare = host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        let loopback = bare == "localhost"
            || bare == "[::1]"
            || bare
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback());
        let scheme = if loopback || self.config.plain_http.iter().any(|h| h == &r.registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}/v2/{}", r.repository)
    }

    /// A GET of `path` under the repository, authenticating as the registry asks (once).
    async fn get(&self, r: &Reference, path: &str, accept: Option<&str>) -> Result<Response> {
        let url = format!("{}/{path}", self.base(r));
        let key = r.name();
        let creds = self.config.credentials.get(&r.registry);
        let mut answered_challenge = false;
        loop {
            let mut req = self.http.get(&url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            let token = self
                .tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned();
            if let Some(t) = token {
                req = req.bearer_auth(t);
            } else if let (Some(c), true) = (creds, answered_challenge) {
                req = req.basic_auth(&c.username, Some(&c.password));
            }
            let resp = req.send().await.map_err(|e| self.unreachable(r, e))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if answered_challenge {
                return Err(self.auth_error(r));
            }
            answered_challenge = true;
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let (scheme, params) = parse_challenge(&challenge);
            if scheme.eq_ignore_ascii_case("bearer") {
                let token = self.fetch_token(r, &params).await?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), token);
            } else if creds.is_none() {
                return Err(Error::AuthRequired {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                });
            }
        }
    }

    fn auth_error(&self, r: &Reference) -> Error {
        if self.config.credentials.contains_key(&r.registry) {
            Error::AuthFailed {
                registry: r.registry.clone(),
                repository: r.repository.clone(),
            }
        } else {
            Error::AuthRequired {
                registry: r.registry.clone(),
                repository: r.repository.clone(),
            }
        }
    }

    fn unreachable(&self, r: &Reference, e: reqwest::Error) -> Error {
        Error::Unreachable {
            registry: r.registry.clone(),
            source: e,
        }
    }

    /// The token endpoint named by a `Bearer` challenge, asked with our credentials if any.
    async fn fetch_token(&self, r: &Reference, params: &HashMap<String, String>) -> Result<String> {
        let realm = params
            .get("realm")
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .ok_or_else(|| Error::Registry {
                registry: r.registry.clone(),
                status: 401,
                what: "a bearer challenge without a realm".into(),
            })?;
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", r.repository));
        let mut query = vec![("scope", scope)];
        if let Some(s) = params.get("service") {
            query.push(("service", s.clone()));
        }
        let mut req = self.http.get(realm.as_str()).query(&query);
        if let Some(c) = self.config.credentials.get(&r.registry) {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| self.unreachable(r, e))?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(self.auth_error(r));
        }
        if !resp.status().is_success() {
            return Err(Error::Registry {
                registry: r.registry.clone(),
                status: resp.status().as_u16(),
                what: "the token request".into(),
            });
        }
        let body = read_limited(resp, MAX_JSON, r, "a token").await?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| Error::Corrupt {
            what: format!("token from {}", r.registry),
            why: e.to_string(),
        })?;
        t.token.or(t.access_token).ok_or_else(|| Error::Corrupt {
            what: format!("token from {}", r.registry),
            why: "no token in the answer".into(),
        })
    }

    /// The platform manifest of `r`: a manifest list or index is resolved to our platform.
    /// Returns its bytes, digest and parsed form.
    pub(crate) async fn resolve(&self, r: &Reference) -> Result<(Vec<u8>, Digest, AnyManifest)> {
        let (bytes, digest, m) = self
            .manifest(r, &r.manifest_ref(), r.digest.as_ref())
            .await?;
        let Some(list) = &m.manifests else {
            return Ok((bytes, digest, m));
        };
        let chosen = choose(list, &self.config.platform, &r.to_string())?;
        let (bytes, digest, m) = self
            .manifest(r, chosen.digest.as_str(), Some(&chosen.digest))
            .await?;
        if m.manifests.is_some() {
            return Err(Error::Unsupported {
                what: "manifest",
                value: "an index inside an index".into(),
            });
        }
        Ok((bytes, digest, m))
    }

    async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<(Vec<u8>, Digest, AnyManifest)> {
        let resp = self
            .get(r, &format!("manifests/{reference}"), Some(MANIFEST_TYPES))
            .await?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Err(Error::NotFound(r.to_string())),
            StatusCode::FORBIDDEN => return Err(self.auth_error(r)),
            s => {
                return Err(Error::Registry {
                    registry: r.registry.clone(),
                    status: s.as_u16(),
                    what: format!("manifest {reference}"),
                })
            }
        }
        let headers = resp.headers().clone();
        let bytes = read_limited(resp, MAX_JSON, r, "a manifest").await?;
        let digest = Digest::of(&bytes);
        // By digest: the bytes must be those. By tag: the registry's own digest header, if it
        // sends one, must agree with the bytes.
        let claimed = expected.cloned().or_else(|| header_digest(&headers));
        if let Some(want) = claimed {
            if want != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest {reference} of {r}"),
                    expected: want,
                    actual: digest,
                });
            }
        }
        let m: AnyManifest = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            what: format!("manifest of {r}"),
            why: e.to_string(),
        })?;
        let media = m
            .media_type
            .clone()
            .or_else(|| {
                headers
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
            })
            .unwrap_or_default();
        let known = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];
        if !known.contains(&media.as_str()) && m.manifests.is_none() && m.layers.is_none() {
            return Err(Error::Unsupported {
                what: "manifest type",
                value: media,
            });
        }
        Ok((bytes, digest, m))
    }

    /// A blob small enough to hold in memory (an image config), verified.
    pub(crate) async fn fetch_small_blob(&self, r: &Reference, d: &Descriptor) -> Result<Vec<u8>> {
        if d.size > MAX_JSON {
            return Err(Error::LimitExceeded {
                limit: "max_config_bytes",
                max: MAX_JSON,
                what: format!("config {}", d.digest),
            });
        }
        let resp = self.blob(r, d).await?;
        let bytes = read_limited(resp, MAX_JSON, r, "a config").await?;
        let actual = Digest::of(&bytes);
        if actual != d.digest {
            return Err(Error::DigestMismatch {
                what: format!("config of {r}"),
                expected: d.digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    async fn blob(&self, r: &Reference, d: &Descriptor) -> Result<Response> {
        let resp = self.get(r, &format!("blobs/{}", d.digest), None).await?;
        match resp.status() {
            s if s.is_success() => Ok(resp),
            StatusCode::NOT_FOUND => Err(Error::Corrupt {
                what: format!("image {r}"),
                why: format!("the registry has no blob {}", d.digest),
            }),
            StatusCode::FORBIDDEN => Err(self.auth_error(r)),
            s => Err(Error::Registry {
                registry: r.registry.clone(),
                status: s.as_u16(),
                what: format!("blob {}", d.digest),
            }),
        }
    }

    /// Streams the blob `d` into a new file at `dest`, hashing as it goes; calls `on_bytes` with
    /// the count so far. More bytes than the descriptor says, fewer, or other bytes are errors
    /// (the caller removes `dest`).
    pub(crate) async fn download_blob(
        &self,
        r: &Reference,
        d: &Descriptor,
        dest: &Path,
        on_bytes: &mut (dyn FnMut(u64) + Send),
    ) -> Result<()> {
        let resp = self.blob(r, d).await?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(io_err("making a download file"))?;
        let mut hash = Hasher::new();
        let mut n = 0u64;
        let what = format!("layer {} of {r}", d.digest);
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::Corrupt {
                what: what.clone(),
                why: format!("download cut short after {n} bytes: {e}"),
            })?;
            n += chunk.len() as u64;
            if n > d.size {
                return Err(Error::Corrupt {
                    what,
                    why: format!("more than the {} bytes its manifest says", d.size),
                });
            }
            hash.update(&chunk);
            file.write_all(&chunk)
                .map_err(io_err("writing a download"))?;
            on_bytes(n);
        }
        if n != d.size {
            return Err(Error::Corrupt {
                what,
                why: format!("{n} bytes, its manifest says {}", d.size),
            });
        }
        let actual = hash.finish();
        if actual != d.digest {
            return Err(Error::DigestMismatch {
                what,
                expected: d.digest.clone(),
                actual,
            });
        }
        file.sync_all().map_err(io_err("writing a download"))?;
        Ok(())
    }
}

fn header_digest(h: &HeaderMap) -> Option<Digest> {
    h.get("docker-content-digest")?.to_str().ok()?.parse().ok()
}

async fn read_limited(resp: Response, max: u64, r: &Reference, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Corrupt {
            what: format!("{what} from {}", r.registry),
            why: e.to_string(),
        })?;
        if out.len() as u64 + chunk.len() as u64 > max {
            return Err(Error::LimitExceeded {
                limit: "max_manifest_bytes",
                max,
                what: format!("{what} from {}", r.registry),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// `Bearer realm="...",service="...",scope="..."` → (`Bearer`, params).
fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (v, after) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(k, v.to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    (scheme.to_owned(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!(s, "Basic");
        assert_eq!(p["realm"], "basic-realm");
    }
}
