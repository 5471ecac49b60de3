//! Where client commands find the server: `BURROW_URL` / `BURROW_API_KEY`, else the config file
//! that `burrow up` writes on first start (`$XDG_CONFIG_HOME/burrow/config.json` or
//! `~/.config/burrow/config.json`, mode 0600).

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub api_key: Option<String>,
}

pub fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("burrow").join("config.json"))
}

pub fn load() -> Config {
    path()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub fn save(cfg: &Config) -> Result<PathBuf> {
    let p = path().context("no HOME or XDG_CONFIG_HOME to keep the CLI config in")?;
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = p.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&serde_json::to_vec_pretty(cfg)?)?;
    }
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// The server URL and API key for client commands.
pub fn client() -> Result<burrow_client::Client> {
    let file = load();
    let url = std::env::var("BURROW_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .or(file.url)
        .unwrap_or_else(|| DEFAULT_URL.into());
    let Some(key) = std::env::var("BURROW_API_KEY")
        .ok()
        .filter(|s| !s.is_empty())
        .or(file.api_key)
    else {
        bail!("no API key: set BURROW_API_KEY, or run `burrow up` on this machine once so it writes {}",
            path().map(|p| p.display().to_string()).unwrap_or_else(|| "the config".into()));
    };
    Ok(burrow_client::Client::new(&url, &key))
}
