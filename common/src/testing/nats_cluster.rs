//! A real NATS JetStream cluster on loopback: `n` `nats-server` processes with `--cluster`,
//! `--routes` and JetStream, each with its own store dir and server name, killed on drop.
//! Nodes can be killed (`kill -9`), stopped (`SIGSTOP`, a partitioned node) and restarted on the
//! same ports and store, so tests can take a node away under load and bring it back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::nats::wait_for_port;

/// One node of a [`NatsCluster`].
struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster. Clients get every node's URL ([`NatsCluster::urls`]) and reconnect to a
/// surviving one by themselves.
pub struct NatsCluster {
    dir: TempDir,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `size` nodes named `n1..` and waits until every node listens and JetStream has a
    /// meta leader.
    pub fn start(size: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chute-nats-cluster-")
            .tempdir()
            .expect("temp dir for the nats cluster");
        // Nodes restart on the same ports: keep them out of the ephemeral range.
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| (super::restartable_port(), super::restartable_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("nats-route://127.0.0.1:{cluster}"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, cluster_port))| {
                let name = format!("n{}", i + 1);
                let config = dir.path().join(format!("{name}.conf"));
                std::fs::write(&config, node_config(&name, port, cluster_port, &routes, dir.path()))
                    .expect("node config");
                Node {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    port,
                    cluster_port,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self { dir, nodes };
        for i in 0..size {
            cluster.restart(i);
        }
        cluster.wait_for_meta_leader(Duration::from_secs(30));
        cluster
    }

    /// Every node's URL, comma-separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        (0..self.nodes.len()).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// `nats://127.0.0.1:<port>` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Server name of node `i` (`n1`, `n2`, ...), as JetStream reports leaders.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Kills node `i` with SIGKILL and waits for it; its store stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`"-STOP"`, `"-CONT"`, `"-TERM"`) to node `i`.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i].child.as_ref().expect("node is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts node `i` again on its ports and store (no-op when running) and waits until it
    /// listens.
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            return;
        }
        let binary = std::env::var("CHUTE_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("node log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("start {binary} (apt-get install nats-server): {err}"));
        node.child = Some(child);
        wait_for_port(node.port, Duration::from_secs(20), &node.log);
    }

    /// The tail of node `i`'s log, for failure messages.
    pub fn log(&self, i: usize) -> String {
        let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        log.get(start..).unwrap_or(&log).to_owned()
    }

    /// The store directory of the cluster (every node's JetStream data below it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The route port of node `i`.
    pub fn cluster_port(&self, i: usize) -> u16 {
        self.nodes[i].cluster_port
    }

    /// Waits until the JetStream meta group has a leader, as the nodes' logs report it.
    fn wait_for_meta_leader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let logs_say_leader = || {
            (0..self.nodes.len()).any(|i| {
                let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
                log.contains("JetStream cluster new metadata leader") || log.contains("cluster metadata leader")
            })
        };
        while Instant::now() < deadline {
            if logs_say_leader() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no JetStream meta leader within {timeout:?}; n1 log:\n{}", self.log(0));
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(child) = self.nodes[i].child.as_ref() {
                // A stopped node ignores SIGKILL until continued on some kernels' accounting;
                // continue it first so it dies now.
                let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            }
            self.kill(i);
        }
    }
}

/// One node's configuration. `no_advertise`: clients know only the URLs they were given, not
/// the other nodes the server would tell them about, so a client given one node's URL is cut off
/// with that node when it is stopped (SIGSTOP), as in a network partition. Clients given every
/// URL fail over as usual.
fn node_config(name: &str, port: u16, cluster_port: u16, routes: &[String], dir: &Path) -> String {
    let store = dir.join(name);
    format!(
        "server_name: {name}\n\
         listen: 127.0.0.1:{port}\n\
         jetstream {{\n  store_dir: {store:?}\n  max_file_store: 1TB\n}}\n\
         cluster {{\n  name: chute\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{routes}]\n  no_advertise: true\n}}\n",
        store = store.display().to_string(),
        routes = routes.join(", "),
    )
}
