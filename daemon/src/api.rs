//! The HTTP API (axum): routes, their JSON shapes, and the OpenAPI document generated from the
//! same types and handler annotations (utoipa), so that the document cannot drift from what the
//! handlers do.
//!
//! Every answer is JSON except the logs (text) and the metrics (Prometheus text); every error is
//! `{"error": "..."}` with a 4xx or 5xx status, extractor rejections included (malformed JSON,
//! unknown fields, a body over the limit, a bad query). Handlers call the supervisor from
//! `spawn_blocking`: it commits to redb and talks to processes, which must not block the
//! runtime's workers.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::error::ApiError;
use crate::store::{ComponentKind, ComponentRecord, Digest, Put, RestartPolicy, TenantSpec};
use crate::supervisor::{State as TenantState, Status, Supervisor, TenantView};

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: &'static str,
    /// The daemon's version.
    pub version: &'static str,
    /// Tenants held.
    pub tenants: usize,
    /// The front door's address (HTTP tenants are reached there), if it listens.
    pub http_listen: Option<String>,
}

/// The upload body: a component's bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ComponentBytes(#[allow(dead_code)] Vec<u8>);

/// `DELETE /v1/tenants/{name}` options.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also delete the tenant's data (key-value store, log).
    #[serde(default)]
    pub purge: bool,
}

/// `GET /v1/tenants/{name}` options.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GetQuery {
    /// Answer once the tenant has settled (exited, failed or stopped with no restart pending).
    #[serde(default)]
    pub wait: bool,
    /// How long to wait at most, in seconds (default 60, at most 600).
    pub timeout_s: Option<u64>,
}

/// `GET /v1/tenants/{name}/logs` options.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep the answer open and stream new lines until the tenant settles.
    #[serde(default)]
    pub follow: bool,
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "wasmvisor",
        description = "Launch and manage WebAssembly tenants, each in its own micro-VM. Over TCP every request needs `Authorization: Bearer <token>`."
    ),
    paths(
        health,
        upload_component,
        list_components,
        get_component,
        delete_component,
        put_tenant,
        list_tenants,
        get_tenant,
        delete_tenant,
        tenant_logs,
        metrics,
        openapi_json
    ),
    components(schemas(
        ErrorBody,
        Health,
        ComponentRecord,
        ComponentKind,
        Digest,
        TenantSpec,
        RestartPolicy,
        TenantView,
        Status,
        TenantState
    ))
)]
pub struct ApiDoc;

#[derive(Clone)]
struct AppState {
    sup: Arc<Supervisor>,
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("API types serialize");
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(status = self.status, error = %self.message, "API failure");
        }
        json_response(status, &ErrorBody { error: self.message })
    }
}

fn rejected(status: StatusCode, text: String) -> ApiError {
    ApiError { status: status.as_u16(), message: text }
}

fn body_rejected(r: BytesRejection) -> ApiError {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return rejected(status, "the request body is larger than this daemon accepts".into());
    }
    rejected(status, format!("cannot read the request body: {}", r.body_text()))
}

fn query_rejected(r: QueryRejection) -> ApiError {
    rejected(StatusCode::BAD_REQUEST, format!("bad query: {}", r.body_text()))
}

fn path_rejected(r: PathRejection) -> ApiError {
    rejected(StatusCode::BAD_REQUEST, format!("bad path: {}", r.body_text()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("the request's task failed: {e}")))?
}

/// The API's routes over `sup`; component uploads are accepted up to `max_component_bytes`.
pub fn router(sup: Arc<Supervisor>, max_component_bytes: usize) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route(
            "/v1/components",
            get(list_components).post(upload_component).layer(DefaultBodyLimit::max(max_component_bytes)),
        )
        .route("/v1/components/{digest}", get(get_component).delete(delete_component))
        .route("/v1/tenants", get(list_tenants))
        .route("/v1/tenants/{name}", get(get_tenant).put(put_tenant).delete(delete_tenant))
        .route("/v1/tenants/{name}/logs", get(tenant_logs))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(AppState { sup })
}

/// Requires `Authorization: Bearer <token>` (for the TCP listener).
pub fn with_token(router: Router, token: String) -> Router {
    let token: Arc<[u8]> = Arc::from(format!("Bearer {token}").into_bytes());
    router.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
        let token = token.clone();
        async move {
            let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
            if !constant_time_eq(given, &token) {
                let mut r =
                    ApiError { status: 401, message: "a valid bearer token is required".into() }.into_response();
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            next.run(req).await
        }
    }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route (see GET /v1/openapi.json)")
}

async fn method_not_allowed() -> ApiError {
    ApiError { status: 405, message: "method not allowed on this route (see GET /v1/openapi.json)".into() }
}

/// Whether the daemon answers.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, description = "OK", body = Health)))]
async fn health(State(app): State<AppState>) -> Response {
    let tenants = app.sup.tenants().len();
    let http_listen = app.sup.http_addr().map(|a| a.to_string());
    json_response(StatusCode::OK, &Health { status: "ok", version: env!("CARGO_PKG_VERSION"), tenants, http_listen })
}

/// Uploads a component: stores it content-addressed and compiles it for the guest; answers
/// once the artifact is cached.
#[utoipa::path(
    post,
    path = "/v1/components",
    request_body(content = ComponentBytes, content_type = "application/wasm"),
    responses(
        (status = 201, description = "Stored and compiled", body = ComponentRecord),
        (status = 400, description = "Not a component this daemon can run", body = ErrorBody),
        (status = 413, description = "Larger than the daemon accepts", body = ErrorBody)
    )
)]
async fn upload_component(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_rejected)?;
    if body.is_empty() {
        return Err(ApiError::bad_request("the body is empty: send the component's bytes"));
    }
    let record = blocking(move || app.sup.upload(&body)).await?;
    Ok(json_response(StatusCode::CREATED, &record))
}

/// Every stored component.
#[utoipa::path(get, path = "/v1/components", responses((status = 200, description = "OK", body = Vec<ComponentRecord>)))]
async fn list_components(State(app): State<AppState>) -> Result<Response, ApiError> {
    let list = blocking(move || app.sup.components()).await?;
    Ok(json_response(StatusCode::OK, &list))
}

/// One stored component.
#[utoipa::path(
    get,
    path = "/v1/components/{digest}",
    params(("digest" = String, Path, description = "sha256:<hex>")),
    responses((status = 200, description = "OK", body = ComponentRecord), (status = 400, description = "Refused: the request is wrong", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody))
)]
async fn get_component(
    State(app): State<AppState>,
    digest: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(digest) = digest.map_err(path_rejected)?;
    let record = blocking(move || app.sup.component(&digest)).await?;
    Ok(json_response(StatusCode::OK, &record))
}

/// Deletes a component no tenant uses.
#[utoipa::path(
    delete,
    path = "/v1/components/{digest}",
    params(("digest" = String, Path, description = "sha256:<hex>")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Refused: the request is wrong", body = ErrorBody),
        (status = 404, description = "Not found", body = ErrorBody),
        (status = 409, description = "A tenant uses it", body = ErrorBody)
    )
)]
async fn delete_component(
    State(app): State<AppState>,
    digest: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(digest) = digest.map_err(path_rejected)?;
    blocking(move || app.sup.delete_component(&digest)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates or replaces a tenant and (re)starts it.
#[utoipa::path(
    put,
    path = "/v1/tenants/{name}",
    params(("name" = String, Path, description = "Letters, digits, '_', '.', '-'; at most 64")),
    request_body = TenantSpec,
    responses(
        (status = 201, description = "Created", body = TenantView),
        (status = 200, description = "Replaced (see `generation`)", body = TenantView),
        (status = 400, description = "Refused: the request is wrong", body = ErrorBody),
        (status = 409, description = "The tenant's store is held by another process", body = ErrorBody)
    )
)]
async fn put_tenant(
    State(app): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(path_rejected)?;
    let body = body.map_err(body_rejected)?;
    let spec: TenantSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad tenant spec: {e}")))?;
    let (put, view) = blocking(move || app.sup.put_tenant(&name, spec)).await?;
    let status = match put {
        Put::Created => StatusCode::CREATED,
        Put::Replaced(_) => StatusCode::OK,
    };
    Ok(json_response(status, &view))
}

/// Every tenant, with its status.
#[utoipa::path(get, path = "/v1/tenants", responses((status = 200, description = "OK", body = Vec<TenantView>)))]
async fn list_tenants(State(app): State<AppState>) -> Response {
    json_response(StatusCode::OK, &app.sup.tenants())
}

/// One tenant, with its status; `?wait=true` answers once it has settled.
#[utoipa::path(
    get,
    path = "/v1/tenants/{name}",
    params(("name" = String, Path), GetQuery),
    responses((status = 200, description = "OK", body = TenantView), (status = 400, description = "Refused: the request is wrong", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody))
)]
async fn get_tenant(
    State(app): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(path_rejected)?;
    let Query(query) = query.map_err(query_rejected)?;
    let tenant = app.sup.tenant(&name)?;
    if query.wait {
        let timeout = Duration::from_secs(query.timeout_s.unwrap_or(60).min(600));
        let mut changes = tenant.watch();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changes.borrow_and_update();
            if tenant.view().status.settled() {
                break;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
    Ok(json_response(StatusCode::OK, &tenant.view()))
}

/// Deletes a tenant and stops its VM; `?purge=true` also deletes its data.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{name}",
    params(("name" = String, Path), DeleteQuery),
    responses((status = 204, description = "Deleted"), (status = 400, description = "Refused: the request is wrong", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody))
)]
async fn delete_tenant(
    State(app): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = name.map_err(path_rejected)?;
    let Query(query) = query.map_err(query_rejected)?;
    blocking(move || app.sup.delete_tenant(&name, query.purge)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The tenant's log: stdout and stderr lines and log records, in order, each tagged
/// (`<time> stdout|stderr|<LEVEL> ...`); `?follow=true` streams until the tenant settles.
#[utoipa::path(
    get,
    path = "/v1/tenants/{name}/logs",
    params(("name" = String, Path), LogsQuery),
    responses((status = 200, description = "OK", content_type = "text/plain", body = String), (status = 400, description = "Refused: the request is wrong", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody))
)]
async fn tenant_logs(
    State(app): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(path_rejected)?;
    let Query(query) = query.map_err(query_rejected)?;
    let tenant = app.sup.tenant(&name)?;
    let text_response = |body: Body| {
        let mut r = (StatusCode::OK, body).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if !query.follow {
        let t = tenant.clone();
        let text =
            blocking(move || t.log_text().map_err(|e| ApiError::internal(format!("cannot read the log: {e}")))).await?;
        return Ok(text_response(Body::from(text)));
    }
    let t = tenant.clone();
    let (text, lines) =
        blocking(move || t.follow().map_err(|e| ApiError::internal(format!("cannot read the log: {e}")))).await?;
    let changes = tenant.watch();
    let state = Follow { first: Some(text), lines, changes, tenant, draining: false };
    let stream = futures_util::stream::unfold(state, |mut f| async move {
        let chunk = f.next().await?;
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(chunk)), f))
    });
    Ok(text_response(Body::from_stream(stream)))
}

struct Follow {
    first: Option<String>,
    lines: tokio::sync::broadcast::Receiver<Arc<str>>,
    changes: tokio::sync::watch::Receiver<u64>,
    tenant: Arc<crate::supervisor::Tenant>,
    draining: bool,
}

impl Follow {
    /// The next chunk to send; `None` ends the stream.
    async fn next(&mut self) -> Option<String> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            if self.draining {
                // Settled: what is already queued, then the end.
                return match self.lines.try_recv() {
                    Ok(line) => Some(format!("{line}\n")),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => Some(lagged(n)),
                    Err(_) => None,
                };
            }
            if self.tenant.view().status.settled() {
                self.draining = true;
                continue;
            }
            tokio::select! {
                line = self.lines.recv() => return match line {
                    Ok(line) => Some(format!("{line}\n")),
                    Err(RecvError::Lagged(n)) => Some(lagged(n)),
                    Err(RecvError::Closed) => None,
                },
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        self.draining = true;
                    }
                }
            }
        }
    }
}

fn lagged(n: u64) -> String {
    format!("[wasmvisor: {n} lines were written faster than this follower read them; they are in the log]\n")
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OK", content_type = "text/plain", body = String)))]
async fn metrics(State(app): State<AppState>) -> Response {
    app.sup.update_gauges();
    let mut r = (StatusCode::OK, app.sup.metrics().encode()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "The OpenAPI document")))]
async fn openapi_json() -> Response {
    let mut r = (StatusCode::OK, ApiDoc::openapi().to_pretty_json().expect("the document serializes")).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut listed: Vec<String> = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                listed.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        listed.sort();
        let mut expected = vec![
            "GET /v1/health",
            "POST /v1/components",
            "GET /v1/components",
            "GET /v1/components/{digest}",
            "DELETE /v1/components/{digest}",
            "PUT /v1/tenants/{name}",
            "GET /v1/tenants",
            "GET /v1/tenants/{name}",
            "DELETE /v1/tenants/{name}",
            "GET /v1/tenants/{name}/logs",
            "GET /metrics",
            "GET /v1/openapi.json",
        ];
        expected.sort();
        assert_eq!(listed, expected);
        // The spec schema refuses unknown fields, as the handler does.
        assert_eq!(doc["components"]["schemas"]["TenantSpec"]["additionalProperties"], serde_json::json!(false));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abd", b"Bearer abc"));
    }
}
