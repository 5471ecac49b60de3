//! Stable error codes. Clients match on these strings; never rename one.

pub const BAD_REQUEST: &str = "bad_request";
pub const UNAUTHORIZED: &str = "unauthorized";
pub const FORBIDDEN: &str = "forbidden";
pub const NOT_FOUND: &str = "not_found";
pub const SANDBOX_NOT_FOUND: &str = "sandbox_not_found";
pub const SANDBOX_NOT_RUNNING: &str = "sandbox_not_running";
pub const PROCESS_NOT_FOUND: &str = "process_not_found";
pub const FILE_NOT_FOUND: &str = "file_not_found";
pub const PERMISSION_DENIED: &str = "permission_denied";
pub const NOT_A_DIRECTORY: &str = "not_a_directory";
pub const IS_A_DIRECTORY: &str = "is_a_directory";
pub const ALREADY_EXISTS: &str = "already_exists";
pub const NOT_REGULAR_FILE: &str = "not_regular_file";
pub const DIRECTORY_NOT_EMPTY: &str = "directory_not_empty";
pub const INVALID_PATH: &str = "invalid_path";
pub const NO_SPACE: &str = "no_space";
pub const LIMIT_EXCEEDED: &str = "limit_exceeded";
pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
pub const UNKNOWN_PLAN: &str = "unknown_plan";
pub const UNKNOWN_IMAGE: &str = "unknown_image";
pub const CONFLICT: &str = "conflict";
pub const INTERNAL: &str = "internal";
pub const UNAVAILABLE: &str = "unavailable";
pub const GUEST_UNREACHABLE: &str = "guest_unreachable";
pub const SANDBOX_LOST: &str = "sandbox_lost";
pub const CREATE_INTERRUPTED: &str = "create_interrupted";
pub const MAX_DURATION_EXCEEDED: &str = "max_duration_exceeded";
pub const NETWORK_UNAVAILABLE: &str = "network_unavailable";
pub const PORT_CLOSED: &str = "port_closed";
pub const TOOL_ITERATIONS_EXCEEDED: &str = "tool_iterations_exceeded";
pub const RUN_ENDED: &str = "run_ended";
pub const NO_RUN: &str = "no_run";
pub const UNKNOWN_POOL: &str = "unknown_pool";
pub const SANDBOX_DESTROYED: &str = "sandbox_destroyed";
/// The database is locked by another process (or every connection is in use): retry shortly.
pub const DATABASE_BUSY: &str = "database_busy";
/// The database cannot be written (a read-only file or mount, an I/O error).
pub const DATABASE_UNAVAILABLE: &str = "database_unavailable";
/// A per-user quota (live sandboxes, memory, disk, creates per second) would be exceeded.
pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
/// The host has no room for another sandbox (its process budget is promised to others).
pub const HOST_FULL: &str = "host_full";
/// An `Idempotency-Key` was used before with a different request.
pub const IDEMPOTENCY_KEY_REUSED: &str = "idempotency_key_reused";
/// The first request with this `Idempotency-Key` is still being served.
pub const IDEMPOTENCY_IN_PROGRESS: &str = "idempotency_in_progress";
/// The client sent its request body too slowly.
pub const REQUEST_TIMEOUT: &str = "request_timeout";
pub const PLAN_NOT_ALLOWED: &str = "plan_not_allowed";
pub const CALLBACK_NOT_ALLOWED: &str = "callback_not_allowed";
/// The host's data filesystem is (nearly) full, or sandbox disks would promise more than it may.
pub const INSUFFICIENT_STORAGE: &str = "insufficient_storage";
/// A resume could not start the sandbox; its files are kept and a later resume may succeed.
pub const RESUME_FAILED: &str = "resume_failed";
/// The create asked for an isolation tier (`gvisor`) that this server's nodes do not offer.
pub const ISOLATION_UNAVAILABLE: &str = "isolation_unavailable";
