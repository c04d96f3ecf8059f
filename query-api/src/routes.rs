//! HTTP routes: authentication, parameter parsing, the cache, ClickHouse and the answer with
//! `Cache-Control`/`ETag` (and `304` on a matching `If-None-Match`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Extensions, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use chute_common::admin::Readiness;
use chute_common::auth::ApiKeys;
use chute_common::tls::ClientIdentity;
use chute_common::validate::unix_millis_now;
use clickhouse::{RowOwned, RowRead};
use tokio_util::sync::CancellationToken;

use crate::cache::{Cached, ResponseCache};
use crate::config::Config;
use crate::endpoint::{self, QueryEndpoint};
use crate::error::{ApiError, Error, Result};
use crate::gate::QueryGate;
use crate::live::StreamHub;
use crate::params::{check_tenant, touches_now, EndpointQuery, Params, QueryLimits, StreamQuery};
use crate::sql::Statement;
use crate::telemetry;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    clickhouse: clickhouse::Client,
    cache: ResponseCache,
    keys: Option<ApiKeys>,
    limits: QueryLimits,
    gate: QueryGate,
    max_execution_time: Duration,
    max_result_rows: u64,
    max_memory_usage: u64,
    max_rows_to_read: u64,
    hub: Option<StreamHub>,
    readiness: Readiness,
    shutdown: CancellationToken,
}

impl AppState {
    /// `clickhouse` must already point at the Chute database. Loads the API keys file.
    pub fn new(
        clickhouse: clickhouse::Client,
        config: &Config,
        hub: Option<StreamHub>,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        // The recorder must exist before the first metric (tests build the state without `run`).
        telemetry::describe();
        let keys = match &config.api_keys.file {
            Some(path) => Some(ApiKeys::load(path)?),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                clickhouse,
                cache: ResponseCache::new(
                    config.cache_capacity,
                    config.cache_fresh_ttl,
                    config.cache_historical_ttl,
                ),
                keys,
                limits: QueryLimits {
                    max_points: config.max_points,
                    max_rows: config.max_result_rows,
                    max_raw_range_ms: i64::try_from(config.max_raw_range.as_millis()).unwrap_or(i64::MAX),
                },
                gate: QueryGate::new(
                    config.max_concurrent_queries,
                    config.max_queued_queries,
                    config.query_queue_wait,
                ),
                max_execution_time: config.max_execution_time,
                max_result_rows: config.max_result_rows,
                max_memory_usage: config.max_memory_usage,
                max_rows_to_read: config.max_rows_to_read,
                hub,
                readiness,
                shutdown,
            }),
        })
    }

    pub fn cache(&self) -> &ResponseCache {
        &self.inner.cache
    }

    pub fn readiness(&self) -> &Readiness {
        &self.inner.readiness
    }

    pub fn clickhouse(&self) -> &clickhouse::Client {
        &self.inner.clickhouse
    }

    /// The tenant a request may read. With API keys: the key's (or, with mutual TLS, the client
    /// certificate's) tenant, and a `tenant` parameter naming another one is refused (403).
    /// Without: the required `tenant` parameter.
    fn tenant(&self, headers: &HeaderMap, extensions: &Extensions, pairs: &[(String, String)]) -> Result<String> {
        let requested = pairs
            .iter()
            .find(|(name, _)| name == "tenant")
            .map(|(_, value)| value.as_str())
            .filter(|value| !value.is_empty());
        let Some(keys) = &self.inner.keys else {
            let tenant = requested.ok_or_else(|| Error::invalid("tenant", "tenant is required"))?;
            check_tenant(tenant)?;
            return Ok(tenant.to_owned());
        };
        let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        let client_names = extensions
            .get::<ConnectInfo<ClientIdentity>>()
            .map_or(&[][..], |ConnectInfo(client)| client.names());
        let key_tenant = keys.authenticate_caller(authorization, client_names)?;
        match requested {
            Some(requested) if requested != key_tenant => Err(Error::Forbidden {
                key_tenant: key_tenant.to_owned(),
                requested: requested.chars().take(64).collect(),
            }),
            _ => Ok(key_tenant.to_owned()),
        }
    }

    /// Runs one statement with the per-query limits.
    async fn fetch<T>(&self, statement: Statement) -> Result<Vec<T>>
    where
        T: RowOwned + RowRead,
    {
        let mut query = self
            .inner
            .clickhouse
            .query(&statement.sql)
            .with_setting(
                "max_execution_time",
                self.inner.max_execution_time.as_secs_f64().to_string(),
            )
            .with_setting("max_result_rows", self.inner.max_result_rows.to_string())
            .with_setting("result_overflow_mode", "throw")
            // Per-query limits the query API's user (readonly = 2) may set on itself.
            .with_setting("max_memory_usage", self.inner.max_memory_usage.to_string())
            .with_setting("max_rows_to_read", self.inner.max_rows_to_read.to_string());
        for (name, value) in &statement.params {
            query = query.param(name, value);
        }
        // Held until the rows are read: the ClickHouse query slot.
        let _slot = self.inner.gate.enter().await?;
        let started = Instant::now();
        let result = query.fetch_all::<T>().await;
        telemetry::clickhouse_query(started.elapsed(), result.is_ok());
        result.map_err(|err| {
            tracing::warn!(error = %err, "clickhouse query failed");
            Error::from(err)
        })
    }

    /// `private` with API keys (answers are per caller), `public` without.
    fn respond(&self, headers: &HeaderMap, cached: &Cached) -> Response {
        let scope = if self.inner.keys.is_some() { "private" } else { "public" };
        let max_age = self.inner.cache.max_age(cached).as_secs().max(1);
        let cache_control = HeaderValue::from_str(&format!("{scope}, max-age={max_age}")).expect("ascii header value");
        let etag = HeaderValue::from_str(&cached.etag).expect("hex etag");
        let not_modified = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                value
                    .split(',')
                    .map(|tag| tag.trim().trim_start_matches("W/"))
                    .any(|tag| tag == cached.etag || tag == "*")
            });
        let mut response = if not_modified {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut response = cached.body.clone().into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        };
        response.headers_mut().insert(header::CACHE_CONTROL, cache_control);
        response.headers_mut().insert(header::ETAG, etag);
        response
    }
}

/// The router: `/v1/*`, `/openapi.json` and the admin endpoints (`/metrics`, `/healthz`,
/// `/readyz`).
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/timeseries", serve(endpoint::TIMESERIES))
        .route("/v1/top", serve(endpoint::TOP))
        .route("/v1/sessions", serve(endpoint::SESSIONS))
        .route("/v1/events", serve(endpoint::EVENTS))
        .route("/v1/stream", get(stream))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(crate::openapi::document()) }),
        )
        .with_state(state.clone());
    api.merge(crate::page::router())
        .merge(chute_common::admin::router(state.inner.readiness.clone()))
        .layer(axum::middleware::from_fn(track))
}

/// Where every `/v1` handler starts: the query pairs and the tenant the caller may read
/// ([`AppState::tenant`]). A query string that does not parse is axum's 400, as before any
/// tenant check.
struct Caller {
    tenant: String,
    pairs: Vec<(String, String)>,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Query(pairs) = Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let tenant = state
            .tenant(&parts.headers, &parts.extensions, &pairs)
            .map_err(|err| ApiError::from(err).into_response())?;
        Ok(Self { tenant, pairs })
    }
}

/// The `GET` handler of a query endpoint.
fn serve<Q, R>(endpoint: QueryEndpoint<Q, R>) -> MethodRouter<AppState>
where
    Q: EndpointQuery + Send + 'static,
    R: RowOwned + RowRead + Send + 'static,
{
    get(move |state: State<AppState>, headers: HeaderMap, caller: Caller| {
        query_endpoint(endpoint, state, headers, caller)
    })
}

/// Every query endpoint: the tenant, parsing, the cached answer (one ClickHouse query for
/// concurrent identical misses; failures are not cached) and the answer with its cache headers.
async fn query_endpoint<Q, R>(
    endpoint: QueryEndpoint<Q, R>,
    State(state): State<AppState>,
    headers: HeaderMap,
    Caller { tenant, pairs }: Caller,
) -> Result<Response, ApiError>
where
    Q: EndpointQuery + Send + 'static,
    R: RowOwned + RowRead + Send + 'static,
{
    let params = Params::new(pairs, Q::PARAMETERS)?;
    let now_ms = unix_millis_now();
    let query = Q::parse(&tenant, &params, now_ms, state.inner.limits)?;
    let fresh = touches_now(query.range_end_ms(), now_ms);
    let key = format!("{query:?}");
    let loader = state.clone();
    let load = async move {
        let rows: Vec<R> = loader.fetch((endpoint.statement)(&query)).await?;
        Ok((endpoint.render)(&query, &rows))
    };
    let cached = state.inner.cache.get_or_load(key, fresh, load).await?;
    Ok(state.respond(&headers, &cached))
}

async fn stream(State(state): State<AppState>, Caller { tenant, pairs }: Caller) -> Result<Response, ApiError> {
    let params = Params::new(pairs, StreamQuery::PARAMETERS)?;
    let filter = StreamQuery::parse(&tenant, &params)?;
    let hub = state
        .inner
        .hub
        .as_ref()
        .ok_or_else(|| Error::StreamUnavailable("no NATS url configured"))?;
    let events = crate::live::subscribe(hub, filter, state.inner.shutdown.clone())?;
    let mut response = Sse::new(events).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Request count and latency by endpoint (a fixed set of labels, whatever the path).
async fn track(request: Request, next: Next) -> Response {
    let endpoint = match request.uri().path() {
        "/v1/timeseries" => "timeseries",
        "/v1/top" => "top",
        "/v1/sessions" => "sessions",
        "/v1/events" => "events",
        "/v1/stream" => "stream",
        "/openapi.json" => "openapi",
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/" => "page",
        path if path.starts_with("/assets/") => "page",
        _ => "other",
    };
    let started = Instant::now();
    let mut response = next.run(request).await;
    let elapsed = started.elapsed();
    telemetry::request_finished(endpoint, response.status().as_u16(), elapsed);
    response.headers_mut().insert("server-timing", server_timing(elapsed));
    response
}

/// `Server-Timing: app;dur=<ms>`: the query API's own time for the request (routing, parsing,
/// cache, ClickHouse on a miss, rendering; for `/v1/stream` until the stream is set up), in
/// milliseconds with microsecond resolution, so a client can tell server time from transport.
fn server_timing(elapsed: Duration) -> HeaderValue {
    let value = format!("app;dur={:.3}", elapsed.as_secs_f64() * 1000.0);
    HeaderValue::from_str(&value).expect("ascii header value")
}
