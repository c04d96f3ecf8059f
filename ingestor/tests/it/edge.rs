//! Helpers of the TLS and limits tests: the `ingestor` binary as a child process (its RSS and
//! its signals are its own), and the Python grpcio TLS client driven line by line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chute_common::testing::nats::NatsServer;
use chute_common::testing::{free_port, service_command, workspace_root};
use tokio::process::Child;

/// The `ingestor` binary on free ports against its own nats-server; killed on drop.
pub struct ChildIngestor {
    /// Kept alive for the child's lifetime.
    _nats: NatsServer,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildIngestor {
    /// Starts the binary with `args` (besides listeners and NATS) and waits for `/readyz`.
    pub async fn start(args: &[&str]) -> Self {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let grpc_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.path().join("ingestor.log");
        let child = service_command(env!("CARGO_BIN_EXE_ingestor"))
            .args(["--grpc-listen", &grpc_addr.to_string()])
            .args(["--admin-listen", &admin_addr.to_string()])
            .args(["--nats-url", &nats.url()])
            .args(args)
            // The OTLP listeners' fixed default ports would collide between parallel tests.
            .env("CHUTE_OTLP_GRPC_LISTEN", "off")
            .env("CHUTE_OTLP_HTTP_LISTEN", "off")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start the ingestor binary");
        let ingestor = Self {
            _nats: nats,
            grpc_addr,
            admin_addr,
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while chute_common::testing::http_get(ingestor.admin_addr, "/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the ingestor binary never became ready:\n{}",
                ingestor.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ingestor
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the ingestor is running")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} not in /proc/<pid>/status"))
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }
}

/// The Python grpcio client of `tests/python/tls_client.py`: one JSON command per line in, one
/// JSON answer per line out.
pub struct PythonTlsClient(chute_common::testing::PythonClient);

impl PythonTlsClient {
    pub async fn start(target: SocketAddr) -> Self {
        let root = workspace_root();
        let script = root.join("ingestor/tests/python/tls_client.py");
        let args = [root.join("proto").display().to_string(), target.to_string()];
        Self(chute_common::testing::PythonClient::start(&script, &args, "make venv installs grpcio").await)
    }

    /// Publishes one event as `command` describes (see the script's docstring).
    pub async fn publish(&mut self, command: serde_json::Value) -> serde_json::Value {
        self.0.ask(command).await
    }
}

pub fn path(path: &Path) -> String {
    path.display().to_string()
}
