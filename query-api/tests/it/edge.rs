//! Helpers of the TLS, limits and query-of-death tests: the real `run()` on a listener, and the
//! Python HTTPS client driven line by line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chute_query_api::Config;
use tokio_util::sync::CancellationToken;

use crate::support::{server, TestApi};

/// `chute_query_api::run` on a loopback listener over a migrated database `name`.
pub struct RunningApi {
    pub addr: SocketAddr,
    /// The plaintext admin listener (`--admin-listen`).
    pub admin_addr: SocketAddr,
    pub api: TestApi,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<chute_query_api::Result<()>>,
}

impl RunningApi {
    /// Starts `run` and waits until the listener accepts connections (not for `/readyz`, which
    /// may need TLS to reach).
    pub async fn start(name: &str, customize: impl FnOnce(&mut Config)) -> Self {
        let api = TestApi::start(name, |_| {}).await;
        let mut config = Config {
            clickhouse_url: server().url(),
            clickhouse_database: api.database.clone(),
            nats: chute_common::config::NatsArgs::with_url(String::new()),
            ..Config::default()
        };
        customize(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chute_query_api::run_with_admin(
            listener,
            Some(admin),
            config,
            shutdown.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "the query api never listened");
            assert!(!task.is_finished(), "run returned early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            addr,
            admin_addr,
            api,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .expect("run returns Ok");
    }
}

/// The Python client of `tests/python/https_client.py`.
pub struct PythonHttpsClient(chute_common::testing::PythonClient);

impl PythonHttpsClient {
    pub async fn start(addr: SocketAddr) -> Self {
        let script = chute_common::testing::workspace_root().join("query-api/tests/python/https_client.py");
        let args = [addr.ip().to_string(), addr.port().to_string()];
        Self(chute_common::testing::PythonClient::start(&script, &args, "make venv").await)
    }

    /// One GET as `command` describes (see the script's docstring).
    pub async fn get(&mut self, command: serde_json::Value) -> serde_json::Value {
        self.0.ask(command).await
    }
}

pub fn path(path: &std::path::Path) -> String {
    path.display().to_string()
}
