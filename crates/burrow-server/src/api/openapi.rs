//! The OpenAPI document, generated from the handlers' annotations and then refined where the
//! annotations cannot say it (map keys, the first element of `cmd`, the error answers every route
//! of a kind can give). The committed copy at `docs/openapi.json` is checked against it by a test,
//! so the published API cannot drift; `scripts/test` runs schemathesis against a real server to
//! check that the server answers as the document says.

use axum::extract::State;
use axum::Json;
use burrow_types::bounds;
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, callbacks, exec, files, images, network, pools, quotas, sandboxes, AppState};

#[derive(OpenApi)]
#[openapi(
    info(title = "burrow", description = "Every AI agent gets its own isolated Linux computer."),
    paths(
        super::health, serve,
        sandboxes::create_sandbox, sandboxes::list_sandboxes, sandboxes::get_sandbox, sandboxes::delete_sandbox,
        sandboxes::pause_sandbox,
        sandboxes::resume_sandbox,
        sandboxes::hibernate_sandbox,
        sandboxes::set_timeout,
        sandboxes::start_run, sandboxes::end_run,
        pools::list_pools, pools::put_pool, pools::delete_pool, pools::metrics,
        exec::exec, exec::exec_ws, exec::terminal,
        exec::start_process, exec::list_processes, exec::signal_process, exec::kill_process, exec::attach,
        admin::create_user, admin::update_user, callbacks::callback_key,
        quotas::get_quota, quotas::put_quota, quotas::delete_quota,
        files::download, files::upload, files::stat, files::list, files::mkdir, files::rename, files::remove,
        network::put_network, network::patch_network, network::get_port, network::put_port, network::firewall,
        images::list_images, images::pull_image, images::import_image, images::get_image, images::delete_image,
    ),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Routes anyone may call (no key).
const OPEN: &[&str] = &["/v1/health", "/v1/openapi.json", "/metrics"];

/// The document: generated, then refined.
pub fn spec() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    refine_schemas(&mut doc);
    refine_path_parameters(&mut doc);
    standard_responses(&mut doc);
    links(&mut doc);
    doc
}

/// The document as committed: pretty JSON with a trailing newline.
pub fn document() -> String {
    let mut s = serde_json::to_string_pretty(&spec()).unwrap_or_default();
    s.push('\n');
    s
}

/// This server's document: the committed one, with the plan names this server has.
#[utoipa::path(get, path = "/v1/openapi.json", security(()),
    responses((status = 200, description = "this document (with this server's plan names)")))]
pub async fn serve(State(s): State<AppState>) -> Json<Value> {
    let mut doc = spec();
    let plans: Vec<Value> = s
        .control
        .plan_names()
        .into_iter()
        .map(Value::from)
        .collect();
    for (schema, field) in [
        ("CreateSandbox", "plan"),
        ("PoolSpec", "plan"),
        ("CreateUser", "plan"),
    ] {
        if let Some(p) = doc
            .pointer_mut(&format!("/components/schemas/{schema}/properties/{field}"))
            .and_then(Value::as_object_mut)
        {
            let mut named = plans.clone();
            named.push(Value::Null);
            p.insert("enum".into(), Value::Array(named));
        }
    }
    Json(doc)
}

const NO_NUL: &str = "^[^\\u0000]*$";
const NO_NUL_NONEMPTY: &str = "^[^\\u0000]+$";

fn string(min: usize, max: usize, pattern: &str) -> Value {
    json!({"type": "string", "minLength": min, "maxLength": max, "pattern": pattern})
}

/// A path inside a sandbox.
pub fn path_schema() -> Value {
    string(1, bounds::PATH_CHARS, NO_NUL_NONEMPTY)
}

/// Who a command or file operation acts as: `root`, `user` or a uid the sandbox maps (0-65535).
pub const USER_PATTERN: &str =
    "^(root|user|[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

fn env_map() -> Value {
    json!({
        "type": "object",
        "maxProperties": bounds::ENV_ENTRIES,
        "propertyNames": string(1, bounds::KEY_CHARS, "^[^=\\u0000]+$"),
        "additionalProperties": string(0, bounds::VALUE_CHARS, NO_NUL),
    })
}

/// Sets `value`'s keys into the schema at `pointer`, keeping what is there (its description).
fn set(doc: &mut Value, pointer: &str, value: Value) {
    if let (Some(Value::Object(t)), Value::Object(add)) = (doc.pointer_mut(pointer), value) {
        if !add.contains_key("$ref") {
            t.remove("$ref");
        }
        t.remove("oneOf");
        for (k, v) in add {
            t.insert(k, v);
        }
    }
}

/// What JSON Schema can say that the annotations cannot: the keys and values of maps, the first
/// element of `cmd`, paths and user names. The server checks exactly these bounds.
fn refine_schemas(doc: &mut Value) {
    let s = "/components/schemas";
    let user = json!({"type": ["string", "null"], "pattern": USER_PATTERN});
    set(doc, &format!("{s}/CreateSandbox/properties/env"), env_map());
    set(doc, &format!("{s}/RunSpec/properties/env"), env_map());
    set(doc, &format!("{s}/ExecRequest/properties/env"), env_map());
    set(
        doc,
        &format!("{s}/CreateSandbox/properties/metadata"),
        json!({
            "type": "object",
            "maxProperties": bounds::METADATA_ENTRIES,
            "propertyNames": string(1, bounds::KEY_CHARS, NO_NUL_NONEMPTY),
            "additionalProperties": string(0, bounds::VALUE_CHARS, NO_NUL),
        }),
    );
    set(
        doc,
        &format!("{s}/CreateSandbox/properties/files"),
        json!({
            "type": "object",
            "maxProperties": bounds::FILES,
            "propertyNames": path_schema(),
            "additionalProperties": {"type": "string", "maxLength": bounds::FILE_CHARS},
        }),
    );
    set(
        doc,
        &format!("{s}/RunSpec/properties/memory_tokens"),
        json!({
            "type": "array",
            "maxItems": bounds::MEMORY_TOKENS,
            "items": {"type": "string", "maxLength": bounds::MEMORY_TOKEN_CHARS},
        }),
    );
    set(
        doc,
        &format!("{s}/ExecRequest/properties/cmd"),
        json!({
            "prefixItems": [string(1, bounds::PATH_CHARS, NO_NUL_NONEMPTY)],
            "items": {"type": "string", "pattern": NO_NUL},
        }),
    );
    set(
        doc,
        &format!("{s}/ExecRequest/properties/cwd"),
        json!({"type": ["string", "null"], "minLength": 1, "maxLength": bounds::PATH_CHARS, "pattern": NO_NUL_NONEMPTY}),
    );
    set(
        doc,
        &format!("{s}/ExecRequest/properties/user"),
        user.clone(),
    );
    set(
        doc,
        &format!("{s}/MkdirRequest/properties/path"),
        path_schema(),
    );
    set(doc, &format!("{s}/MkdirRequest/properties/user"), user);
    set(
        doc,
        &format!("{s}/RenameRequest/properties/from"),
        path_schema(),
    );
    set(
        doc,
        &format!("{s}/RenameRequest/properties/to"),
        path_schema(),
    );
    set(
        doc,
        &format!("{s}/SignalRequest/properties/signal"),
        json!({"minimum": 1, "maximum": 64}),
    );
    set(
        doc,
        &format!("{s}/CreateUser/properties/name"),
        json!({"pattern": "^[A-Za-z0-9._-]{1,64}$"}),
    );
    // Egress entries: an IPv4 address or CIDR, or a domain name (`*.` for subdomains only).
    let entry = json!({
        "type": "string",
        "maxLength": 253,
        "pattern": "^([0-9]{1,3}(\\.[0-9]{1,3}){3}(/[0-9]{1,2})?|(\\*\\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\\.?)$",
    });
    for schema in ["NetworkPolicy", "NetworkPatch"] {
        for list in ["allow_out", "deny_out"] {
            set(
                doc,
                &format!("{s}/{schema}/properties/{list}"),
                json!({"items": entry.clone()}),
            );
        }
    }
    // A background process takes stdin through attach: its request is an exec request whose
    // `stdin` is absent or empty.
    if let Some(exec) = doc.pointer(&format!("{s}/ExecRequest")).cloned() {
        let mut start = exec;
        start["description"] =
            json!("Body of `POST /v1/sandboxes/{id}/processes`: an exec request without stdin.");
        start["properties"]["stdin"] = json!({"type": ["string", "null"], "maxLength": 0});
        if let Some(schemas) = doc
            .pointer_mut("/components/schemas")
            .and_then(Value::as_object_mut)
        {
            schemas.insert("StartProcess".into(), start);
        }
        set(
            doc,
            "/paths/~1v1~1sandboxes~1{id}~1processes/post/requestBody/content/application~1json/schema",
            json!({"$ref": "#/components/schemas/StartProcess"}),
        );
    }
    // An upload's body may be empty (an empty file).
    if let Some(b) = doc.pointer_mut("/paths/~1v1~1sandboxes~1{id}~1files/put/requestBody") {
        b["required"] = json!(false);
    }
    // A buffered exec has no terminal and does not outlive its request.
    if let Some(exec) = doc.pointer(&format!("{s}/ExecRequest")).cloned() {
        let mut buffered = exec;
        buffered["description"] = json!(
            "Body of `POST /v1/sandboxes/{id}/exec`: an exec request without a terminal or background."
        );
        buffered["properties"]["pty"] = json!({"type": "null"});
        buffered["properties"]["background"] = json!({"type": "boolean", "const": false});
        if let Some(schemas) = doc
            .pointer_mut("/components/schemas")
            .and_then(Value::as_object_mut)
        {
            schemas.insert("BufferedExec".into(), buffered);
        }
        set(
            doc,
            "/paths/~1v1~1sandboxes~1{id}~1exec/post/requestBody/content/application~1json/schema",
            json!({"$ref": "#/components/schemas/BufferedExec"}),
        );
    }
}

/// Path parameters the handlers take as strings and parse themselves: their types and bounds.
fn refine_path_parameters(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        // `{x}` in the template: the handlers' own extractor (`ApiPath`) is not one utoipa sees.
        let names: Vec<String> = path
            .split('{')
            .skip(1)
            .filter_map(|s| s.split_once('}').map(|(n, _)| n.to_string()))
            .collect();
        for op in ops.values_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            let params = op
                .entry("parameters")
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("parameters is an array");
            for n in &names {
                if !params
                    .iter()
                    .any(|p| p["in"] == "path" && p["name"] == n.as_str())
                {
                    params.push(json!({"name": n, "in": "path", "required": true, "schema": {"type": "string"}}));
                }
            }
            for p in params.iter_mut().filter(|p| p["in"] == "path") {
                let schema = match p["name"].as_str().unwrap_or_default() {
                    "id" => json!({"type": "string", "minLength": 1}),
                    "port" => json!({"type": "integer", "minimum": 1, "maximum": 65535}),
                    "pid" => json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}),
                    "name" if path.starts_with("/v1/pools/") => {
                        json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,63}$"})
                    }
                    "name" if path.starts_with("/v1/admin/users/") => {
                        json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"})
                    }
                    _ => continue,
                };
                p["schema"] = schema;
            }
        }
    }
}

/// What a created sandbox can be used with next (OpenAPI links; property-based testers follow
/// them). Renaming is left out: it needs a file that exists first.
fn links(doc: &mut Value) {
    let ops = [
        "get_sandbox",
        "delete_sandbox",
        "pause_sandbox",
        "resume_sandbox",
        "hibernate_sandbox",
        "set_timeout",
        "start_run",
        "end_run",
        "exec",
        "start_process",
        "list_processes",
        "download",
        "upload",
        "stat",
        "list",
        "mkdir",
        "remove",
        "put_network",
        "patch_network",
        "get_port",
        "put_port",
    ];
    let links: serde_json::Map<String, Value> = ops
        .iter()
        .map(|op| {
            (
                op.to_string(),
                json!({"operationId": op, "parameters": {"id": "$response.body#/id"}}),
            )
        })
        .collect();
    if let Some(created) = doc.pointer_mut("/paths/~1v1~1sandboxes/post/responses/201") {
        created["links"] = Value::Object(links);
    }
}

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}},
    })
}

fn retry_later(description: &str) -> Value {
    let mut e = error(description);
    e["headers"] = json!({"Retry-After": {
        "description": "seconds after which the same request may succeed",
        "schema": {"type": "integer", "minimum": 1},
    }});
    e
}

/// The answers every route of a kind can give, added where a route's own annotation does not
/// list them: a missing key (401), a malformed request (400), a body that is too large, of the
/// wrong type or too slow (413, 415, 408), the database or host unable to serve now (503 with
/// Retry-After), a sandbox that is not there or not in the right state (404, 409), its guest not
/// answering (502), a run out of tool calls (429) and a full disk (507).
fn standard_responses(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let open = OPEN.contains(&path.as_str());
        let in_sandbox = path.starts_with("/v1/sandboxes/{id}");
        let guest = in_sandbox
            && ["/exec", "/files", "/processes", "/terminal", "/run"]
                .iter()
                .any(|p| path.contains(p));
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (_method, op) in ops.iter_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            if open {
                op.insert("security".into(), json!([]));
                continue;
            }
            let body = op
                .get("requestBody")
                .and_then(|b| b.pointer("/content"))
                .and_then(Value::as_object)
                .map(|c| c.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            let json_body = body.iter().any(|c| c == "application/json");
            let responses = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("responses is an object");
            let mut add = |status: &str, v: Value| {
                responses.entry(status.to_string()).or_insert(v);
            };
            add("401", error("missing or invalid API key"));
            add("400", error("a malformed request: a parameter or body field the server does not accept (the message names it)"));
            add("503", retry_later("the database is busy or cannot be written, or the host is full; retry after Retry-After seconds"));
            if json_body {
                add("413", error("the body is over 1 MiB"));
                add("415", error("the body is not `application/json`"));
            }
            if !body.is_empty() {
                add("408", error("the body arrived too slowly"));
            }
            if in_sandbox {
                add(
                    "404",
                    error("no such sandbox (or not yours), or no such file or process"),
                );
                add("409", error("the sandbox is not in a state this allows (e.g. paused), or its run has ended"));
            }
            if guest {
                add("502", error("the sandbox's guest agent did not answer"));
                add(
                    "429",
                    retry_later("the sandbox's run has used all its tool calls"),
                );
                add("507", error("the sandbox's disk is full"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Regenerate with `BURROW_UPDATE_OPENAPI=1 cargo test -p burrow-server openapi`.
    #[test]
    fn committed_openapi_document_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let generated = super::document();
        if std::env::var_os("BURROW_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is out of date: run BURROW_UPDATE_OPENAPI=1 cargo test -p burrow-server openapi"
        );
    }
}
