//! Test harnesses: real dependencies started on free loopback ports in temp dirs, killed on
//! `Drop`. Enabled by the `test-util` feature. The ClickHouse dev server guard is
//! `chute_schema::testing::ClickHouseServer`. [`certs`] generates certificates for TLS tests.

pub mod certs;
pub mod nats;
pub mod nats_cluster;

use std::net::TcpListener;
use std::path::PathBuf;

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// A free TCP port on 127.0.0.1 *below* the kernel's ephemeral range, for a server a test stops
/// and starts again on the same port. A port from [`free_port`] is in the ephemeral range, and
/// while its server is down any outgoing connection may take it as its local end: a restarted
/// cluster node once failed with "bind: address already in use" on its route port that way.
/// Ports are handed out once per process, from a random start so concurrent test processes
/// rarely meet, and each is checked to be free when handed out.
pub fn restartable_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;

    const LOWEST: u32 = 10_000;
    static RANGE: OnceLock<(u32, AtomicU32)> = OnceLock::new();
    let (end, next) = RANGE.get_or_init(|| {
        let end = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
            .filter(|&low| low > LOWEST + 1_000 && low <= u32::from(u16::MAX))
            .unwrap_or(32_768);
        (end, AtomicU32::new(rand::random_range(LOWEST..end)))
    });
    let span = end - LOWEST;
    for _ in 0..span {
        let candidate = LOWEST + (next.fetch_add(1, Ordering::SeqCst) - LOWEST) % span;
        let port = candidate as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {LOWEST}..{end}")
}

/// A command for a Chute service binary that does not pass on the test process's `CHUTE_*`
/// variables: the child is configured by the arguments the test gives it, not by whatever the
/// shell running the tests exports (every service variable has the `CHUTE_` prefix).
pub fn service_command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"CHUTE_") {
            command.env_remove(name);
        }
    }
    command
}

/// A service binary started by a test (see [`service_command`]) and its admin address.
pub struct ServiceProcess {
    pub child: tokio::process::Child,
    /// `host:port` of its admin server (`/metrics`, `/healthz`, `/readyz`).
    pub admin: String,
}

impl ServiceProcess {
    /// Sends `signal` (`-TERM`, `-KILL`, `-STOP`, `-CONT`) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("child is running");
        std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
    }

    /// SIGTERM, then asserts the process drained and exited 0 within 30 s.
    pub async fn terminate(mut self) {
        self.signal("-TERM");
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .expect("wait for the child");
        assert!(status.success(), "{status:?}");
    }

    pub async fn kill9(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait().await;
    }

    /// The value of an unlabelled metric from `/metrics` (0 when absent or unreachable).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = http_get(&self.admin, "/metrics").await.1;
        text.lines()
            .find(|line| line.split_whitespace().next() == Some(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }

    /// Resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("child is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// The Python interpreter tests run: `CHUTE_PYTHON`, else `<workspace>/.venv/bin/python`.
pub fn python() -> PathBuf {
    std::env::var_os("CHUTE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

/// A Python test client (a client nobody here wrote: grpcio, `http.client`) driven one JSON
/// command per line on its stdin, answering one JSON line each on its stdout; its first line is
/// `{"ready": true}`.
pub struct PythonClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl PythonClient {
    /// Runs `script` with `args` under [`python`] and waits for its ready line. `setup` says
    /// what installs the script's imports (for the panic message when it cannot start).
    pub async fn start(script: &std::path::Path, args: &[String], setup: &str) -> Self {
        use tokio::io::AsyncBufReadExt;
        let python = python();
        let mut child = tokio::process::Command::new(&python)
            .arg(script)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("run {} ({setup}): {err}", python.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut client = Self { child, stdin, stdout };
        let ready = client.answer().await;
        assert_eq!(ready["ready"], true, "{ready}");
        client
    }

    /// Sends one command and returns its answer.
    pub async fn ask(&mut self, command: serde_json::Value) -> serde_json::Value {
        use tokio::io::AsyncWriteExt;
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to the python client");
        self.stdin.flush().await.expect("flush to the python client");
        self.answer().await
    }

    async fn answer(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(60), self.stdout.next_line())
            .await
            .expect("the python client answers within 60 s")
            .expect("read the python client");
        let Some(line) = line else {
            let status = self.child.wait().await;
            panic!("the python client exited: {status:?}");
        };
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"))
    }
}

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("common/ lives inside the workspace")
        .to_path_buf()
}

/// `(status, body)` of a plain HTTP/1.0 GET (admin endpoints, `/metrics`); `(0, "")` when the
/// server cannot be reached.
pub async fn http_get(addr: impl std::fmt::Display, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = addr.to_string();
    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
        return (0, String::new());
    };
    if stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .is_err()
    {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restartable_ports_are_free_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| restartable_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32_768);
        for port in ports {
            assert!((10_000..ephemeral_low).contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).expect("free when handed out");
        }
    }
}
