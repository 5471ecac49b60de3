//! The OpenAPI document, generated from the handlers' annotations. The committed copy at
//! `docs/openapi.json` is checked against it by a test, so the published API cannot drift.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, callbacks, exec, files, network, pools, sandboxes};

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
        files::download, files::upload, files::stat, files::list, files::mkdir, files::rename, files::remove,
        network::put_network, network::patch_network, network::get_port, network::put_port, network::firewall,
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

/// The document as committed: pretty JSON with a trailing newline.
pub fn document() -> String {
    let mut s = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "this document")))]
pub async fn serve() -> Json<serde_json::Value> {
    Json(serde_json::to_value(ApiDoc::openapi()).unwrap_or_default())
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
