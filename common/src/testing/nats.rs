//! A real `nats-server` with JetStream on a free loopback port, in a temp dir, killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running `nats-server -js`. `stop()`/`start()` restart it on the same port and store dir,
/// so tests can take NATS away and bring it back.
pub struct NatsServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// JetStream's `max_file_store` (see [`jetstream_config`]).
    max_file_store: String,
}

impl NatsServer {
    /// Starts a server (binary from `CHUTE_NATS_SERVER`, else `nats-server` on `PATH`).
    pub fn start() -> Self {
        Self::with_max_file_store("1TB")
    }

    /// Starts a server whose JetStream may store at most `limit` on disk (`"1TB"`, `"100MB"`):
    /// stream creation beyond it fails with 10047, as on a server short of disk.
    pub fn with_max_file_store(limit: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chute-nats-")
            .tempdir()
            .expect("temp dir for nats-server");
        let mut server = Self {
            port: super::free_port(),
            dir,
            child: None,
            max_file_store: limit.to_owned(),
        };
        server.restart();
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (e.g. to SIGSTOP it and simulate a stall).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it to exit. Stored data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store dir (no-op when running).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            return;
        }
        let binary = std::env::var("CHUTE_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("nats log file");
        let config = self.dir.path().join("nats.conf");
        std::fs::write(
            &config,
            jetstream_config(&self.dir.path().join("jetstream"), &self.max_file_store),
        )
        .expect("nats.conf");
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("start {binary} (apt-get install nats-server): {err}"));
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20), self.dir.path());
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// JetStream with an explicit `max_file_store`. Without one, nats-server allows 75% of the disk
/// space free when it starts, and a stream reserves its whole `max_bytes` (the ingestor's default
/// is 16 GiB) when it is created: on a machine with less than ~22 GB free every stream creation
/// fails with "insufficient storage resources available" (10047). Tests write little, so the
/// reservation must not depend on the machine's free disk.
fn jetstream_config(store_dir: &Path, max_file_store: &str) -> String {
    format!(
        "jetstream {{\n  store_dir: {:?}\n  max_file_store: {max_file_store}\n}}\n",
        store_dir.display().to_string()
    )
}

fn wait_for_port(port: u16, timeout: Duration, dir: &Path) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default();
    panic!("nats-server did not listen on {port} within {timeout:?}; log:\n{log}");
}
