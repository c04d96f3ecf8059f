//! `NatsArgs::connect` against a real nats-server: TLS with the server checked against a given
//! CA, mutual TLS, token and NKey authentication. What the server refuses fails, and refused
//! credentials fail at once rather than after the connect wait.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chute_common::config::NatsArgs;
use chute_common::testing::certs::TestCa;
use chute_common::testing::nats::NatsServer;
use futures::StreamExt;

/// A test-only user key pair (made once with `nkeys::KeyPair::new_user()`); the server trusts
/// the public key, the client signs with the seed.
const NKEY_SEED: &str = "SUAIPCT6CYJDCI236EJSWWEJ2K4VI5YMNIYV75QJJEJIOPN3TAJWLC2744";
const NKEY_PUBLIC: &str = "UCWGGL4AORRMXO37I6BGJEC5NX7O7VT2UIKLKYBT3OT25ABKSW5DDQBO";

/// A message goes through the server and back.
async fn round_trip(client: &async_nats::Client) {
    let mut subscription = client.subscribe("probe").await.unwrap();
    client.flush().await.unwrap();
    client.publish("probe", "ping".into()).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("the message came back within 5 s")
        .expect("subscription open");
    assert_eq!(message.payload.as_ref(), b"ping");
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn args(nats: &NatsServer, connect_wait: Duration) -> NatsArgs {
    NatsArgs {
        connect_wait,
        ..NatsArgs::with_url(nats.url())
    }
}

#[tokio::test]
async fn mutual_tls_with_the_servers_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("chute-test-ca");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let (server_cert, server_key) = ca.server("nats").write(dir.path(), "server");
    let (client_cert, client_key) = ca.client("chute-ingestor", &[]).write(dir.path(), "client");
    let tls = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
        server_cert.display().to_string(),
        server_key.display().to_string(),
        ca_file.display().to_string(),
    );
    let nats = NatsServer::with_config(&tls, &[]);

    let mutual = NatsArgs {
        tls_ca: Some(ca_file.clone()),
        tls_cert: Some(client_cert),
        tls_key: Some(client_key),
        ..args(&nats, Duration::from_secs(5))
    };
    round_trip(&mutual.connect("tls-test").await.expect("mutual TLS connects")).await;

    // The server verifies clients: without a certificate the connection is refused, at once.
    let started = Instant::now();
    let no_certificate = NatsArgs {
        tls_ca: Some(ca_file),
        ..args(&nats, Duration::from_secs(10))
    };
    let err = no_certificate
        .connect("tls-test")
        .await
        .expect_err("no client certificate");
    assert!(err.to_string().contains(&nats.url()), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused client was retried for {:?}: {err}",
        started.elapsed()
    );

    // Without the CA, the server's certificate is not trusted (system roots only).
    let started = Instant::now();
    let untrusted = args(&nats, Duration::from_secs(10));
    let err = untrusted
        .connect("tls-test")
        .await
        .expect_err("an untrusted server certificate");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a TLS failure was retried for {:?}: {err}",
        started.elapsed()
    );
}

#[tokio::test]
async fn token_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::with_config("authorization {\n  token: \"t0ken-for-tests\"\n}\n", &[]);
    let good = NatsArgs {
        token_file: Some(write(dir.path(), "token", "t0ken-for-tests\n")),
        ..args(&nats, Duration::from_secs(5))
    };
    round_trip(&good.connect("token-test").await.expect("the token is accepted")).await;

    let started = Instant::now();
    let wrong = NatsArgs {
        token: Some("not-the-token".to_owned()),
        ..args(&nats, Duration::from_secs(10))
    };
    let err = wrong.connect("token-test").await.expect_err("a wrong token");
    assert!(err.to_string().contains("authorization violation"), "{err}");
    assert!(!err.to_string().contains("not-the-token"), "the secret leaked: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused token was retried for {:?}",
        started.elapsed()
    );
    // No credentials at all: refused as well.
    let err = args(&nats, Duration::from_secs(10))
        .connect("token-test")
        .await
        .expect_err("anonymous");
    assert!(err.to_string().contains("authorization violation"), "{err}");
}

#[tokio::test]
async fn nkey_seed_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let users = format!("authorization {{\n  users = [ {{ nkey: {NKEY_PUBLIC} }} ]\n}}\n");
    let nats = NatsServer::with_config(&users, &[]);
    let signer = NatsArgs {
        nkey_seed_file: Some(write(dir.path(), "seed", &format!("{NKEY_SEED}\n"))),
        ..args(&nats, Duration::from_secs(5))
    };
    round_trip(&signer.connect("nkey-test").await.expect("the NKey signs in")).await;

    let err = args(&nats, Duration::from_secs(10))
        .connect("nkey-test")
        .await
        .expect_err("anonymous");
    assert!(err.to_string().contains("authorization violation"), "{err}");
}

#[tokio::test]
async fn a_malformed_creds_file_is_an_error_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let creds = NatsArgs {
        creds: Some(write(dir.path(), "user.creds", "not a creds file\n")),
        ..NatsArgs::with_url("nats://127.0.0.1:1")
    };
    let err = creds.connect("creds-test").await.expect_err("malformed creds");
    assert!(err.to_string().contains("invalid NATS credentials"), "{err}");
}
