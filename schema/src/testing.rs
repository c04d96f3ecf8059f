//! The ClickHouse dev server (`clickhouse-dev/chserver.py`: the ClickHouse 26.9 engine from
//! chdb behind ClickHouse's HTTP interface) on a free loopback port, in a temp dir, killed on
//! `Drop`. Enabled by the `test-util` feature; it lives beside the schema, not with the
//! nats-server guard in `chute_common::testing`, because it needs the `clickhouse` crate.
//!
//! The interpreter is `CHUTE_PYTHON`, else `<workspace>/.venv/bin/python`. When
//! `CHUTE_CLICKHOUSE_URL` is set (e.g. `http://127.0.0.1:8123`), the guard uses that server
//! instead of starting one: tests then share it, so each test must work in its own database
//! (see [`ClickHouseServer::database`]), and `stop`/`restart` are unavailable.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the engine may take to boot (it loads every table's metadata on start).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running dev server (or the external server named by `CHUTE_CLICKHOUSE_URL`).
pub struct ClickHouseServer {
    url: String,
    local: Option<LocalServer>,
}

/// The child process and its state; the data dir outlives restarts.
struct LocalServer {
    dir: TempDir,
    port: u16,
    /// `--tls-cert`, `--tls-key`: serve HTTPS.
    tls: Option<(PathBuf, PathBuf)>,
    child: Option<Child>,
    /// Held open so the server exits by itself (`--watch-stdin`) if this process dies
    /// without running `Drop`.
    _stdin: Option<ChildStdin>,
}

/// Statement counters of the dev server (`GET /dev/stats`), e.g. to prove that a request
/// was answered from a cache without querying ClickHouse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DevStats {
    pub queries: u64,
    pub inserts: u64,
    pub selects: u64,
    pub errors: u64,
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DatabaseStats {
    pub queries: u64,
    pub inserts: u64,
    pub selects: u64,
    pub errors: u64,
}

impl ClickHouseServer {
    /// Starts a dev server on a free port in a fresh temp dir and waits until it answers
    /// `/ping`; panics (with the server's log) if it does not within 60 s.
    pub async fn start() -> Self {
        if let Some(url) = external_url() {
            return Self { url, local: None };
        }
        Self::start_local(None).await
    }

    /// Starts a dev server of its own (never the external one) serving HTTPS with the PEM
    /// certificate chain `cert` and key `key`; its URL is `https://localhost:<port>`.
    pub async fn start_tls(cert: &Path, key: &Path) -> Self {
        Self::start_local(Some((cert.to_path_buf(), key.to_path_buf()))).await
    }

    async fn start_local(tls: Option<(PathBuf, PathBuf)>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chute-clickhouse-")
            .tempdir()
            .expect("temp dir for the ClickHouse dev server");
        let scheme_host = if tls.is_some() {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        let mut local = LocalServer {
            dir,
            port: 0,
            tls,
            child: None,
            _stdin: None,
        };
        local.spawn().await;
        Self {
            url: format!("{scheme_host}:{}", local.port),
            local: Some(local),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A client for this server with the crate's defaults (LZ4, validation on).
    pub fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default().with_url(&self.url)
    }

    /// Creates an empty database `name` (dropping any previous one) and returns a client
    /// bound to it. Name it after the test so tests can share a server.
    pub async fn database(&self, name: &str) -> clickhouse::Client {
        let client = self.client();
        for sql in [
            format!("DROP DATABASE IF EXISTS `{name}`"),
            format!("CREATE DATABASE `{name}`"),
        ] {
            client
                .query(&sql)
                .execute()
                .await
                .unwrap_or_else(|err| panic!("{sql}: {err}"));
        }
        client.with_database(name)
    }

    /// Applies Chute's migrations (single-node) into database `name` and returns a client
    /// bound to it; panics if they do not apply.
    pub async fn migrate(&self, name: &str) -> clickhouse::Client {
        crate::Migrator::new(self.client(), crate::Target::single(name))
            .run()
            .await
            .unwrap_or_else(|err| panic!("migrations apply to {name}: {err}"));
        self.client().with_database(name)
    }

    /// The dev server's statement counters (`GET /dev/stats`, a dev-server extension).
    pub async fn stats(&self) -> DevStats {
        let body = http_get(&self.url, "/dev/stats")
            .await
            .unwrap_or_else(|err| panic!("GET {}/dev/stats: {err}", self.url));
        serde_json::from_slice(&body).expect("/dev/stats returns JSON")
    }

    /// Kills the server (SIGKILL) and waits for it to exit; the data dir stays.
    pub fn stop(&mut self) {
        self.local_mut("stop").kill();
    }

    /// Starts the server again on the same port and data dir (no-op when running).
    pub async fn restart(&mut self) {
        let local = self.local_mut("restart");
        if local.child.is_none() {
            local.spawn().await;
        }
    }

    /// Whether the server process is running (always true for an external server).
    pub fn is_running(&self) -> bool {
        self.local.as_ref().is_none_or(|local| local.child.is_some())
    }

    /// The server's stderr so far (request log), for assertions and failure messages.
    pub fn log(&self) -> String {
        self.local
            .as_ref()
            .map(|local| std::fs::read_to_string(local.log_path()).unwrap_or_default())
            .unwrap_or_default()
    }

    fn local_mut(&mut self, what: &str) -> &mut LocalServer {
        self.local
            .as_mut()
            .unwrap_or_else(|| panic!("cannot {what} the external server at {}", self.url))
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        if let Some(local) = self.local.as_mut() {
            local.kill();
        }
    }
}

impl LocalServer {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("chserver.log")
    }

    async fn spawn(&mut self) {
        let root = chute_common::testing::workspace_root();
        let python = std::env::var_os("CHUTE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".venv/bin/python"));
        let script = root.join("clickhouse-dev/chserver.py");
        let ready_file = self.dir.path().join("port");
        let _ = std::fs::remove_file(&ready_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("dev server log file");

        let mut child = Command::new(&python)
            .arg(&script)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--watch-stdin")
            .args(self.tls.iter().flat_map(|(cert, key)| {
                [
                    OsStr::new("--tls-cert"),
                    cert.as_os_str(),
                    OsStr::new("--tls-key"),
                    key.as_os_str(),
                ]
            }))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "start {} {} (create the venv: python3 -m venv .venv && .venv/bin/pip install \
                     -r clickhouse-dev/requirements.txt): {err}",
                    python.display(),
                    script.display()
                )
            });
        self._stdin = child.stdin.take();
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        self.port = loop {
            if let Some(port) = read_port(&ready_file) {
                break port;
            }
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                self.child = None;
                panic!("ClickHouse dev server exited with {status}; log:\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "ClickHouse dev server not ready within {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };

        if self.tls.is_some() {
            // The port file is written once the socket listens; /ping below speaks plain HTTP.
            return;
        }
        let url = format!("http://127.0.0.1:{}", self.port);
        while !matches!(http_get(&url, "/ping").await.as_deref(), Ok(b"Ok.\n")) {
            if Instant::now() > deadline {
                self.kill();
                panic!("ClickHouse dev server does not answer /ping; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self._stdin = None;
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let mut start = log.len().saturating_sub(4000);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        log[start..].to_owned()
    }
}

fn external_url() -> Option<String> {
    std::env::var("CHUTE_CLICKHOUSE_URL").ok().filter(|url| !url.is_empty())
}

fn read_port(ready_file: &Path) -> Option<u16> {
    std::fs::read_to_string(ready_file).ok()?.trim().parse().ok()
}

/// A minimal `GET` (HTTP/1.0, one connection) for the endpoints the clickhouse client
/// cannot reach; returns the body of a 200 response.
async fn http_get(base_url: &str, path: &str) -> std::io::Result<Vec<u8>> {
    let authority = base_url
        .strip_prefix("http://")
        .unwrap_or(base_url)
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(authority).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    if !response.starts_with(b"HTTP/1.1 200") && !response.starts_with(b"HTTP/1.0 200") {
        let head = String::from_utf8_lossy(&response[..split]).into_owned();
        return Err(std::io::Error::other(head));
    }
    Ok(response[split + 4..].to_vec())
}
