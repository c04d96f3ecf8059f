use crate::support::TestIngestor;

/// A client written with Python `grpcio` from the same .proto publishes successfully.
#[tokio::test]
async fn a_python_grpcio_client_publishes() {
    let ingestor = TestIngestor::start().await;
    let root = chute_common::testing::workspace_root();
    let python = chute_common::testing::python();
    let output = tokio::process::Command::new(&python)
        .arg(root.join("ingestor/tests/python/publish_client.py"))
        .arg(root.join("proto"))
        .arg(ingestor.grpc_addr.to_string())
        .output()
        .await
        .unwrap_or_else(|err| panic!("run {} (make venv installs grpcio): {err}", python.display()));
    assert!(
        output.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("\"accepted\": 4"), "{summary}");

    let stored = ingestor.stored_messages().await;
    assert_eq!(stored.len(), 3, "one unary request and two stream requests");
    let py: Vec<_> = stored
        .iter()
        .flat_map(|m| m.batch.events.iter())
        .filter(|e| e.tenant == "pyco")
        .collect();
    assert_eq!(py.len(), 8);
    assert!(py
        .iter()
        .all(|e| e.attributes.get("client").map(String::as_str) == Some("grpcio")));
}
