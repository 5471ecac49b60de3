//! The node's image store, `<data>/images/`:
//!
//! ```text
//! blobs/sha256/<hex>    manifests and image configs, by digest
//! layers/sha256/<hex>/  each layer unpacked once, named by its diff_id (the sha256 of the
//!                       uncompressed tar, so a pulled and an imported copy of a layer are one)
//! tmp/                  everything being written; emptied when the store opens
//! index.json            the images (references, layers, config) and the layers' sizes
//! ```
//!
//! **All or nothing.** A blob or layer is written under `tmp/` and renamed into place only when
//! whole and verified; an image becomes visible when `index.json` is replaced (write, fsync,
//! rename) naming it. A pull or import that fails removes the layers it added that no image
//! references, so the store is as it was. After a crash, opening the store empties `tmp/` and
//! removes layers and blobs `index.json` does not reference.
//!
//! **Sharing.** A layer is referenced by every image that lists its diff_id; removing an image
//! removes the layers no other image references and no pull in progress has pinned.
//!
//! One `Store` owns the directory (the server's; the CLI goes through the API). Its state sits
//! behind one mutex, held only for bookkeeping, never while a layer downloads or unpacks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::registry::RegistryClient;
use crate::spec::{ConfigFile, ImageConfig, Platform};
use crate::unpack::{self, LayerLimits};
use crate::{Digest, Error, Reference, Result};

/// Limits of the store's inputs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub layer: LayerLimits,
    /// Bytes of one downloaded or imported blob (a compressed layer).
    pub max_blob_bytes: u64,
    /// Files in one imported archive.
    pub max_import_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            layer: LayerLimits::default(),
            max_blob_bytes: 16 << 30,
            max_import_files: 100_000,
        }
    }
}

/// One image as `ls` and `inspect` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The digest of the image's config: the same image has the same id wherever it came from.
    pub id: Digest,
    /// Normalised references naming it (`docker.io/library/ubuntu:24.04`); empty once its last
    /// tag moved to another image.
    pub refs: Vec<String>,
    /// The digest of the platform manifest it was pulled by (`name@<digest>` pulls it again).
    pub manifest: Option<Digest>,
    /// diff_ids, lowest layer first.
    pub layers: Vec<Digest>,
    /// Bytes of its layers, unpacked.
    pub size: u64,
    pub platform: Platform,
    pub created: Option<String>,
    pub config: ImageConfig,
    /// Unix seconds when it was stored.
    pub added_at: u64,
}

/// One stored layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub diff_id: Digest,
    pub bytes: u64,
    pub entries: u64,
    pub skipped_devices: u64,
}

/// What a pull has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub layers_total: usize,
    pub layers_done: usize,
    /// Compressed bytes of all the image's layers (those already stored count as done).
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// What `remove` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub untagged: Vec<String>,
    pub deleted: Option<Digest>,
    /// Layers no image references any more, deleted.
    pub layers_deleted: usize,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    images: Vec<ImageRecord>,
    layers: BTreeMap<Digest, LayerRecord>,
}

struct State {
    index: Index,
    /// Layers a pull or import in progress uses, by count: never deleted while pinned.
    pins: HashMap<Digest, usize>,
}

struct Inner {
    root: PathBuf,
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Clone)]
pub struct Store(Arc<Inner>);

/// The layers one pull or import has pinned and added; dropping it unpins them and removes the
/// added ones no image took (the failure path).
pub(crate) struct Ingest<'a> {
    store: &'a Store,
    pinned: Vec<Digest>,
    added: Vec<Digest>,
    tmp: Vec<PathBuf>,
}

impl Store {
    /// Opens (or makes) the store under `<data_dir>/images`, empties `tmp/` and removes what a
    /// crash left unreferenced.
    pub fn open(data_dir: &Path, limits: Limits) -> Result<Store> {
        let root = data_dir.join("images");
        for d in ["blobs/sha256", "layers/sha256", "tmp"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root.join(d))
                .map_err(io_err(format!("making {}", root.join(d).display())))?;
        }
        // Layers keep set-id files owned by host root: no host user may reach them.
        for d in ["blobs", "layers", "tmp"] {
            fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o700))
                .map_err(io_err("securing the image store"))?;
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err("reading tmp"))? {
            let p = e.map_err(io_err("reading tmp"))?.path();
            remove_any(&p).map_err(io_err(format!("removing {}", p.display())))?;
        }
        let index = match fs::read(root.join("index.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
                what: "images/index.json".into(),
                why: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index::default(),
            Err(e) => return Err(Error::io("reading images/index.json", e)),
        };
        let store = Store(Arc::new(Inner {
            root,
            limits,
            state: Mutex::new(State {
                index,
                pins: HashMap::new(),
            }),
        }));
        store.collect()?;
        Ok(store)
    }

    pub fn limits(&self) -> &Limits {
        &self.0.limits
    }

    /// The directory of a stored layer (an overlay lower directory).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.0.root.join("layers/sha256").join(diff_id.hex())
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.0.root.join("blobs/sha256").join(d.hex())
    }

    /// A fresh path under the store's `tmp/` (same filesystem, emptied when the store opens),
    /// for a caller staging an upload to import.
    pub fn scratch_path(&self, what: &str) -> PathBuf {
        self.tmp_path(what)
    }

    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        self.0
            .root
            .join("tmp")
            .join(format!("{what}-{:016x}", rand::random::<u64>()))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        self.state().index.images.clone()
    }

    pub fn layers(&self) -> Vec<LayerRecord> {
        self.state().index.layers.values().cloned().collect()
    }

    /// The image named by a reference (`ubuntu:24.04`, `name@sha256:<manifest>`), its id
    /// (`sha256:...`) or an id prefix of at least 12 hex digits.
    pub fn get(&self, name: &str) -> Result<ImageRecord> {
        let st = self.state();
        find(&st.index, name).map(|i| st.index.images[i].clone())
    }

    /// The raw image config of a stored image.
    pub fn config_json(&self, id: &Digest) -> Result<Vec<u8>> {
        fs::read(self.blob_path(id)).map_err(io_err(format!("reading config {id}")))
    }

    /// Removes `name`: a reference that is one of several of its image only untags it; the last
    /// reference, or the id, deletes the image, unless `in_use` names who uses it (then
    /// [`Error::InUse`]). Layers no image references any more are deleted.
    pub fn remove(
        &self,
        name: &str,
        in_use: &dyn Fn(&ImageRecord) -> Option<String>,
    ) -> Result<Removed> {
        let mut st = self.state();
        let i = find(&st.index, name)?;
        let by_ref = name
            .parse::<Reference>()
            .ok()
            .map(|r| r.to_string())
            .filter(|r| st.index.images[i].refs.contains(r));
        let mut removed = Removed {
            untagged: vec![],
            deleted: None,
            layers_deleted: 0,
        };
        if let Some(r) = by_ref.filter(|_| st.index.images[i].refs.len() > 1) {
            st.index.images[i].refs.retain(|x| x != &r);
            removed.untagged.push(r);
            self.write_index(&st.index)?;
            return Ok(removed);
        }
        if let Some(by) = in_use(&st.index.images[i]) {
            return Err(Error::InUse {
                image: name.to_owned(),
                by,
            });
        }
        let img = st.index.images.remove(i);
        removed.untagged = img.refs.clone();
        removed.deleted = Some(img.id.clone());
        if let Err(e) = self.write_index(&st.index) {
            st.index.images.insert(i, img);
            return Err(e);
        }
        drop(st);
        removed.layers_deleted = self.collect()?;
        Ok(removed)
    }

    /// Deletes layers and blobs no image references and nothing has pinned. Returns how many
    /// layers went.
    fn collect(&self) -> Result<usize> {
        let mut st = self.state();
        let used: HashSet<Digest> = st
            .index
            .images
            .iter()
            .flat_map(|i| i.layers.iter().cloned())
            .chain(st.pins.keys().cloned())
            .collect();
        let blobs: HashSet<String> = st
            .index
            .images
            .iter()
            .flat_map(|i| [Some(i.id.clone()), i.manifest.clone()])
            .flatten()
            .map(|d| d.hex().to_owned())
            .collect();
        let before = st.index.layers.len();
        st.index.layers.retain(|d, _| used.contains(d));
        let deleted = before - st.index.layers.len();
        if deleted > 0 {
            self.write_index(&st.index)?;
        }
        let keep: HashSet<String> = st.index.layers.keys().map(|d| d.hex().to_owned()).collect();
        drop(st);
        // Directories named by no record: deleted records, and what a crash left.
        for (dir, keep) in [("layers/sha256", &keep), ("blobs/sha256", &blobs)] {
            let dir = self.0.root.join(dir);
            for e in fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
                let e = e.map_err(io_err("reading the store"))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    remove_any(&e.path()).map_err(io_err(format!("removing {name}")))?;
                }
            }
        }
        Ok(deleted)
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let tmp = self.tmp_path("index");
        let bytes = serde_json::to_vec_pretty(index).expect("the index serialises");
        let mut f = File::create(&tmp).map_err(io_err("writing images/index.json"))?;
        let r = f
            .write_all(&bytes)
            .and_then(|()| f.sync_all())
            .and_then(|()| fs::rename(&tmp, self.0.root.join("index.json")));
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r.map_err(io_err("writing images/index.json"))
    }

    pub(crate) fn ingest(&self) -> Ingest<'_> {
        Ingest {
            store: self,
            pinned: vec![],
            added: vec![],
            tmp: vec![],
        }
    }

    /// Writes a small blob (manifest, config) under its digest.
    pub(crate) fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        let dest = self.blob_path(&d);
        if dest.exists() {
            return Ok(d);
        }
        let tmp = self.tmp_path("blob");
        let r = fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, &dest));
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r.map_err(io_err(format!("storing blob {d}")))?;
        Ok(d)
    }

    /// Pulls `reference` through `client`, calling `progress` as bytes arrive. Layers already
    /// stored are not downloaded again.
    pub async fn pull(
        &self,
        client: &RegistryClient,
        reference: &Reference,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<ImageRecord> {
        let (manifest_bytes, manifest_digest, manifest) = client.resolve(reference).await?;
        let (Some(config_desc), Some(layers)) = (manifest.config, manifest.layers) else {
            return Err(Error::Corrupt {
                what: format!("manifest of {reference}"),
                why: "no config or layers".into(),
            });
        };
        let config_bytes = client.fetch_small_blob(reference, &config_desc).await?;
        let config = parse_config(&config_bytes, &reference.to_string())?;
        let platform = config_platform(&config);
        if !client.platform().accepts(&platform) {
            return Err(Error::PlatformNotFound {
                reference: reference.to_string(),
                wanted: client.platform().to_string(),
                available: vec![platform.to_string()],
            });
        }
        if config.rootfs.diff_ids.len() != layers.len() {
            return Err(Error::Corrupt {
                what: format!("image {reference}"),
                why: format!(
                    "{} layers but {} diff_ids",
                    layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            });
        }
        let mut ingest = self.ingest();
        let mut p = Progress {
            layers_total: layers.len(),
            layers_done: 0,
            bytes_total: layers.iter().map(|l| l.size).sum(),
            bytes_done: 0,
        };
        progress(&p);
        for (desc, diff_id) in layers.iter().zip(&config.rootfs.diff_ids) {
            if !ingest.pin_if_stored(diff_id) {
                if desc.size > self.0.limits.max_blob_bytes {
                    return Err(Error::LimitExceeded {
                        limit: "max_blob_bytes",
                        max: self.0.limits.max_blob_bytes,
                        what: format!("layer {}", desc.digest),
                    });
                }
                let tmp = ingest.tmp_file("layer");
                let base = p.bytes_done;
                client
                    .download_blob(reference, desc, &tmp, &mut |n| {
                        p.bytes_done = base + n;
                        progress(&p);
                    })
                    .await?;
                let store = self.clone();
                let (diff_id, what) = (diff_id.clone(), format!("layer {}", desc.digest));
                let tmp2 = tmp.clone();
                let added = tokio::task::spawn_blocking(move || {
                    let f = File::open(&tmp2).map_err(io_err("reading a downloaded layer"))?;
                    store.add_layer(&diff_id, f, &what)
                })
                .await
                .map_err(|e| Error::io("unpacking", io::Error::other(e)))?;
                let _ = fs::remove_file(&tmp);
                ingest.added_layer(added?);
                p.bytes_done = base + desc.size;
            } else {
                p.bytes_done += desc.size;
            }
            p.layers_done += 1;
            progress(&p);
        }
        let manifest_stored = self.put_blob(&manifest_bytes)?;
        debug_assert_eq!(manifest_stored, manifest_digest);
        ingest.commit(
            &config_bytes,
            config,
            Some(manifest_digest),
            vec![reference.to_string()],
        )
    }

    /// Unpacks a layer from `input` (compressed or not) unless it is stored, checks its diff_id
    /// is `expected`, and moves it into place. Pins nothing: the caller's [`Ingest`] does.
    pub(crate) fn add_layer(
        &self,
        expected: &Digest,
        input: impl Read,
        what: &str,
    ) -> Result<(LayerRecord, bool)> {
        {
            let mut st = self.state();
            if let Some(rec) = st.index.layers.get(expected).cloned() {
                *st.pins.entry(rec.diff_id.clone()).or_default() += 1;
                return Ok((rec, false));
            }
        }
        let dir = self.tmp_path("layer");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .map_err(io_err("making a layer directory"))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(io_err("making a layer directory"))?;
        let done = (|| {
            let u = unpack::unpack(input, &dir, &self.0.limits.layer, what)?;
            if &u.diff_id != expected {
                return Err(Error::DigestMismatch {
                    what: format!("{what} (uncompressed)"),
                    expected: expected.clone(),
                    actual: u.diff_id,
                });
            }
            let dest = self.layer_dir(expected);
            match fs::rename(&dir, &dest) {
                Ok(()) => {}
                // Another pull stored the same layer first: keep theirs.
                Err(e) if dest.is_dir() => {
                    tracing::debug!(layer = %expected, error = %e, "layer stored concurrently");
                    let _ = remove_any(&dir);
                }
                Err(e) => return Err(Error::io("storing a layer", e)),
            }
            Ok(LayerRecord {
                diff_id: u.diff_id,
                bytes: u.bytes,
                entries: u.entries,
                skipped_devices: u.skipped_devices,
            })
        })();
        if done.is_err() {
            let _ = remove_any(&dir);
        }
        let rec = done?;
        let mut st = self.state();
        *st.pins.entry(rec.diff_id.clone()).or_default() += 1;
        let added = !st.index.layers.contains_key(&rec.diff_id);
        st.index
            .layers
            .entry(rec.diff_id.clone())
            .or_insert(rec.clone());
        Ok((rec, added))
    }
}

impl Ingest<'_> {
    /// Pins `diff_id` if the store has it; false if it must be fetched.
    pub fn pin_if_stored(&mut self, diff_id: &Digest) -> bool {
        let mut st = self.store.state();
        if st.index.layers.contains_key(diff_id) {
            *st.pins.entry(diff_id.clone()).or_default() += 1;
            self.pinned.push(diff_id.clone());
            true
        } else {
            false
        }
    }

    /// Records a layer `add_layer` stored, or found stored, and pinned.
    pub fn added_layer(&mut self, (rec, added): (LayerRecord, bool)) {
        self.pinned.push(rec.diff_id.clone());
        if added {
            self.added.push(rec.diff_id);
        }
    }

    /// A path under `tmp/` removed when the ingest ends.
    pub fn tmp_file(&mut self, what: &str) -> PathBuf {
        let p = self.store.tmp_path(what);
        self.tmp.push(p.clone());
        p
    }

    /// Makes the image visible: stores its config, moves `refs` to it, and writes the index.
    pub fn commit(
        self,
        config_bytes: &[u8],
        config: ConfigFile,
        manifest: Option<Digest>,
        refs: Vec<String>,
    ) -> Result<ImageRecord> {
        let store = self.store;
        let id = store.put_blob(config_bytes)?;
        let mut st = store.state();
        let size = config
            .rootfs
            .diff_ids
            .iter()
            .filter_map(|d| st.index.layers.get(d).map(|l| l.bytes))
            .sum();
        if let Some(missing) = config
            .rootfs
            .diff_ids
            .iter()
            .find(|d| !st.index.layers.contains_key(d))
        {
            return Err(Error::Corrupt {
                what: format!("image {id}"),
                why: format!("layer {missing} was not stored"),
            });
        }
        let before = st.index.images.clone();
        for img in &mut st.index.images {
            img.refs.retain(|r| !refs.contains(r));
        }
        let rec = match st.index.images.iter_mut().find(|i| i.id == id) {
            Some(existing) => {
                for r in refs {
                    if !existing.refs.contains(&r) {
                        existing.refs.push(r);
                    }
                }
                if existing.manifest.is_none() {
                    existing.manifest = manifest;
                }
                existing.clone()
            }
            None => {
                let rec = ImageRecord {
                    id,
                    refs,
                    manifest,
                    platform: config_platform(&config),
                    layers: config.rootfs.diff_ids,
                    size,
                    created: config.created,
                    config: config.config.unwrap_or_default(),
                    added_at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                };
                st.index.images.push(rec.clone());
                rec
            }
        };
        if let Err(e) = store.write_index(&st.index) {
            st.index.images = before;
            return Err(e);
        }
        drop(st);
        // Success: nothing to roll back; Drop only unpins and cleans tmp.
        let mut this = self;
        this.added.clear();
        Ok(rec)
    }
}

impl Drop for Ingest<'_> {
    fn drop(&mut self) {
        for p in &self.tmp {
            let _ = fs::remove_file(p);
        }
        {
            let mut st = self.store.state();
            for d in &self.pinned {
                if let Some(n) = st.pins.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        st.pins.remove(d);
                    }
                }
            }
        }
        if !self.added.is_empty() {
            if let Err(e) = self.store.collect() {
                tracing::warn!(error = %e, "removing the layers of a failed pull");
            }
        }
    }
}

pub(crate) fn parse_config(bytes: &[u8], what: &str) -> Result<ConfigFile> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        what: format!("config of {what}"),
        why: e.to_string(),
    })
}

fn config_platform(c: &ConfigFile) -> Platform {
    Platform {
        os: c.os.clone(),
        architecture: c.architecture.clone(),
        variant: c.variant.clone(),
    }
}

fn find(index: &Index, name: &str) -> Result<usize> {
    let not_found = || Error::NotFound(name.to_owned());
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let hits: Vec<usize> = (0..index.images.len())
            .filter(|&i| index.images[i].id.hex().starts_with(hex))
            .collect();
        if let [one] = hits[..] {
            return Ok(one);
        }
        if hits.len() > 1 {
            return Err(Error::BadReference {
                reference: name.to_owned(),
                why: "an id prefix naming several images",
            });
        }
    }
    let r: Reference = name.parse()?;
    let full = r.to_string();
    index
        .images
        .iter()
        .position(|i| {
            i.refs.contains(&full)
                || (r.tag.is_none() && r.digest.is_some() && i.manifest == r.digest)
        })
        .ok_or_else(not_found)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
