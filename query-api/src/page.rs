//! The built-in live page: `GET /` serves a single-page dashboard for one tenant, and
//! `GET /assets/<file>` its scripts, styles and the vendored uPlot. Every file is embedded in the
//! binary at compile time (`include_bytes!`): no CDN, no build step, nothing read from disk or
//! downloaded at run time.
//!
//! The page reads the same public endpoints any client does (`/v1/timeseries`, `/v1/top`,
//! `/v1/sessions`, `/v1/events`, `/v1/stream`) with the same API key, so it needs no route or
//! privilege of its own. How it folds the live stream into rollup buckets is written down in
//! `assets/fold.js`.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!("../assets/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Everything under `/assets/`. `index.html` is served at `/` only.
static ASSETS: &[Asset] = &[
    asset!("app.js", JS),
    asset!("fold.js", JS),
    asset!("latency.js", JS),
    asset!("sse.js", JS),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("vendor/uplot/uPlot.esm.js", JS),
    asset!("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    asset!("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
    asset!("vendor/uplot/VERSION", "text/plain; charset=utf-8"),
];

static INDEX: &[u8] = include_bytes!("../assets/index.html");

/// Scripts, styles, images and API calls from this origin only; no inline script, no framing.
/// uPlot sizes its elements through the CSSOM (`element.style`), which `style-src 'self'` allows.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /` and `GET /assets/{*path}`, to be merged into the API router.
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{*path}", get(asset))
}

async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(path): Path<String>) -> Response {
    match find(&path) {
        Some(asset) => respond(asset.content_type, asset.body),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|asset| asset.path == path)
}

/// `no-cache`: the browser revalidates, so a new binary's page is never mixed with an old
/// cached script (the files are small and served from memory).
fn respond(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_the_page_imports_is_embedded() {
        let index = std::str::from_utf8(INDEX).unwrap();
        let mut referenced: Vec<String> = Vec::new();
        for text in std::iter::once(index).chain(
            ASSETS
                .iter()
                .filter(|asset| asset.content_type == JS && !asset.path.starts_with("vendor/"))
                .map(|asset| std::str::from_utf8(asset.body).unwrap()),
        ) {
            for quote in ['"', '\''] {
                for piece in text.split(quote) {
                    if let Some(path) = piece
                        .strip_prefix("/assets/")
                        .or_else(|| piece.strip_prefix("./"))
                        .filter(|path| path.ends_with(".js") || path.ends_with(".css") || path.ends_with(".svg"))
                    {
                        referenced.push(path.to_owned());
                    }
                }
            }
        }
        assert!(referenced.iter().any(|path| path == "app.js"), "{referenced:?}");
        for path in referenced {
            assert!(find(&path).is_some(), "{path} is referenced but not embedded");
        }
    }

    #[test]
    fn the_vendored_chart_library_keeps_its_license_and_version() {
        let license = std::str::from_utf8(find("vendor/uplot/LICENSE").unwrap().body).unwrap();
        assert!(license.contains("MIT License"));
        let version = std::str::from_utf8(find("vendor/uplot/VERSION").unwrap().body).unwrap();
        assert!(version.contains("1.6.32"));
        assert!(find("../Cargo.toml").is_none());
    }
}
