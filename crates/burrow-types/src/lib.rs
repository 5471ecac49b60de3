//! Domain and API types shared by the server, the node, the guest agent and the clients.
//! No I/O lives here: only data shapes, limits and the stable error codes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod codes;
pub mod images;
pub mod limits;
pub mod net;

pub use limits::{Isolation, Limits, Plan, Quota};
pub use net::{NetworkPatch, NetworkPolicy, PortInfo, SandboxNetwork, SetPort};

/// What request bodies may hold. The OpenAPI document states the same bounds, and the server
/// checks exactly these (lengths in characters, as JSON Schema counts them).
pub mod bounds {
    /// Entries of `env` (a create's or a run's).
    pub const ENV_ENTRIES: usize = 256;
    /// Entries of `metadata`.
    pub const METADATA_ENTRIES: usize = 64;
    /// Characters of a map key (env name, metadata key).
    pub const KEY_CHARS: usize = 256;
    /// Characters of a map value.
    pub const VALUE_CHARS: usize = 4096;
    /// Files given at create.
    pub const FILES: usize = 64;
    /// Characters of one file's content given at create (the 1 MiB body limit bounds them all).
    pub const FILE_CHARS: usize = 1 << 20;
    /// Characters of a path (the guest also refuses paths over 4096 bytes).
    pub const PATH_CHARS: usize = 4096;
    /// Characters of a run's task.
    pub const TASK_CHARS: usize = 65536;
    /// Memory tokens of a run, and characters of each.
    pub const MEMORY_TOKENS: usize = 64;
    pub const MEMORY_TOKEN_CHARS: usize = 4096;
    /// Characters of a callback URL.
    pub const URL_CHARS: usize = 2048;
    /// Idle timeouts: 1 s to a year.
    pub const MAX_TIMEOUT_S: u64 = 365 * 24 * 3600;
    /// Command timeouts: 1 ms to a week.
    pub const MAX_EXEC_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
    /// Arguments of a command.
    pub const ARGS: usize = 4096;
}

/// Where a sandbox is in its lifecycle (docs/architecture.md, "Lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Starting,
    Running,
    Paused,
    Hibernated,
    Destroyed,
    Error,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Hibernated => "hibernated",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "starting" => SandboxState::Starting,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "hibernated" => SandboxState::Hibernated,
            "destroyed" => SandboxState::Destroyed,
            "error" => SandboxState::Error,
            _ => return None,
        })
    }
}

/// Why a sandbox is in `error`: a stable code plus, for limits, what was allowed and what was seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorReason {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<serde_json::Value>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    pub image: String,
    pub plan: String,
    pub hostname: String,
    pub limits: Limits,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReason>,
    /// True when the sandbox came from the warm pool.
    #[serde(default)]
    pub warm_hit: bool,
    /// Idle timeout in seconds, if any.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// Address and egress policy, when the server gives sandboxes a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    /// Token for this sandbox alone: opens its ports through the port proxy (shown to its owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunStatus>,
    /// What isolates this sandbox (the same as `limits.isolation`).
    #[serde(default)]
    pub isolation: Isolation,
    /// How a `gvisor` sandbox's kernel traps its system calls (`ptrace` or `kvm`); absent for
    /// `native`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// `checkpoint` when a hibernated sandbox resumes with its processes and memory (a gVisor
    /// checkpoint is on its disk), `cold` when it resumes with its files only; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<String>,
}

/// What happens when a sandbox has been idle (no API call for it) for its timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    Pause,
    #[default]
    Destroy,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Pause => "pause",
            OnTimeout::Destroy => "destroy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pause" => Some(OnTimeout::Pause),
            "destroy" => Some(OnTimeout::Destroy),
            _ => None,
        }
    }
}

/// Body of `POST /v1/sandboxes/{id}/timeout` (like E2B's `set_timeout`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds without an API call before `on_timeout` applies; `null` turns the timeout off.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 31536000))]
    pub timeout_s: Option<u64>,
    /// Unchanged when absent.
    #[serde(default)]
    pub on_timeout: Option<OnTimeout>,
}

/// Body of `POST /v1/sandboxes`. Unknown fields are refused: owner, limits and host paths are the
/// server's to decide (attack A5 in docs/threat-model.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Image name; `system` (the default) is the host's `/usr` read-only with a generated `/etc`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, pattern = "^system$"))]
    pub image: Option<String>,
    /// Plan name (`free`, `pro`, `scale`, or one the operator added); the default is the
    /// user's plan.
    #[serde(default)]
    pub plan: Option<String>,
    /// A DNS label (stored lower-case); the default is the sandbox's id.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
    )]
    pub hostname: Option<String>,
    /// Environment given to every command run in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Idle timeout in seconds (no API call for this long); off when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 31536000))]
    pub timeout_s: Option<u64>,
    /// What the idle timeout does: `destroy` (default) or `pause`. An ephemeral sandbox is
    /// destroyed either way.
    #[serde(default)]
    pub on_timeout: Option<OnTimeout>,
    /// Egress policy; the default is the internet without the private ranges.
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
    /// Destroyed when its run ends or it times out. A persistent sandbox (the default) keeps its
    /// files until the user deletes it.
    #[serde(default)]
    pub ephemeral: bool,
    /// The task this sandbox is for; its tool calls (exec and file operations) are counted.
    #[serde(default)]
    pub run: Option<RunSpec>,
    /// Small text files written before the sandbox is handed over; relative paths are under
    /// `/workspace`.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// `native` or `gvisor`; the default is the plan's. A tier this server lacks is
    /// `400 isolation_unavailable`.
    #[serde(default)]
    pub isolation: Option<Isolation>,
}

/// One task given to a sandbox: what the agent is asked to do and what it needs.
/// Inside the sandbox it is readable at `/etc/burrow/run.json`; its `env` joins the sandbox's env.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 65536))]
    pub task: String,
    /// Opaque tokens for the agent's memory store.
    #[serde(default)]
    pub memory_tokens: Vec<String>,
    /// Told (HTTP POST, JSON, signed) when the run ends: `http://` or `https://`; a target the
    /// server's callback rules refuse is `403 callback_not_allowed`.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(
            max_length = 2048,
            pattern = "^https?://[A-Za-z0-9.-]+(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?(/[!-~]*)?$"
        )
    )]
    pub callback_url: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A run as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunStatus {
    pub task: String,
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Tool calls (exec and file operations) made so far.
    pub tool_calls: u32,
    /// The plan's limit on tool calls per run.
    pub tool_call_limit: u32,
    /// `active` or `ended`.
    pub state: RunState,
    /// Why the run ended, when it did not end by `POST .../run/end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<ErrorReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Active,
    Ended,
}

/// Body of `PUT /v1/pools/{name}`: keep `size` warm sandboxes of this image and plan.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, pattern = "^system$"))]
    pub image: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    #[cfg_attr(feature = "openapi", schema(maximum = 1000))]
    pub size: u32,
}

/// A warm pool and how it is doing (docs/adr/0007).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolStatus {
    pub name: String,
    pub image: String,
    pub plan: String,
    /// Warm sandboxes the replenisher keeps.
    pub target: u32,
    /// Warm sandboxes ready to be claimed now.
    pub ready: u32,
    /// Warm sandboxes being built.
    pub starting: u32,
    /// Creates served from this pool, since it was made.
    pub claims: u64,
    /// Creates that matched this pool but found it empty and started cold.
    pub cold_fallbacks: u64,
    /// Claims ÷ (claims + cold fallbacks) over the last 24 hours; absent without creates.
    #[serde(default)]
    pub hit_rate_24h: Option<f64>,
}

/// Body of a buffered exec (`POST /v1/sandboxes/{id}/exec`) and the first message of a streaming one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// argv; the first element is looked up in `PATH`.
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 4096))]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// `root` (default) or `user`, or a numeric uid.
    #[serde(default)]
    pub user: Option<String>,
    /// After this the command gets SIGTERM, then SIGKILL after a grace period (at most a week;
    /// never past the sandbox's maximum duration).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604800000))]
    pub timeout_ms: Option<u64>,
    /// Text written to the command's stdin, then closed (buffered exec only).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Run under a pseudo-terminal of this size (streaming exec only).
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Keep the process running after the request ends; it can be listed and re-attached.
    #[serde(default)]
    pub background: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PtySize {
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    pub cols: u16,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    pub rows: u16,
}

/// Result of a buffered exec. Output past the per-command cap is dropped and flagged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResult {
    /// None when the process was ended by a signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Output decoded as UTF-8, invalid sequences replaced.
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Either stream was cut at the output limit.
    pub truncated: bool,
    /// The command ran past `timeout_ms` and was killed.
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// A process started through the API (background or attached).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessInfo {
    pub pid: u32,
    pub cmd: Vec<String>,
    pub pty: bool,
    pub running: bool,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Metadata of one path inside a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileStat {
    pub path: String,
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub modified: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// One page of a directory listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DirListing {
    pub entries: Vec<FileStat>,
    /// Pass back as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Every API error body: a stable machine code and a human message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// WebSocket streams (exec, attach, terminal). Binary messages carry output (server → client:
/// first byte [`STREAM_STDOUT`] or [`STREAM_STDERR`], then the bytes) or stdin (client → server:
/// the bytes as they are). Text messages carry these JSON events.
pub mod stream {
    use serde::{Deserialize, Serialize};

    pub const STREAM_STDOUT: u8 = 1;
    pub const STREAM_STDERR: u8 = 2;

    /// Server → client.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum StreamEvent {
        Started {
            pid: u32,
        },
        Exit {
            exit_code: Option<i32>,
            signal: Option<i32>,
            timed_out: bool,
        },
        Error {
            code: String,
            message: String,
        },
    }

    /// Client → server.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum StreamInput {
        /// Close the process's stdin.
        Eof,
        Resize {
            cols: u16,
            rows: u16,
        },
        Signal {
            signal: i32,
        },
    }
}
