//! Helpers of the TLS, limits and query-of-death tests: the real `run()` on a listener, and the
//! Python HTTPS client driven line by line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chute_query_api::Config;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
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
pub struct PythonHttpsClient {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl PythonHttpsClient {
    pub async fn start(addr: SocketAddr) -> Self {
        let root = chute_common::testing::workspace_root();
        let python = std::env::var("CHUTE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join(".venv/bin/python"));
        let mut child = tokio::process::Command::new(&python)
            .arg(root.join("query-api/tests/python/https_client.py"))
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("run {}: {err}", python.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut client = Self { child, stdin, stdout };
        let ready = client.answer().await;
        assert_eq!(ready["ready"], true, "{ready}");
        client
    }

    async fn answer(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .expect("the python client answers within 60 s")
            .unwrap();
        let Some(line) = line else {
            let status = self.child.wait().await;
            panic!("the python client exited: {status:?}");
        };
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"))
    }

    /// One GET as `command` describes (see the script's docstring).
    pub async fn get(&mut self, command: serde_json::Value) -> serde_json::Value {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        self.answer().await
    }
}

pub fn path(path: &std::path::Path) -> String {
    path.display().to_string()
}
