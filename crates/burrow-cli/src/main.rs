//! The `burrow` binary: server (`up`), client commands, and the hidden `__init` entry that sets up
//! a sandbox in a fresh process before any async runtime exists: forking into namespaces from a
//! multi-threaded process is unsafe (docs/adr/0001).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand};

mod bench;
mod bench_net;
mod config;
mod cp;
mod exec;
mod image;
mod net;
mod up;

#[derive(Parser)]
#[command(
    name = "burrow",
    version,
    about = "Every AI agent gets its own isolated Linux computer."
)]
struct Cli {
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Which saved server to talk to (`burrow profile ls`); `burrow up` saves under this name.
    #[arg(long, global = true, env = "BURROW_PROFILE")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server, the local node and the embedded database.
    Up(up::UpArgs),
    /// Create a sandbox and print its id.
    Create(CreateArgs),
    /// List your sandboxes.
    Ls {
        /// Only the ids, one a line (`burrow rm $(burrow ls -q)`).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show one sandbox.
    Get { id: String },
    /// Run a command in a sandbox, streaming its output; exits with the command's exit code.
    Exec(exec::ExecArgs),
    /// Open an interactive shell in a sandbox.
    Shell {
        id: String,
        /// `root` (default) or `user`.
        #[arg(long)]
        user: Option<String>,
    },
    /// Copy files: `burrow cp ./local ID:/path` or `burrow cp ID:/path ./local`.
    Cp { src: String, dst: String },
    /// Destroy sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Freeze every process of a sandbox in place (files are synced first).
    Pause { id: String },
    /// Resume a paused sandbox (hot) or a hibernated one (cold, same files).
    Resume { id: String },
    /// End every process of a sandbox but keep its files; `resume` starts it again.
    Hibernate { id: String },
    /// List a sandbox's background processes: those started through the API, and those a
    /// command left running (`sh -c 'server &'`), which keep that command's output.
    Ps { id: String },
    /// Print a background process's output (the last 1 MiB of each stream is kept), then follow
    /// it until it exits; Ctrl-C stops following, the process keeps running.
    Logs { id: String, pid: u32 },
    /// Send a signal to a process in a sandbox (default SIGKILL).
    Kill {
        id: String,
        pid: u32,
        #[arg(long, default_value_t = 9)]
        signal: i32,
    },
    /// Show or change a sandbox's egress policy: `burrow net ID --internet off --allow-out X`;
    /// `burrow net rules` prints burrow's firewall and whether the kernel's matches (admins).
    Net(net::NetCmd),
    /// Print the URL of a port inside a sandbox (and make it public or private).
    Port(net::PortCmd),
    /// Measure create, exec, pause/resume, hibernate, warm pool, throughput and density, with
    /// crun, podman and bwrap side by side.
    Bench(bench::BenchArgs),
    /// OCI images: pull, import, ls, inspect, rm (docs/images.md).
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Warm pools: sandboxes built ahead, claimed by creates in milliseconds.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// A sandbox's run: the task it is for, whose tool calls are counted.
    #[command(subcommand)]
    Run(RunCommand),
    /// Operator commands.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Saved servers: `burrow up` saves one per server; `--profile NAME` picks one per command.
    #[command(subcommand)]
    Profile(ProfileCommand),
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// List the saved servers; `*` marks the current one.
    Ls,
    /// Make a profile the current one.
    Use { name: String },
    /// Forget a profile (the server itself is untouched).
    Rm { name: String },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Show each pool: target, ready, claims, cold fallbacks, 24 h hit rate.
    Ls,
    /// Create or resize a pool (admin key).
    Set {
        name: String,
        #[arg(long)]
        size: u32,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        plan: Option<String>,
    },
    /// Delete a pool and its unclaimed sandboxes (admin key).
    Rm { name: String },
}

#[derive(Subcommand)]
enum RunCommand {
    /// Give a sandbox a new run.
    Start {
        id: String,
        #[command(flatten)]
        run: RunArgs,
    },
    /// End a sandbox's run (an ephemeral sandbox is destroyed).
    End { id: String },
}

#[derive(Args, Default)]
struct RunArgs {
    /// The task text.
    #[arg(long)]
    task: Option<String>,
    /// Told with a signed POST when the run ends (`http://` or `https://`; see docs/api.md).
    #[arg(long)]
    callback: Option<String>,
    /// An opaque memory token, repeatable.
    #[arg(long = "memory-token")]
    memory_tokens: Vec<String>,
    /// Environment of the run: `--run-env KEY=VALUE`, repeatable.
    #[arg(long = "run-env", value_parser = parse_kv)]
    run_env: Vec<(String, String)>,
}

impl RunArgs {
    fn spec(self) -> Option<burrow_types::RunSpec> {
        let given = self.task.is_some()
            || self.callback.is_some()
            || !self.memory_tokens.is_empty()
            || !self.run_env.is_empty();
        given.then(|| burrow_types::RunSpec {
            task: self.task.unwrap_or_default(),
            memory_tokens: self.memory_tokens,
            callback_url: self.callback,
            env: self.run_env.into_iter().collect(),
        })
    }
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user and print its API key (shown once).
    CreateUser {
        name: String,
        #[arg(long)]
        plan: Option<String>,
        /// Issue the key as `e2b_<hex>`, the shape the e2b SDKs expect (see docs/e2b.md).
        #[arg(long)]
        e2b_key: bool,
    },
    /// Give a user another plan: what they may ask for at create (any plan whose every limit is
    /// within it).
    SetPlan { name: String, plan: String },
    /// Print the OpenAPI document.
    Openapi,
    /// Show a user's quota and usage, or set their override: `burrow admin quota alice
    /// --sandboxes 10 --memory-mib 8192`; `--clear` returns them to their plan's quota.
    Quota {
        user: String,
        /// Live sandboxes (starting, running, paused, hibernated).
        #[arg(long)]
        sandboxes: Option<u32>,
        /// MiB of memory promised to live sandboxes.
        #[arg(long)]
        memory_mib: Option<u64>,
        /// MiB of disk promised to live sandboxes.
        #[arg(long)]
        disk_mib: Option<u64>,
        /// Creates per second.
        #[arg(long)]
        creates_per_s: Option<u32>,
        /// Remove the user's override.
        #[arg(long, conflicts_with_all = ["sandboxes", "memory_mib", "disk_mib", "creates_per_s"])]
        clear: bool,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// Image (default `system`).
    #[arg(long)]
    image: Option<String>,
    /// Plan (`free`, `pro`, `scale`).
    #[arg(long)]
    plan: Option<String>,
    #[arg(long)]
    hostname: Option<String>,
    /// Environment for every command: `--env KEY=VALUE`, repeatable.
    #[arg(long = "env", value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Idle timeout in seconds (no API call for this long), then `--on-timeout`.
    #[arg(long)]
    timeout: Option<u64>,
    /// `destroy` (default) or `pause`.
    #[arg(long, value_parser = ["destroy", "pause"])]
    on_timeout: Option<String>,
    /// Metadata: `--meta KEY=VALUE`, repeatable.
    #[arg(long = "meta", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    #[command(flatten)]
    net: net::CreateNetArgs,
    /// Destroy the sandbox when its run ends or it times out.
    #[arg(long)]
    ephemeral: bool,
    /// A small file to put in the sandbox: `--file PATH=LOCAL_FILE` (relative paths are under
    /// /workspace), repeatable.
    #[arg(long = "file", value_parser = parse_kv)]
    files: Vec<(String, String)>,
    #[command(flatten)]
    run: RunArgs,
    /// `native` (namespaces on the host's kernel) or `gvisor` (a kernel of its own); the
    /// default is the plan's.
    #[arg(long, value_parser = ["native", "gvisor"])]
    isolation: Option<String>,
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn main() {
    // Sandbox setup forks and enters namespaces: it must run single-threaded, so it is dispatched
    // before anything else (no tokio runtime, no logging threads).
    if std::env::args_os().nth(1).is_some_and(|a| a == "__init") {
        burrow_node::namespace::init::main();
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "__gvisor") {
        burrow_node::gvisor::boot::main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.kind() == clap::error::ErrorKind::InvalidSubcommand => {
            let _ = e.print();
            eprintln!("{}", commands_here());
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(anyhow!(e).context("starting the async runtime")),
    };
    let code = rt.block_on(run(cli)).unwrap_or_else(|e| fail(e));
    // Exit without waiting for blocking stdin readers.
    std::process::exit(code);
}

/// The commands valid where the command line named an unknown one (clap suggests only a
/// close match, when there is one).
fn commands_here() -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut path = vec!["burrow".to_string()];
    for arg in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
        let Some(sub) = cmd.find_subcommand(&arg).cloned() else {
            break;
        };
        path.push(arg);
        cmd = sub;
    }
    let names: Vec<&str> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name())
        .collect();
    format!(
        "the commands of `{}` are: {}",
        path.join(" "),
        names.join(", ")
    )
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("burrow: {e:#}");
    std::process::exit(1);
}

async fn run(cli: Cli) -> Result<i32> {
    let json = cli.json;
    config::select(cli.profile);
    match cli.command {
        Command::Up(args) => up::run(args).await.map(|_| 0),
        Command::Create(a) => {
            let req = burrow_types::CreateSandbox {
                image: a.image,
                plan: a.plan,
                hostname: a.hostname,
                env: a.env.into_iter().collect(),
                metadata: a.metadata.into_iter().collect::<BTreeMap<_, _>>(),
                timeout_s: a.timeout,
                on_timeout: a
                    .on_timeout
                    .as_deref()
                    .and_then(burrow_types::OnTimeout::parse),
                network: a.net.policy(),
                ephemeral: a.ephemeral,
                run: a.run.spec(),
                isolation: a.isolation.as_deref().map(|i| match i {
                    "gvisor" => burrow_types::Isolation::Gvisor,
                    _ => burrow_types::Isolation::Native,
                }),
                files: a
                    .files
                    .into_iter()
                    .map(|(path, local)| {
                        std::fs::read_to_string(&local)
                            .map(|text| (path, text))
                            .map_err(|e| anyhow!("--file: reading {local}: {e}"))
                    })
                    .collect::<Result<_>>()?,
            };
            let sb = config::client()?.create(&req).await?;
            if json {
                print_json(&sb)?;
            } else {
                println!("{}", sb.id);
            }
            Ok(0)
        }
        Command::Ls { quiet } => {
            let list = config::client()?.list().await?;
            if quiet {
                for s in list {
                    println!("{}", s.id);
                }
            } else if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<22} {:<10} {:<8} {:<7} CREATED",
                    "ID", "STATE", "IMAGE", "PLAN"
                );
                for s in list {
                    println!(
                        "{:<22} {:<10} {:<8} {:<7} {}",
                        s.id,
                        s.state.as_str(),
                        s.image,
                        s.plan,
                        s.created_at
                    );
                }
            }
            Ok(0)
        }
        Command::Get { id } => {
            let sb = config::client()?.get(&id).await?;
            print_json(&sb)?;
            Ok(0)
        }
        Command::Exec(args) => exec::run(args, json).await,
        Command::Shell { id, user } => exec::shell(&id, user).await,
        Command::Cp { src, dst } => cp::run(&src, &dst, json).await.map(|_| 0),
        Command::Rm { ids } => {
            let client = config::client()?;
            let mut failed = false;
            for id in ids {
                match client.delete(&id).await {
                    Ok(()) if !json => println!("{id}"),
                    Ok(()) => {}
                    Err(e) => {
                        eprintln!("burrow: {id}: {e}");
                        failed = true;
                    }
                }
            }
            Ok(i32::from(failed))
        }
        Command::Pause { id } => {
            let sb = config::client()?.pause(&id).await?;
            print_state(&sb, json)
        }
        Command::Resume { id } => {
            let sb = config::client()?.resume(&id).await?;
            print_state(&sb, json)
        }
        Command::Hibernate { id } => {
            let sb = config::client()?.hibernate(&id).await?;
            print_state(&sb, json)
        }
        Command::Ps { id } => {
            let procs = config::client()?.processes(&id).await?;
            if json {
                print_json(&procs)?;
            } else {
                println!("{:<8} {:<8} {:<5} CMD", "PID", "STATE", "PTY");
                for p in procs {
                    let state = if p.running {
                        "running".to_string()
                    } else {
                        format!("exit {}", p.exit_code.map_or("-".into(), |c| c.to_string()))
                    };
                    // A command line is the sandbox's to choose: no newline or terminal escape
                    // of it reaches this terminal as such.
                    let cmd: String = p
                        .cmd
                        .join(" ")
                        .chars()
                        .flat_map(|c| {
                            let esc: Vec<char> = if c.is_control() {
                                c.escape_default().collect()
                            } else {
                                vec![c]
                            };
                            esc
                        })
                        .collect();
                    println!("{:<8} {:<8} {:<5} {}", p.pid, state, p.pty, cmd);
                }
            }
            Ok(0)
        }
        Command::Logs { id, pid } => exec::logs(&id, pid).await,
        Command::Kill { id, pid, signal } => {
            config::client()?.signal(&id, pid, signal).await?;
            Ok(0)
        }
        Command::Net(cmd) => net::run_net(cmd, json).await,
        Command::Port(cmd) => net::run_port(cmd, json).await,
        Command::Image(cmd) => image::run(cmd, json).await,
        Command::Bench(args) => bench::run(args, json).await.map(|_| 0),
        Command::Pool(PoolCommand::Ls) => {
            let pools = config::client()?.pools().await?;
            if json {
                print_json(&pools)?;
            } else {
                println!(
                    "{:<16} {:<8} {:<7} {:>6} {:>6} {:>8} {:>6} {:>9}",
                    "POOL", "IMAGE", "PLAN", "TARGET", "READY", "STARTING", "CLAIMS", "HIT 24H"
                );
                for p in pools {
                    let rate = p
                        .hit_rate_24h
                        .map_or("-".into(), |r| format!("{:.0}%", r * 100.0));
                    println!(
                        "{:<16} {:<8} {:<7} {:>6} {:>6} {:>8} {:>6} {:>9}",
                        p.name, p.image, p.plan, p.target, p.ready, p.starting, p.claims, rate
                    );
                }
            }
            Ok(0)
        }
        Command::Pool(PoolCommand::Set {
            name,
            size,
            image,
            plan,
        }) => {
            let spec = burrow_types::PoolSpec { image, plan, size };
            let p = config::client()?.put_pool(&name, &spec).await?;
            if json {
                print_json(&p)?;
            } else {
                println!("{} target {} ready {}", p.name, p.target, p.ready);
            }
            Ok(0)
        }
        Command::Pool(PoolCommand::Rm { name }) => {
            config::client()?.delete_pool(&name).await?;
            Ok(0)
        }
        Command::Run(RunCommand::Start { id, run }) => {
            let spec = run.spec().unwrap_or_default();
            let sb = config::client()?.start_run(&id, &spec).await?;
            print_state(&sb, json)
        }
        Command::Run(RunCommand::End { id }) => {
            let sb = config::client()?.end_run(&id).await?;
            print_state(&sb, json)
        }
        Command::Admin(AdminCommand::CreateUser {
            name,
            plan,
            e2b_key,
        }) => {
            let v = config::client()?
                .create_user_with(&name, plan.as_deref(), e2b_key)
                .await?;
            if json {
                print_json(&v)?;
            } else {
                println!("{}", v["api_key"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Command::Profile(ProfileCommand::Ls) => {
            let cfg = config::load();
            if json {
                // Keys stay in the file: the listing says only whether there is one.
                let list: Vec<serde_json::Value> = cfg
                    .profiles
                    .iter()
                    .map(|(name, p)| {
                        serde_json::json!({
                            "name": name,
                            "url": p.url,
                            "has_key": p.api_key.is_some(),
                            "data_dir": p.data_dir,
                            "current": cfg.current.as_deref() == Some(name),
                        })
                    })
                    .collect();
                print_json(&list)?;
            } else {
                println!("  {:<16} {:<28} {:<4} DATA", "NAME", "URL", "KEY");
                for (name, p) in &cfg.profiles {
                    let mark = if cfg.current.as_deref() == Some(name) {
                        "*"
                    } else {
                        " "
                    };
                    println!(
                        "{mark} {:<16} {:<28} {:<4} {}",
                        name,
                        p.url,
                        if p.api_key.is_some() { "yes" } else { "no" },
                        p.data_dir
                            .as_ref()
                            .map_or("-".into(), |d| d.display().to_string())
                    );
                }
            }
            Ok(0)
        }
        Command::Profile(ProfileCommand::Use { name }) => {
            config::use_profile(&name)?;
            Ok(0)
        }
        Command::Profile(ProfileCommand::Rm { name }) => {
            config::remove_profile(&name)?;
            Ok(0)
        }
        Command::Admin(AdminCommand::Quota {
            user,
            sandboxes,
            memory_mib,
            disk_mib,
            creates_per_s,
            clear,
        }) => {
            let client = config::client()?;
            let q = burrow_types::Quota {
                sandboxes,
                memory_mib,
                disk_mib,
                creates_per_s,
            };
            let v = if clear {
                client.set_quota(&user, None).await?
            } else if q != burrow_types::Quota::default() {
                client.set_quota(&user, Some(&q)).await?
            } else {
                client.quota(&user).await?
            };
            print_json(&v)?;
            Ok(0)
        }
        Command::Admin(AdminCommand::SetPlan { name, plan }) => {
            let v = config::client()?.set_user_plan(&name, &plan).await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{} {} (may ask for: {})",
                    v["name"].as_str().unwrap_or_default(),
                    v["plan"].as_str().unwrap_or_default(),
                    v["plans_allowed"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|p| p.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                );
            }
            Ok(0)
        }
        Command::Admin(AdminCommand::Openapi) => {
            print!("{}", burrow_server::api::openapi::document());
            Ok(0)
        }
    }
}

fn print_state(sb: &burrow_types::Sandbox, json: bool) -> Result<i32> {
    if json {
        print_json(sb)?;
    } else {
        println!("{} {}", sb.id, sb.state.as_str());
    }
    Ok(0)
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Splits `ID:PATH`; a local path never has a colon before its first slash.
pub fn remote_path(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    Some((id, path))
}

pub fn default_listen() -> SocketAddr {
    "127.0.0.1:7070".parse().expect("constant address")
}

pub fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/burrow")
}
