//! TLS and mutual TLS on the gRPC listener, with Python grpcio as the client and certificates
//! generated in the test; reload on SIGHUP for new connections only.

use std::time::{Duration, Instant};

use chute_common::testing::certs::TestCa;
use serde_json::json;

use crate::edge::{path, ChildIngestor, PythonTlsClient};
use crate::support::TestIngestor;

const KEYS: &str = "globex globex-key-0123456789\n[client-certs]\nacme ingest.acme.internal\n";

#[tokio::test]
async fn grpcio_publishes_over_tls_and_a_plaintext_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("chute test ca");
    let ca_file = path(&ca.write(dir.path(), "ca.pem"));
    let (cert, key) = ca.server("ingestor").write(dir.path(), "server");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, KEYS).unwrap();
    let ingestor = TestIngestor::start_with(|config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.api_keys.file = Some(keys);
    })
    .await;
    let mut python = PythonTlsClient::start(ingestor.grpc_addr).await;

    let answer = python
        .publish(
            json!({"channel": "tls", "ca": ca_file, "api_key": "globex-key-0123456789", "idempotency_key": "tls-1"}),
        )
        .await;
    assert_eq!(answer, json!({"ok": true, "accepted": 1, "rejected": 0}));
    let no_key = python
        .publish(json!({"channel": "tls", "ca": ca_file, "tenant": "globex"}))
        .await;
    assert_eq!(no_key["code"], "UNAUTHENTICATED", "{no_key}");
    let plaintext = python
        .publish(json!({"channel": "plain", "api_key": "globex-key-0123456789"}))
        .await;
    assert_eq!(plaintext["ok"], false, "{plaintext}");
    assert_eq!(plaintext["code"], "UNAVAILABLE", "{plaintext}");

    let stored = ingestor.stored_messages().await;
    assert_eq!(stored.len(), 1, "only the TLS call with a key is stored");
    assert_eq!(stored[0].batch.events[0].tenant, "globex");
    ingestor.stop().await;
}

#[tokio::test]
async fn with_mutual_tls_a_client_certificate_maps_to_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("chute test ca");
    let ca_file = path(&ca.write(dir.path(), "ca.pem"));
    let (cert, key) = ca.server("ingestor").write(dir.path(), "server");
    let (acme_cert, acme_key) = ca
        .client("acme ingest", &["ingest.acme.internal"])
        .write(dir.path(), "acme");
    let (stranger_cert, stranger_key) = ca.client("stranger", &[]).write(dir.path(), "stranger");
    let rogue = TestCa::new("rogue ca");
    let (rogue_cert, rogue_key) = rogue
        .client("rogue", &["ingest.acme.internal"])
        .write(dir.path(), "rogue");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, KEYS).unwrap();
    let client_ca = ca.write(dir.path(), "client-ca.pem");
    let ingestor = TestIngestor::start_with(|config| {
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.tls.client_ca = Some(client_ca);
        config.api_keys.file = Some(keys);
    })
    .await;
    let mut python = PythonTlsClient::start(ingestor.grpc_addr).await;
    let with_cert = |channel: &str, cert: &std::path::Path, key: &std::path::Path| json!({"channel": channel, "ca": ca_file, "cert": path(cert), "key_file": path(key)});

    // The certificate alone authenticates, as tenant acme (an empty event tenant is filled in).
    let answer = python.publish(with_cert("acme", &acme_cert, &acme_key)).await;
    assert_eq!(answer, json!({"ok": true, "accepted": 1, "rejected": 0}));
    let mut wrong_tenant = with_cert("acme", &acme_cert, &acme_key);
    wrong_tenant["tenant"] = json!("globex");
    let answer = python.publish(wrong_tenant).await;
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(0), Some(1)),
        "{answer}"
    );

    // A certificate of the CA that maps to no tenant needs a key.
    let answer = python
        .publish(with_cert("stranger", &stranger_cert, &stranger_key))
        .await;
    assert_eq!(answer["code"], "UNAUTHENTICATED", "{answer}");
    assert!(answer["details"].as_str().unwrap().contains("stranger"), "{answer}");
    let mut with_key = with_cert("stranger", &stranger_cert, &stranger_key);
    with_key["api_key"] = json!("globex-key-0123456789");
    assert_eq!(python.publish(with_key).await["accepted"], 1);

    // No certificate, another CA's certificate, plaintext: no connection at all.
    for refused in [
        json!({"channel": "no-cert", "ca": ca_file, "api_key": "globex-key-0123456789"}),
        with_cert("rogue", &rogue_cert, &rogue_key),
        json!({"channel": "plain", "api_key": "globex-key-0123456789"}),
    ] {
        let answer = python.publish(refused.clone()).await;
        assert_eq!(answer["code"], "UNAVAILABLE", "{refused}: {answer}");
    }

    let tenants: Vec<String> = ingestor
        .stored_messages()
        .await
        .iter()
        .flat_map(|message| message.batch.events.iter().map(|event| event.tenant.clone()))
        .collect();
    assert_eq!(tenants, ["acme", "globex"]);
    ingestor.stop().await;
}

/// The certificate is replaced by one of another CA and the binary gets SIGHUP: new
/// connections see the new certificate, an established one keeps working.
#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (TestCa::new("old ca"), TestCa::new("new ca"));
    let old_ca_file = path(&old_ca.write(dir.path(), "old-ca.pem"));
    let new_ca_file = path(&new_ca.write(dir.path(), "new-ca.pem"));
    let (cert, key) = old_ca.server("ingestor").write(dir.path(), "server");
    let ingestor = ChildIngestor::start(&[
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
        // Only the signal reloads here.
        "--tls-reload-interval",
        "1h",
    ])
    .await;
    let mut python = PythonTlsClient::start(ingestor.grpc_addr).await;
    let publish = |channel: &str, ca: &str| json!({"channel": channel, "ca": ca, "tenant": "acme"});
    assert_eq!(python.publish(publish("old", &old_ca_file)).await["ok"], true);
    assert_eq!(
        python.publish(publish("new-0", &new_ca_file)).await["code"],
        "UNAVAILABLE"
    );

    new_ca.server("ingestor").write(dir.path(), "server");
    ingestor.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempt = 1;
    loop {
        let answer = python.publish(publish(&format!("new-{attempt}"), &new_ca_file)).await;
        if answer["ok"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new connection saw the new certificate: {answer}\n{}",
            ingestor.log_text()
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        python.publish(publish("old", &old_ca_file)).await["ok"],
        true,
        "the connection made before the reload keeps working"
    );
    let answer = python.publish(publish("old-ca-new-connection", &old_ca_file)).await;
    assert_eq!(
        answer["code"], "UNAVAILABLE",
        "a new connection gets the new certificate: {answer}"
    );
    assert!(ingestor.log_text().contains("tls certificate reloaded"));
}
