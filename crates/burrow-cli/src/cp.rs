//! `burrow cp`: stream files between this machine and a sandbox (`ID:PATH` on either side).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::{config, remote_path};

fn file_name(p: &str) -> Option<&str> {
    Path::new(p).file_name().and_then(|n| n.to_str())
}

pub async fn run(src: &str, dst: &str, json: bool) -> Result<()> {
    let client = config::client()?;
    match (remote_path(src), remote_path(dst)) {
        (None, Some((id, rpath))) => {
            let local = PathBuf::from(src);
            let file = tokio::fs::File::open(&local)
                .await
                .with_context(|| format!("opening {}", local.display()))?;
            if file.metadata().await?.is_dir() {
                bail!(
                    "{} is a directory; burrow cp copies single files",
                    local.display()
                );
            }
            // `ID:/dir/` means "into that directory, same name".
            let target = if rpath.ends_with('/') {
                format!(
                    "{rpath}{}",
                    file_name(src).context("source has no file name")?
                )
            } else {
                rpath.to_string()
            };
            let stat = client.upload(id, &target, file).await?;
            if json {
                crate::print_json(&stat)?;
            }
        }
        (Some((id, rpath)), None) => {
            let mut local = PathBuf::from(dst);
            if local.is_dir() {
                local.push(file_name(rpath).context("remote path has no file name")?);
            }
            let resp = client.download(id, rpath).await?;
            // Write next to the target and rename at the end: an interrupted copy never leaves a
            // short file under the real name.
            let tmp = local.with_file_name(format!(
                ".{}.burrow-partial",
                local
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("download")
            ));
            let mut out = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut body = resp.bytes_stream();
            let mut total = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        return Err(e).context("the download was cut off");
                    }
                };
                total += chunk.len() as u64;
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            out.sync_all().await?;
            tokio::fs::rename(&tmp, &local)
                .await
                .with_context(|| format!("writing {}", local.display()))?;
            if json {
                crate::print_json(&serde_json::json!({ "path": local, "size": total }))?;
            }
        }
        (Some(_), Some(_)) => {
            bail!("copying between two sandboxes is not supported; copy through this machine")
        }
        (None, None) => bail!("one side must be ID:PATH (a path inside a sandbox)"),
    }
    Ok(())
}
