//! Where client commands find the server: named profiles in the CLI's config file
//! (`$XDG_CONFIG_HOME/burrow/config.json` or `~/.config/burrow/config.json`, mode 0600), each a
//! server URL and API key. `burrow up` saves its own profile and says so; a second server gets a
//! profile of its own instead of replacing the first. `--profile` / `BURROW_PROFILE` pick one,
//! else the current one (`burrow profile use`); `BURROW_URL` / `BURROW_API_KEY` override the URL
//! and key of whichever is picked.

use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";
/// The name `burrow up` gives the first server's profile.
pub const DEFAULT_PROFILE: &str = "default";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config {
    /// The profile client commands use when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    /// The single server of configs written before profiles; read once, saved as `default`.
    #[serde(default, skip_serializing)]
    url: Option<String>,
    #[serde(default, skip_serializing)]
    api_key: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Profile {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The data directory of the server `burrow up` saved this for: a restart of the same
    /// server updates this profile rather than making another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

/// The profile named on the command line (`--profile` or `BURROW_PROFILE`), set once in `main`.
static SELECTED: OnceLock<Option<String>> = OnceLock::new();

pub fn select(profile: Option<String>) {
    let _ = SELECTED.set(profile.filter(|p| !p.is_empty()));
}

pub fn selected() -> Option<String> {
    SELECTED.get().cloned().flatten()
}

pub fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("burrow").join("config.json"))
}

fn config_display() -> String {
    path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the CLI config".into())
}

pub fn load() -> Config {
    let mut cfg: Config = path()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(url) = cfg.url.take() {
        let key = cfg.api_key.take();
        cfg.profiles
            .entry(DEFAULT_PROFILE.into())
            .or_insert(Profile {
                url,
                api_key: key,
                data_dir: None,
            });
        cfg.current.get_or_insert_with(|| DEFAULT_PROFILE.into());
    }
    cfg
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

fn names(cfg: &Config) -> String {
    if cfg.profiles.is_empty() {
        return "there are none yet (`burrow up` saves one)".into();
    }
    let list: Vec<String> = cfg.profiles.keys().map(|k| format!("{k:?}")).collect();
    format!("the profiles are {}", list.join(", "))
}

/// The profile a client command uses: the named one (which must exist), else the current one.
pub fn pick(cfg: &Config) -> Result<Option<(String, Profile)>> {
    if let Some(name) = selected() {
        return match cfg.profiles.get(&name) {
            Some(p) => Ok(Some((name, p.clone()))),
            None => bail!(
                "no profile {name:?} in {}: {}",
                config_display(),
                names(cfg)
            ),
        };
    }
    Ok(cfg
        .current
        .as_ref()
        .and_then(|c| cfg.profiles.get(c).map(|p| (c.clone(), p.clone()))))
}

/// The server URL and API key for client commands.
pub fn client() -> Result<burrow_client::Client> {
    let env = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    if let (Some(url), Some(key)) = (env("BURROW_URL"), env("BURROW_API_KEY")) {
        // Both given: no profile is needed, so none is looked up.
        return Ok(burrow_client::Client::new(&url, &key));
    }
    let cfg = load();
    let picked = pick(&cfg)?;
    let url = env("BURROW_URL")
        .or_else(|| picked.as_ref().map(|(_, p)| p.url.clone()))
        .unwrap_or_else(|| DEFAULT_URL.into());
    let Some(key) =
        env("BURROW_API_KEY").or_else(|| picked.as_ref().and_then(|(_, p)| p.api_key.clone()))
    else {
        match picked {
            Some((name, _)) => bail!(
                "no API key in profile {name:?} of {}: set BURROW_API_KEY (the admin key is printed at the server's first start)",
                config_display()
            ),
            None => bail!(
                "no API key: set BURROW_API_KEY, or run `burrow up` on this machine once so it saves a profile in {}",
                config_display()
            ),
        }
    };
    Ok(burrow_client::Client::new(&url, &key))
}

/// What `burrow up` did to the CLI's config.
pub struct Saved {
    pub path: PathBuf,
    pub name: String,
    /// The current profile after saving (this one, or the one that was current before).
    pub current: String,
    /// Whether the profile holds an API key.
    pub has_key: bool,
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

/// Saves (or updates) the profile of the server `burrow up` just started: the named profile,
/// else the one already saved for this data directory, else `default`, else `local-<port>`.
/// It becomes current only when no other profile is.
pub fn save_server(
    name: Option<&str>,
    url: &str,
    port: u16,
    key: Option<String>,
    data_dir: &Path,
) -> Result<Saved> {
    let mut cfg = load();
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            // This server's own: saved for its data directory, or (a config from before
            // profiles) saved with no directory for its URL.
            let mine = cfg
                .profiles
                .iter()
                .find(|(_, p)| match p.data_dir.as_deref() {
                    Some(d) => same_dir(d, data_dir),
                    None => p.url == url,
                });
            match mine {
                Some((n, _)) => n.clone(),
                None => {
                    let free = |n: &str| !cfg.profiles.contains_key(n);
                    let base = format!("local-{port}");
                    [DEFAULT_PROFILE.to_string(), base.clone()]
                        .into_iter()
                        .chain((2..).map(|i| format!("{base}-{i}")))
                        .find(|n| free(n))
                        .unwrap_or(base)
                }
            }
        }
    };
    let previous = cfg.profiles.remove(&name);
    let same_server = previous
        .as_ref()
        .is_some_and(|p| match p.data_dir.as_deref() {
            Some(d) => same_dir(d, data_dir),
            None => p.url == url,
        });
    // A restart makes no new key: keep the one saved for this server.
    let api_key = key.or_else(|| previous.filter(|_| same_server).and_then(|p| p.api_key));
    let has_key = api_key.is_some();
    cfg.profiles.insert(
        name.clone(),
        Profile {
            url: url.to_string(),
            api_key,
            data_dir: Some(std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.into())),
        },
    );
    let current_ok = cfg
        .current
        .as_ref()
        .is_some_and(|c| cfg.profiles.contains_key(c));
    if !current_ok {
        cfg.current = Some(name.clone());
    }
    let current = cfg.current.clone().unwrap_or_else(|| name.clone());
    let path = save(&cfg)?;
    Ok(Saved {
        path,
        name,
        current,
        has_key,
    })
}

/// `burrow profile use NAME`.
pub fn use_profile(name: &str) -> Result<()> {
    let mut cfg = load();
    if !cfg.profiles.contains_key(name) {
        bail!(
            "no profile {name:?} in {}: {}",
            config_display(),
            names(&cfg)
        );
    }
    cfg.current = Some(name.to_string());
    save(&cfg)?;
    Ok(())
}

/// `burrow profile rm NAME`.
pub fn remove_profile(name: &str) -> Result<()> {
    let mut cfg = load();
    if cfg.profiles.remove(name).is_none() {
        bail!(
            "no profile {name:?} in {}: {}",
            config_display(),
            names(&cfg)
        );
    }
    if cfg.current.as_deref() == Some(name) {
        cfg.current = None;
    }
    save(&cfg)?;
    Ok(())
}
