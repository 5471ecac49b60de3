//! `burrow image pull|import|ls|inspect|rm`: a client of `/v1/images` (docs/images.md).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burrow_types::images::{Image, PullImage};
use clap::Subcommand;

use crate::config;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Pull an image from its registry (`ubuntu:24.04`, `ghcr.io/org/app:v2`), showing progress.
    Pull {
        reference: String,
        /// Registry user name (the password is read from standard input).
        #[arg(long)]
        username: Option<String>,
    },
    /// Import a `docker save` tarball or an OCI image layout (a directory, or a tar of one).
    Import {
        file: PathBuf,
        /// Name the image this instead of the names the archive carries.
        #[arg(long)]
        tag: Option<String>,
    },
    /// List the node's images.
    Ls {
        /// Only the ids, one a line.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show an image: layers, platform, Env, WorkingDir, User, Entrypoint, Cmd.
    Inspect { name: String },
    /// Remove images (a name, or the image by id with every name); layers no other image uses go.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn short(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

pub async fn run(cmd: ImageCmd, json: bool) -> Result<i32> {
    let client = config::client()?;
    match cmd {
        ImageCmd::Pull {
            reference,
            username,
        } => {
            let password = match &username {
                Some(_) => {
                    let mut p = String::new();
                    std::io::stdin()
                        .read_to_string(&mut p)
                        .context("reading the password from standard input")?;
                    Some(p.trim_end_matches(['\n', '\r']).to_owned())
                }
                None => None,
            };
            let req = PullImage {
                reference,
                username,
                password,
                progress: true,
            };
            let tty = std::io::stderr().is_terminal() && !json;
            let img = client
                .pull_image(&req, |p| {
                    if tty {
                        eprint!(
                            "\r\x1b[Klayers {}/{}  {} / {}",
                            p.layers_done,
                            p.layers_total,
                            mib(p.bytes_done),
                            mib(p.bytes_total)
                        );
                        let _ = std::io::stderr().flush();
                    }
                })
                .await;
            if tty {
                eprintln!();
            }
            let img = img?;
            if json {
                crate::print_json(&img)?;
            } else {
                println!("{} {}", short(&img.id), img.refs.join(" "));
            }
            Ok(0)
        }
        ImageCmd::Import { file, tag } => {
            // A directory (an OCI layout) goes as a tar of it, made by the system's tar.
            let staged;
            let path = if file.is_dir() {
                staged = tempfile::NamedTempFile::new()?;
                let ok = std::process::Command::new("tar")
                    .arg("-C")
                    .arg(&file)
                    .arg("-cf")
                    .arg(staged.path())
                    .arg(".")
                    .status()
                    .context("running tar")?
                    .success();
                if !ok {
                    bail!("tar of {} failed", file.display());
                }
                staged.path().to_owned()
            } else {
                file.clone()
            };
            let body = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let imgs = client.import_image(body, tag.as_deref()).await?;
            if json {
                crate::print_json(&imgs)?;
            } else {
                for img in imgs {
                    println!("{} {}", short(&img.id), img.refs.join(" "));
                }
            }
            Ok(0)
        }
        ImageCmd::Ls { quiet } => {
            let imgs = client.images().await?;
            if json {
                crate::print_json(&imgs)?;
            } else if quiet {
                for i in imgs {
                    println!("{}", i.id);
                }
            } else {
                println!("{:<12}  {:>10}  {:<11}  NAMES", "ID", "SIZE", "PLATFORM");
                for i in imgs {
                    let names = if i.refs.is_empty() {
                        "<none>".to_string()
                    } else {
                        i.refs.join(" ")
                    };
                    println!(
                        "{:<12}  {:>10}  {:<11}  {names}",
                        short(&i.id),
                        mib(i.size),
                        i.platform
                    );
                }
            }
            Ok(0)
        }
        ImageCmd::Inspect { name } => {
            let img: Image = client.image(&name).await?;
            crate::print_json(&img)?;
            Ok(0)
        }
        ImageCmd::Rm { names } => {
            let mut code = 0;
            for name in names {
                match client.remove_image(&name).await {
                    Ok(r) if json => crate::print_json(&r)?,
                    Ok(r) => {
                        for u in &r.untagged {
                            println!("untagged {u}");
                        }
                        if let Some(d) = &r.deleted {
                            println!("deleted {} ({} layers freed)", short(d), r.layers_deleted);
                        }
                    }
                    Err(e) => {
                        eprintln!("burrow: {name}: {e}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
    }
}
