//! `image import`: the images in a `docker save` tarball or an OCI image layout (a directory, or
//! a tar of one; compressed or not) into the store.
//!
//! A tarball's members are first copied under `tmp/` by number (never by their own names, so a
//! hostile member name reaches nothing); the archive's JSON then names which of them are
//! configs and layers. Every OCI blob is checked against the digest it is filed under, every
//! layer against the config's diff_id, as a pull does.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::digest::HashingReader;
use crate::error::io_err;
use crate::spec::{choose, AnyManifest, Descriptor, DockerSaveEntry, Platform, MAX_JSON};
use crate::store::{parse_config, Ingest};
use crate::unpack::decompress;
use crate::{Digest, Error, ImageRecord, Reference, Result, Store};

const OCI_NAME: &str = "io.containerd.image.name";
const OCI_REF: &str = "org.opencontainers.image.ref.name";

/// The archive's files by name: a file on disk, or a link to another name.
#[derive(Default)]
struct Files {
    files: BTreeMap<String, PathBuf>,
    links: BTreeMap<String, String>,
}

impl Files {
    fn path(&self, name: &str) -> Result<&Path> {
        let mut name = normal(name);
        for _ in 0..8 {
            if let Some(p) = self.files.get(&name) {
                return Ok(p);
            }
            match self.links.get(&name) {
                Some(target) => name = target.clone(),
                None => break,
            }
        }
        Err(Error::Corrupt {
            what: "the archive".into(),
            why: format!("it has no file {name:?}"),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.path(name).is_ok()
    }

    fn small(&self, name: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        File::open(self.path(name)?)
            .and_then(|f| f.take(MAX_JSON + 1).read_to_end(&mut out))
            .map_err(io_err(format!("reading {name}")))?;
        if out.len() as u64 > MAX_JSON {
            return Err(Error::LimitExceeded {
                limit: "max_manifest_bytes",
                max: MAX_JSON,
                what: name.to_owned(),
            });
        }
        Ok(out)
    }

    /// An OCI blob, checked against its digest.
    fn blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let bytes = self.small(&blob_name(d))?;
        let actual = Digest::of(&bytes);
        if &actual != d {
            return Err(Error::DigestMismatch {
                what: blob_name(d),
                expected: d.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

fn blob_name(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// `./a//b` → `a/b`; `..` is resolved lexically (only used to look names up).
fn normal(name: &str) -> String {
    let mut out: Vec<&str> = vec![];
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

impl Store {
    /// Imports every image in `input` (a `docker save` tarball or an OCI layout, as a directory
    /// or a tar, compressed or not). `tag`, if given, names the one image the archive holds
    /// instead of the names it carries.
    pub fn import(&self, input: &Path, tag: Option<&Reference>) -> Result<Vec<ImageRecord>> {
        let staging = self.tmp_path("import");
        fs::create_dir(&staging).map_err(io_err("making an import directory"))?;
        let result = self.import_in(input, tag, &staging);
        let _ = fs::remove_dir_all(&staging);
        result
    }

    fn import_in(
        &self,
        input: &Path,
        tag: Option<&Reference>,
        staging: &Path,
    ) -> Result<Vec<ImageRecord>> {
        let meta = fs::metadata(input).map_err(io_err(format!("reading {}", input.display())))?;
        let mut files = Files::default();
        if meta.is_dir() {
            self.walk(input, "", &mut files)?;
        } else {
            let f = File::open(input).map_err(io_err(format!("reading {}", input.display())))?;
            self.untar(f, staging, &mut files)?;
        }
        let images = if files.has("index.json") {
            self.import_oci(&files, tag)?
        } else if files.has("manifest.json") {
            self.import_docker(&files, tag)?
        } else {
            return Err(Error::Unsupported {
                what: "import format",
                value:
                    "neither an OCI layout (index.json) nor a docker save tarball (manifest.json)"
                        .into(),
            });
        };
        Ok(images)
    }

    fn count(&self, files: &Files) -> Result<()> {
        let n = (files.files.len() + files.links.len()) as u64;
        if n > self.limits().max_import_files {
            return Err(Error::LimitExceeded {
                limit: "max_import_files",
                max: self.limits().max_import_files,
                what: "the archive".into(),
            });
        }
        Ok(())
    }

    fn walk(&self, dir: &Path, prefix: &str, files: &mut Files) -> Result<()> {
        for e in fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let e = e.map_err(io_err(format!("reading {}", dir.display())))?;
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            let ty = e.file_type().map_err(io_err(format!("reading {name}")))?;
            if ty.is_dir() {
                self.walk(&e.path(), &format!("{name}/"), files)?;
            } else if ty.is_file() {
                files.files.insert(name, e.path());
            } else if ty.is_symlink() {
                let t = fs::read_link(e.path()).map_err(io_err(format!("reading {name}")))?;
                files
                    .links
                    .insert(name, normal(&format!("{prefix}{}", t.to_string_lossy())));
            }
            self.count(files)?;
        }
        Ok(())
    }

    fn untar(&self, input: File, staging: &Path, files: &mut Files) -> Result<()> {
        let plain = decompress(input, "the archive")?;
        let limit = self.limits().max_blob_bytes;
        let mut ar = tar::Archive::new(plain);
        let bad = |e: io::Error| Error::Corrupt {
            what: "the archive".into(),
            why: e.to_string(),
        };
        for (i, entry) in ar.entries().map_err(bad)?.enumerate() {
            let mut entry = entry.map_err(bad)?;
            let name = normal(&String::from_utf8_lossy(&entry.path_bytes()));
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let dest = staging.join(i.to_string());
                    let mut out = File::create(&dest).map_err(io_err("staging an import"))?;
                    let mut r = HashingReader::new(&mut entry, limit);
                    if let Err(e) = io::copy(&mut r, &mut out) {
                        if r.over {
                            return Err(Error::LimitExceeded {
                                limit: "max_blob_bytes",
                                max: limit,
                                what: name,
                            });
                        }
                        return Err(if e.raw_os_error().is_some() {
                            Error::io("staging an import", e)
                        } else {
                            bad(e)
                        });
                    }
                    files.files.insert(name, dest);
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let Some(t) = entry.link_name_bytes() else {
                        continue;
                    };
                    let t = String::from_utf8_lossy(&t).into_owned();
                    // Symlinks are relative to their directory; hard links name from the top.
                    let target = if entry.header().entry_type() == tar::EntryType::Symlink {
                        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                        normal(&format!("{dir}/{t}"))
                    } else {
                        normal(&t)
                    };
                    files.links.insert(name, target);
                }
                _ => {}
            }
            self.count(files)?;
        }
        Ok(())
    }

    fn import_oci(&self, files: &Files, tag: Option<&Reference>) -> Result<Vec<ImageRecord>> {
        let index: AnyManifest =
            serde_json::from_slice(&files.small("index.json")?).map_err(|e| Error::Corrupt {
                what: "index.json".into(),
                why: e.to_string(),
            })?;
        let descs = index.manifests.unwrap_or_default();
        if tag.is_some() && descs.len() != 1 {
            return Err(Error::BadReference {
                reference: tag.map(|t| t.to_string()).unwrap_or_default(),
                why: "a tag names one image, and the layout holds several",
            });
        }
        let mut out = vec![];
        for top in descs {
            let mut refs = vec![];
            if let Some(t) = tag {
                refs.push(t.to_string());
            } else if let Some(r) = [OCI_NAME, OCI_REF]
                .iter()
                .filter_map(|k| top.annotations.get(*k))
                .find_map(|n| n.parse::<Reference>().ok().filter(|_| n.contains('/')))
            {
                refs.push(r.to_string());
            }
            let mut desc = top.clone();
            let mut bytes = files.blob(&desc.digest)?;
            let mut m = parse_manifest(&bytes, &desc)?;
            if let Some(list) = &m.manifests {
                desc = choose(list, &Platform::host(), top.digest.as_str())?.clone();
                bytes = files.blob(&desc.digest)?;
                m = parse_manifest(&bytes, &desc)?;
            }
            let (Some(config_desc), Some(layers)) = (m.config, m.layers) else {
                return Err(Error::Corrupt {
                    what: format!("manifest {}", desc.digest),
                    why: "no config or layers".into(),
                });
            };
            let config_bytes = files.blob(&config_desc.digest)?;
            let config = parse_config(&config_bytes, &desc.digest.to_string())?;
            let host = Platform::host();
            if config.os != host.os || config.architecture != host.architecture {
                return Err(Error::PlatformNotFound {
                    reference: desc.digest.to_string(),
                    wanted: host.to_string(),
                    available: vec![format!("{}/{}", config.os, config.architecture)],
                });
            }
            let names: Vec<(String, Option<Digest>)> = layers
                .iter()
                .map(|l| (blob_name(&l.digest), Some(l.digest.clone())))
                .collect();
            let mut ingest = self.ingest();
            self.add_layers(&mut ingest, files, &names, &config.rootfs.diff_ids)?;
            self.put_blob(&bytes)?;
            out.push(ingest.commit(&config_bytes, config, Some(desc.digest), refs)?);
        }
        Ok(out)
    }

    fn import_docker(&self, files: &Files, tag: Option<&Reference>) -> Result<Vec<ImageRecord>> {
        let entries: Vec<DockerSaveEntry> = serde_json::from_slice(&files.small("manifest.json")?)
            .map_err(|e| Error::Corrupt {
                what: "manifest.json".into(),
                why: e.to_string(),
            })?;
        if tag.is_some() && entries.len() != 1 {
            return Err(Error::BadReference {
                reference: tag.map(|t| t.to_string()).unwrap_or_default(),
                why: "a tag names one image, and the tarball holds several",
            });
        }
        let mut out = vec![];
        for e in entries {
            let refs = match tag {
                Some(t) => vec![t.to_string()],
                None => e
                    .repo_tags
                    .unwrap_or_default()
                    .iter()
                    .map(|t| t.parse::<Reference>().map(|r| r.to_string()))
                    .collect::<Result<_>>()?,
            };
            let config_bytes = files.small(&e.config)?;
            let config = parse_config(&config_bytes, &e.config)?;
            let names: Vec<(String, Option<Digest>)> =
                e.layers.iter().map(|l| (l.clone(), None)).collect();
            let mut ingest = self.ingest();
            self.add_layers(&mut ingest, files, &names, &config.rootfs.diff_ids)?;
            out.push(ingest.commit(&config_bytes, config, None, refs)?);
        }
        Ok(out)
    }

    /// Stores each layer not stored yet: `(file name, its digest if the archive names one)`.
    fn add_layers(
        &self,
        ingest: &mut Ingest<'_>,
        files: &Files,
        layers: &[(String, Option<Digest>)],
        diff_ids: &[Digest],
    ) -> Result<()> {
        if layers.len() != diff_ids.len() {
            return Err(Error::Corrupt {
                what: "the image config".into(),
                why: format!("{} layers but {} diff_ids", layers.len(), diff_ids.len()),
            });
        }
        for ((name, digest), diff_id) in layers.iter().zip(diff_ids) {
            if ingest.pin_if_stored(diff_id) {
                continue;
            }
            let path = files.path(name)?;
            if let Some(d) = digest {
                verify_file(path, d, name, self.limits().max_blob_bytes)?;
            }
            let f = File::open(path).map_err(io_err(format!("reading {name}")))?;
            ingest.added_layer(self.add_layer(diff_id, f, &format!("layer {name}"))?);
        }
        Ok(())
    }
}

fn parse_manifest(bytes: &[u8], d: &Descriptor) -> Result<AnyManifest> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        what: format!("manifest {}", d.digest),
        why: e.to_string(),
    })
}

fn verify_file(path: &Path, d: &Digest, name: &str, max: u64) -> Result<()> {
    let f = File::open(path).map_err(io_err(format!("reading {name}")))?;
    let mut r = HashingReader::new(f, max);
    io::copy(&mut r, &mut io::sink()).map_err(|e| {
        if r.over {
            Error::LimitExceeded {
                limit: "max_blob_bytes",
                max,
                what: name.to_owned(),
            }
        } else {
            Error::io(format!("reading {name}"), e)
        }
    })?;
    let actual = r.digest();
    if &actual != d {
        return Err(Error::DigestMismatch {
            what: name.to_owned(),
            expected: d.clone(),
            actual,
        });
    }
    Ok(())
}
