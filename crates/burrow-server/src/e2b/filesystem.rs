//! envd's `filesystem.Filesystem` service over burrow's guest file operations. Directory
//! watching (WatchDir and the polling watchers) compares listings of the watched tree, taken by
//! the facade through the guest: changes inside one poll interval coalesce, and a rename shows as
//! a remove and a create (see docs/e2b.md).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use burrow_node::guest::GuestClient;
use burrow_types::{FileKind, FileStat};
use serde::Deserialize;
use serde_json::json;

use super::connect::{self, Code, RpcError};
use super::{lock, Envd};
use crate::api::AppState;

/// Entries one listing (ListDir or a watcher's snapshot) may hold, so a huge tree cannot pin
/// the server's memory.
const MAX_ENTRIES: usize = 50_000;
/// How often WatchDir looks for changes.
const WATCH_POLL: Duration = Duration::from_millis(250);
/// Polling watchers per sandbox.
const MAX_WATCHERS: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct PathRequest {
    path: String,
    depth: Option<u32>,
    recursive: bool,
    include_entry: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct MoveRequest {
    source: String,
    destination: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct WatcherRequest {
    watcher_id: String,
}

/// `POST /filesystem.Filesystem/{method}`.
pub async fn call(
    State(s): State<AppState>,
    Path(method): Path<String>,
    envd: Envd,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match axum::body::to_bytes(body, connect::MAX_MESSAGE).await {
        Ok(b) => b,
        Err(e) => return RpcError::invalid(format!("request body: {e}")).into_response(),
    };
    if method == "WatchDir" {
        return match connect::request::<PathRequest>(&headers, &body) {
            Ok(req) => watch_dir(envd, &headers, req).await,
            Err(e) => connect::stream_error(e),
        };
    }
    let r = async {
        match method.as_str() {
            "Stat" => {
                let req: PathRequest = connect::request(&headers, &body)?;
                let st = envd.guest.stat(envd.path(&req.path)).await?;
                Ok(json!({"entry": entry_info(&st)}))
            }
            "MakeDir" => {
                let req: PathRequest = connect::request(&headers, &body)?;
                let st = envd
                    .guest
                    .make_dir(envd.path(&req.path), Some(envd.user.clone()))
                    .await?;
                Ok(json!({"entry": entry_info(&st)}))
            }
            "Move" => {
                let req: MoveRequest = connect::request(&headers, &body)?;
                let st = envd
                    .guest
                    .rename(envd.path(&req.source), envd.path(&req.destination))
                    .await?;
                Ok(json!({"entry": entry_info(&st)}))
            }
            "Remove" => {
                let req: PathRequest = connect::request(&headers, &body)?;
                envd.guest.remove(envd.path(&req.path), true).await?;
                Ok(json!({}))
            }
            "ListDir" => {
                let req: PathRequest = connect::request(&headers, &body)?;
                let path = envd.path(&req.path);
                let root = envd.guest.stat(path.clone()).await?;
                if root.kind != FileKind::Dir {
                    return Err(RpcError::invalid(format!("{path} is not a directory")));
                }
                let entries = walk(&envd.guest, &path, req.depth.unwrap_or(1).max(1)).await?;
                let entries: Vec<_> = entries.iter().map(entry_info).collect();
                Ok(json!({ "entries": entries }))
            }
            "CreateWatcher" => {
                let req: PathRequest = connect::request(&headers, &body)?;
                let id = create_watcher(&s, &envd, req).await?;
                Ok(json!({ "watcherId": id }))
            }
            "GetWatcherEvents" => {
                let req: WatcherRequest = connect::request(&headers, &body)?;
                let events = watcher_events(&s, &envd, &req.watcher_id).await?;
                Ok(json!({ "events": events }))
            }
            "RemoveWatcher" => {
                let req: WatcherRequest = connect::request(&headers, &body)?;
                let mut w = lock(&s.e2b.watchers.0);
                match w.get(&req.watcher_id) {
                    Some(x) if x.sandbox == envd.rec.id => {
                        w.remove(&req.watcher_id);
                        Ok(json!({}))
                    }
                    _ => Err(RpcError::new(Code::NotFound, "no such watcher")),
                }
            }
            other => Err(RpcError::new(
                Code::Unimplemented,
                format!("filesystem.Filesystem/{other} is not a method burrow's E2B facade serves"),
            )),
        }
    }
    .await;
    match r {
        Ok(v) => connect::unary(&v),
        Err(e) => e.into_response(),
    }
}

/// envd's `EntryInfo` for a stat.
pub fn entry_info(st: &FileStat) -> serde_json::Value {
    let (ty, ch) = match st.kind {
        FileKind::File => ("FILE_TYPE_FILE", '-'),
        FileKind::Dir => ("FILE_TYPE_DIRECTORY", 'd'),
        FileKind::Symlink => ("FILE_TYPE_SYMLINK", 'l'),
        FileKind::Other => ("FILE_TYPE_UNSPECIFIED", '?'),
    };
    let mut v = json!({
        "name": st.name,
        "type": ty,
        "path": st.path,
        // int64 is a string in protobuf JSON.
        "size": st.size.to_string(),
        "mode": st.mode,
        "permissions": permissions(ch, st.mode),
        "owner": owner_name(st.uid),
        "group": owner_name(st.gid),
        "modifiedTime": rfc3339(st.modified),
    });
    if let Some(t) = &st.symlink_target {
        v["symlinkTarget"] = json!(t);
        v["isSymlink"] = json!(true);
    }
    v
}

fn permissions(kind: char, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// Names of burrow's image users (`/etc/passwd` of the `system` image); others by number.
fn owner_name(id: u32) -> String {
    match id {
        0 => "root".into(),
        1000 => "user".into(),
        65534 => "nobody".into(),
        n => n.to_string(),
    }
}

fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Every entry under `path` down to `depth` levels (1 = the directory's own entries).
async fn walk(guest: &GuestClient, path: &str, depth: u32) -> Result<Vec<FileStat>, RpcError> {
    let mut out = Vec::new();
    let mut level = vec![path.to_string()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            let mut cursor = None;
            loop {
                let (entries, more) = match guest.list_dir(dir.clone(), cursor, 1000).await {
                    Ok(x) => x,
                    // A directory removed or unreadable mid-walk is skipped below the top.
                    Err(e) if dir != path => {
                        tracing::debug!(error = %e, dir, "skipping a directory");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                for e in entries {
                    if e.kind == FileKind::Dir {
                        next.push(e.path.clone());
                    }
                    out.push(e);
                    if out.len() > MAX_ENTRIES {
                        return Err(RpcError::new(
                            Code::ResourceExhausted,
                            format!("{path} has more than {MAX_ENTRIES} entries at this depth"),
                        ));
                    }
                }
                match more {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    Ok(out)
}

/// One state of a watched tree: path → (kind, size, mtime, mode).
type Snapshot = BTreeMap<String, (FileStat, (u64, i64, u32))>;

async fn snapshot(guest: &GuestClient, path: &str, recursive: bool) -> Result<Snapshot, RpcError> {
    let depth = if recursive { 64 } else { 1 };
    Ok(walk(guest, path, depth)
        .await?
        .into_iter()
        .map(|e| {
            let key = (e.size, e.modified, e.mode);
            (e.path.clone(), (e, key))
        })
        .collect())
}

/// envd `FilesystemEvent`s for the change from `old` to `new` (names relative to `root`).
fn diff(root: &str, old: &Snapshot, new: &Snapshot, include_entry: bool) -> Vec<serde_json::Value> {
    let rel = |p: &str| {
        p.strip_prefix(root)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(p)
            .to_string()
    };
    let ev = |p: &str, ty: &str, st: Option<&FileStat>| {
        let mut v = json!({"name": rel(p), "type": ty});
        if let (true, Some(st)) = (include_entry, st) {
            v["entry"] = entry_info(st);
        }
        v
    };
    let mut out = Vec::new();
    for (p, (st, key)) in new {
        match old.get(p) {
            None => {
                out.push(ev(p, "EVENT_TYPE_CREATE", Some(st)));
                if st.kind == FileKind::File && st.size > 0 {
                    out.push(ev(p, "EVENT_TYPE_WRITE", Some(st)));
                }
            }
            Some((_, old_key)) if old_key != key => {
                let ty = if old_key.0 == key.0 && old_key.1 == key.1 {
                    "EVENT_TYPE_CHMOD"
                } else {
                    "EVENT_TYPE_WRITE"
                };
                out.push(ev(p, ty, Some(st)));
            }
            Some(_) => {}
        }
    }
    for p in old.keys().filter(|p| !new.contains_key(*p)) {
        out.push(ev(p, "EVENT_TYPE_REMOVE", None));
    }
    out
}

async fn watch_root(envd: &Envd, path: &str) -> Result<String, RpcError> {
    let path = envd.path(path);
    let st = envd.guest.stat(path.clone()).await?;
    if st.kind != FileKind::Dir {
        return Err(RpcError::invalid(format!("{path} is not a directory")));
    }
    Ok(path)
}

async fn watch_dir(envd: Envd, headers: &HeaderMap, req: PathRequest) -> Response {
    let root = match watch_root(&envd, &req.path).await {
        Ok(r) => r,
        Err(e) => return connect::stream_error(e),
    };
    let mut last = match snapshot(&envd.guest, &root, req.recursive).await {
        Ok(s) => s,
        Err(e) => return connect::stream_error(e),
    };
    let keepalive = connect::keepalive(headers).unwrap_or(Duration::from_secs(30));
    let (tx, resp) = connect::streaming();
    tokio::spawn(async move {
        if !tx.send(&json!({"start": {}})).await {
            return;
        }
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(WATCH_POLL).await;
            if tx.closed() {
                return;
            }
            let now = match snapshot(&envd.guest, &root, req.recursive).await {
                Ok(s) => s,
                Err(e) => {
                    // The watched directory is gone (or the sandbox is): the stream ends.
                    tx.end(Some(e)).await;
                    return;
                }
            };
            let events = diff(&root, &last, &now, req.include_entry);
            last = now;
            if events.is_empty() {
                quiet += WATCH_POLL;
                if quiet >= keepalive {
                    quiet = Duration::ZERO;
                    if !tx.send(&json!({"keepalive": {}})).await {
                        return;
                    }
                }
                continue;
            }
            quiet = Duration::ZERO;
            for e in events {
                if !tx.send(&json!({ "filesystem": e })).await {
                    return;
                }
            }
        }
    });
    resp
}

/// The polling watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher).
#[derive(Default)]
pub struct Watchers(Mutex<HashMap<String, Watcher>>);

pub struct Watcher {
    sandbox: String,
    root: String,
    recursive: bool,
    include_entry: bool,
    last: Snapshot,
}

impl Watchers {
    pub fn forget(&self, sandbox: &str) {
        lock(&self.0).retain(|_, w| w.sandbox != sandbox);
    }

    pub fn sandboxes(&self) -> Vec<String> {
        lock(&self.0).values().map(|w| w.sandbox.clone()).collect()
    }
}

async fn create_watcher(s: &AppState, envd: &Envd, req: PathRequest) -> Result<String, RpcError> {
    s.e2b.sweep(s.control.store()).await;
    let root = watch_root(envd, &req.path).await?;
    let last = snapshot(&envd.guest, &root, req.recursive).await?;
    let id = crate::auth::new_id(20);
    let mut w = lock(&s.e2b.watchers.0);
    if w.values().filter(|x| x.sandbox == envd.rec.id).count() >= MAX_WATCHERS {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("a sandbox may have at most {MAX_WATCHERS} watchers; remove one first"),
        ));
    }
    w.insert(
        id.clone(),
        Watcher {
            sandbox: envd.rec.id.clone(),
            root,
            recursive: req.recursive,
            include_entry: req.include_entry,
            last,
        },
    );
    Ok(id)
}

async fn watcher_events(
    s: &AppState,
    envd: &Envd,
    id: &str,
) -> Result<Vec<serde_json::Value>, RpcError> {
    let (root, recursive) = match lock(&s.e2b.watchers.0).get(id) {
        Some(w) if w.sandbox == envd.rec.id => (w.root.clone(), w.recursive),
        _ => return Err(RpcError::new(Code::NotFound, "no such watcher")),
    };
    let now = snapshot(&envd.guest, &root, recursive).await?;
    let mut map = lock(&s.e2b.watchers.0);
    let Some(w) = map.get_mut(id) else {
        return Err(RpcError::new(Code::NotFound, "no such watcher"));
    };
    let events = diff(&w.root, &w.last, &now, w.include_entry);
    w.last = now;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(path: &str, kind: FileKind, size: u64, modified: i64) -> FileStat {
        FileStat {
            path: path.into(),
            name: path.rsplit('/').next().unwrap().into(),
            kind,
            size,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            modified,
            symlink_target: None,
        }
    }

    fn snap(entries: &[FileStat]) -> Snapshot {
        entries
            .iter()
            .map(|e| (e.path.clone(), (e.clone(), (e.size, e.modified, e.mode))))
            .collect()
    }

    #[test]
    fn diffs_become_envd_events() {
        let old = snap(&[
            st("/w/a", FileKind::File, 1, 10),
            st("/w/b", FileKind::File, 1, 10),
        ]);
        let new = snap(&[
            st("/w/a", FileKind::File, 2, 11),
            st("/w/d/c", FileKind::File, 3, 12),
        ]);
        let ev = diff("/w", &old, &new, false);
        let pairs: Vec<(String, String)> = ev
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().into(),
                    e["type"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert!(pairs.contains(&("a".into(), "EVENT_TYPE_WRITE".into())));
        assert!(pairs.contains(&("d/c".into(), "EVENT_TYPE_CREATE".into())));
        assert!(pairs.contains(&("b".into(), "EVENT_TYPE_REMOVE".into())));
    }

    #[test]
    fn entries_use_protobuf_json() {
        let v = entry_info(&st("/w/a", FileKind::File, 5, 0));
        assert_eq!(v["size"], "5");
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["owner"], "user");
        assert_eq!(v["modifiedTime"], "1970-01-01T00:00:00Z");
    }
}
