//! The live page (`GET /`, `/assets/*`): served from the binary with its security headers, and
//! its JavaScript unit tests (bucket folding, latency histogram, SSE reader) run under Node.
//! The page in a real browser against a real pipeline: deploy/tests/test_live_page.py.

use std::process::Command;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use chute_common::admin::Readiness;
use chute_query_api::{app, AppState, Config};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The router alone: serving the page touches neither ClickHouse nor NATS.
fn router() -> axum::Router {
    let config = Config::default();
    let state = AppState::new(
        chute_query_api::clickhouse_client(&config),
        &config,
        None,
        Readiness::default(),
        CancellationToken::new(),
    )
    .expect("state");
    app(state)
}

async fn get(uri: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let response = router()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let (status, headers, body) = get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert!(
        body.contains(r#"<script type="module" src="/assets/app.js">"#),
        "{body}"
    );
    let policy = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    assert!(!policy.contains("unsafe"), "{policy}");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");

    for (path, content_type, marker) in [
        (
            "/assets/app.js",
            "text/javascript; charset=utf-8",
            "window.chuteLatency",
        ),
        (
            "/assets/fold.js",
            "text/javascript; charset=utf-8",
            "export class SumBuckets",
        ),
        (
            "/assets/vendor/uplot/uPlot.esm.js",
            "text/javascript; charset=utf-8",
            "export { uPlot as default }",
        ),
        (
            "/assets/vendor/uplot/uPlot.min.css",
            "text/css; charset=utf-8",
            ".uplot",
        ),
        ("/assets/style.css", "text/css; charset=utf-8", "[data-theme=\"dark\"]"),
        ("/assets/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let (status, headers, body) = get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
        assert!(body.contains(marker), "{path} lacks {marker:?}");
    }
}

#[tokio::test]
async fn unknown_assets_and_path_tricks_are_404() {
    for path in [
        "/assets/nope.js",
        "/assets/../Cargo.toml",
        "/assets/%2e%2e/src/lib.rs",
        "/assets/",
        "/assets/vendor/uplot/../../app.js",
    ] {
        let (status, _, body) = get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
}

/// `node --test` over query-api/tests/js (Debian `nodejs`, installed by scripts/install-deps.sh).
#[test]
fn javascript_unit_tests_pass_under_node() {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = match Command::new("node")
        .arg("--test")
        .arg(crate_dir.join("tests/js"))
        .current_dir(crate_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!("cannot run `node` ({err}): install Node.js, e.g. `scripts/install-deps.sh` (apt nodejs)"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("node --test did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        status.success(),
        "node --test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A run that found no test file also exits 0.
    let passed = stdout
        .lines()
        .find_map(|line| line.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed >= 20, "expected the JS unit tests to run, got:\n{stdout}");
}
