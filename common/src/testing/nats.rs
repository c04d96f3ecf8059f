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
    /// Appended to the generated config (users, permissions, TLS).
    extra_config: String,
    /// Environment of the server process (variables the config refers to, e.g. passwords).
    env: Vec<(String, String)>,
}

impl NatsServer {
    /// Starts a server (binary from `CHUTE_NATS_SERVER`, else `nats-server` on `PATH`).
    pub fn start() -> Self {
        Self::with_max_file_store("1TB")
    }

    /// Starts a server whose JetStream may store at most `limit` on disk (`"1TB"`, `"100MB"`):
    /// stream creation beyond it fails with 10047, as on a server short of disk.
    pub fn with_max_file_store(limit: &str) -> Self {
        Self::start_with("", &[], limit)
    }

    /// Starts a server whose config is the generated JetStream block followed by `extra_config`
    /// (e.g. the content of `deploy/nats/chute-nats.conf`: users, permissions, TLS), with `env`
    /// in its environment (nats-server resolves a `$NAME` the config does not define from it).
    pub fn with_config(extra_config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(extra_config, env, "1TB")
    }

    fn start_with(extra_config: &str, env: &[(&str, &str)], max_file_store: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chute-nats-")
            .tempdir()
            .expect("temp dir for nats-server");
        let mut server = Self {
            port: super::restartable_port(), // restarted on the same port
            dir,
            child: None,
            max_file_store: max_file_store.to_owned(),
            extra_config: extra_config.to_owned(),
            env: env
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
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

    /// The directory holding the server's config, store and log (`nats.log`), e.g. to write
    /// certificates the config names.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far (permission violations are logged there).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
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
        let mut text = jetstream_config(&self.dir.path().join("jetstream"), &self.max_file_store);
        text.push_str(&self.extra_config);
        std::fs::write(&config, text).expect("nats.conf");
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-c"])
            .arg(&config)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("start {binary} (apt-get install nats-server): {err}"));
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20), &self.dir.path().join("nats.log"));
    }
}

/// The services that have a user in `deploy/nats/chute-nats.conf`.
pub const CHUTE_USERS: [&str; 5] = ["ingestor", "aggregator", "query-api", "router", "operator"];

impl NatsServer {
    /// A server with the users and permissions Chute ships (`deploy/nats/chute-nats.conf`), the
    /// password of `chute-<service>` being [`NatsServer::chute_password`].
    pub fn with_chute_users() -> Self {
        let path = super::workspace_root().join("deploy/nats/chute-nats.conf");
        let config = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let variables: Vec<(String, String)> = CHUTE_USERS
            .iter()
            .map(|service| (password_variable(service), Self::chute_password(service)))
            .collect();
        let env: Vec<(&str, &str)> = variables
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        Self::with_config(&config, &env)
    }

    /// The test password of `chute-<service>`.
    pub fn chute_password(service: &str) -> String {
        format!("test-{service}-password")
    }

    /// How `service` connects to a [`NatsServer::with_chute_users`] server: its user, password
    /// and the inbox prefix its permissions allow.
    pub fn chute_user(&self, service: &str) -> crate::config::NatsArgs {
        assert!(CHUTE_USERS.contains(&service), "no NATS user for {service}");
        crate::config::NatsArgs {
            user: Some(format!("chute-{service}")),
            password: Some(Self::chute_password(service)),
            inbox_prefix: inbox_prefix(service),
            ..crate::config::NatsArgs::with_url(self.url())
        }
    }

    /// The credentials of [`NatsServer::chute_user`] as command-line flags of a service binary
    /// (the URL apart: harnesses pass `--nats-url` themselves).
    pub fn chute_user_flags(&self, service: &str) -> Vec<String> {
        let args = self.chute_user(service);
        vec![
            "--nats-user".into(),
            args.user.unwrap_or_default(),
            "--nats-password".into(),
            args.password.unwrap_or_default(),
            "--nats-inbox-prefix".into(),
            args.inbox_prefix,
        ]
    }
}

/// `CHUTE_NATS_<SERVICE>_PASSWORD`, the variable the shipped config reads the password from.
fn password_variable(service: &str) -> String {
    format!("CHUTE_NATS_{}_PASSWORD", service.to_uppercase().replace('-', "_"))
}

/// The inbox prefix `deploy/nats/chute-nats.conf` lets `service` subscribe to (the query API
/// makes no requests, so it has none and keeps the default).
fn inbox_prefix(service: &str) -> String {
    match service {
        "query-api" => "_INBOX".to_owned(),
        _ => format!("_INBOX_{service}"),
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

/// Waits until a `nats-server` (this guard's or a cluster node's) listens on `port`; else
/// panics with its log.
pub(super) fn wait_for_port(port: u16, timeout: Duration, log: &Path) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    panic!("nats-server did not listen on {port} within {timeout:?}; log:\n{log}");
}
