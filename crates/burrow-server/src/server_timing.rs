//! `Server-Timing` on request: a client that sends `Burrow-Timing: 1` gets the stages its request
//! went through (`burrow_node::timing`) and the whole request's time, as
//! `Server-Timing: store;dur=0.41, init-overlay;dur=1.93, ..., request;dur=18.20`. Others get
//! nothing extra. `burrow bench --breakdown` reads it.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use burrow_node::timing::{self, Timings};

/// The request header that asks for the breakdown.
pub const ASK: &str = "burrow-timing";

pub async fn layer(req: Request, next: Next) -> Response {
    if !req.headers().contains_key(ASK) {
        return next.run(req).await;
    }
    let t = Timings::new();
    let started = Instant::now();
    let mut resp = timing::scope(Some(t.clone()), next.run(req)).await;
    t.add("request", started.elapsed());
    if let Ok(v) = HeaderValue::from_str(&t.header_value()) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}
