//! HTTPS and mutual TLS on the query API's listener with Python's http.client and ssl as the
//! client, certificates generated in the test; reload on file change for new connections only.

use std::time::{Duration, Instant};

use chute_common::testing::certs::TestCa;
use serde_json::json;

use crate::edge::{path, PythonHttpsClient, RunningApi};

#[tokio::test]
async fn https_with_client_certificates_mapped_to_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("chute test ca");
    let ca_file = path(&ca.write(dir.path(), "ca.pem"));
    let (cert, key) = ca.server("query-api").write(dir.path(), "server");
    let (acme_cert, acme_key) = ca
        .client("dashboards", &["spiffe://acme/dashboards"])
        .write(dir.path(), "acme");
    let (stranger_cert, stranger_key) = ca.client("stranger", &[]).write(dir.path(), "stranger");
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        "globex globex-key-0123456789\n[client-certs]\nacme spiffe://acme/dashboards\n",
    )
    .unwrap();
    let client_ca = ca.write(dir.path(), "client-ca.pem");
    let running = RunningApi::start("qa_tls_mutual", |config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.tls.client_ca = Some(client_ca);
        config.api_keys.file = Some(keys);
    })
    .await;
    let mut python = PythonHttpsClient::start(running.addr).await;
    let get = |conn: &str, cert: &std::path::Path, key: &std::path::Path, path: &str| json!({"conn": conn, "ca": ca_file, "cert": crate::edge::path(cert), "key_file": crate::edge::path(key), "path": path});

    // The certificate alone authenticates, as tenant acme.
    let answer = python.get(get("acme", &acme_cert, &acme_key, "/v1/timeseries")).await;
    assert_eq!(answer["status"], 200, "{answer}");
    let answer = python
        .get(get("acme", &acme_cert, &acme_key, "/v1/timeseries?tenant=acme"))
        .await;
    assert_eq!(answer["status"], 200, "{answer}");
    let other = python
        .get(get("acme", &acme_cert, &acme_key, "/v1/timeseries?tenant=globex"))
        .await;
    assert_eq!(other["status"], 403, "{other}");
    assert_eq!(other["reused"], true, "one kept-alive connection");

    let unmapped = python
        .get(get("stranger", &stranger_cert, &stranger_key, "/v1/timeseries"))
        .await;
    assert_eq!(unmapped["status"], 401, "{unmapped}");
    assert!(unmapped["body"].as_str().unwrap().contains("stranger"), "{unmapped}");
    let mut with_key = get("stranger", &stranger_cert, &stranger_key, "/v1/timeseries");
    with_key["headers"] = json!({"authorization": "Bearer globex-key-0123456789"});
    assert_eq!(python.get(with_key).await["status"], 200);

    let no_cert = python
        .get(json!({"conn": "no-cert", "ca": ca_file, "path": "/healthz"}))
        .await;
    assert_eq!(no_cert["ok"], false, "{no_cert}");
    let plaintext = python.get(json!({"conn": "plain", "path": "/healthz"})).await;
    assert_eq!(plaintext["ok"], false, "{plaintext}");

    // Probes and scrapers without a certificate use the plaintext admin listener.
    let deadline = Instant::now() + Duration::from_secs(20);
    while chute_common::testing::http_get(running.admin_addr, "/readyz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz on the admin listener never became 200"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, metrics) = chute_common::testing::http_get(running.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("chute_tls_handshake_failures_total"), "{metrics}");
    let (status, _) = chute_common::testing::http_get(running.admin_addr, "/v1/timeseries").await;
    assert_eq!(status, 404, "only the admin endpoints are on the admin listener");
    running.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_serves_new_connections_and_old_ones_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (TestCa::new("old ca"), TestCa::new("new ca"));
    let old_ca_file = path(&old_ca.write(dir.path(), "old-ca.pem"));
    let new_ca_file = path(&new_ca.write(dir.path(), "new-ca.pem"));
    let old_server = old_ca.server("query-api");
    let (cert, key) = old_server.write(dir.path(), "server");
    let running = RunningApi::start("qa_tls_reload", |config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.tls.reload_interval = Duration::from_millis(100);
    })
    .await;
    let mut python = PythonHttpsClient::start(running.addr).await;
    let old = python.get(json!({"conn": "old", "ca": old_ca_file})).await;
    assert_eq!(old["status"], 200, "{old}");
    assert_eq!(old["peer_cert"], hex(&old_server.der));

    let new_server = new_ca.server("query-api");
    new_server.write(dir.path(), "server");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    let fresh = loop {
        attempt += 1;
        let answer = python
            .get(json!({"conn": format!("new-{attempt}"), "ca": new_ca_file}))
            .await;
        if answer["ok"] == true {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "no new connection saw the new certificate: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(fresh["peer_cert"], hex(&new_server.der));

    let again = python.get(json!({"conn": "old", "ca": old_ca_file})).await;
    assert_eq!(again["status"], 200, "{again}");
    assert_eq!(again["reused"], true, "the same connection, made before the reload");
    assert_eq!(again["peer_cert"], hex(&old_server.der));
    let refused = python.get(json!({"conn": "old-ca-new", "ca": old_ca_file})).await;
    assert_eq!(
        refused["ok"], false,
        "a new connection gets the new certificate: {refused}"
    );

    let metrics = chute_common::telemetry::prometheus_handle().render();
    assert!(metrics.contains("chute_tls_reloads_total{outcome=\"ok\"}"), "{metrics}");
    running.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
