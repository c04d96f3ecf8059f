//! A running ingestor (via `chute_ingestor::run`) on free ports against its own nats-server.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use chute_common::stream::EVENTS_STREAM;
use chute_common::testing::nats::NatsServer;
use chute_ingestor::hooks::Hooks;
use chute_ingestor::Config;
use chute_proto::v1::ingest_service_client::IngestServiceClient;
use chute_proto::v1::{Event, EventBatch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub struct TestIngestor {
    pub nats: NatsServer,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<chute_ingestor::Result<()>>,
}

/// One message read back from the EVENTS stream.
pub struct StoredMessage {
    pub subject: String,
    pub batch: EventBatch,
    pub msg_id: Option<String>,
}

impl TestIngestor {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(customize: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_hooks(customize, Hooks::default()).await
    }

    /// An ingestor with test seams: a receive clock, lost publishes.
    pub async fn start_with_hooks(customize: impl FnOnce(&mut Config), hooks: Hooks) -> Self {
        let nats = NatsServer::start();
        let mut config = Config {
            nats: chute_common::config::NatsArgs::with_url(nats.url()),
            publish_timeout: Duration::from_secs(2),
            ..Config::default()
        };
        customize(&mut config);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chute_ingestor::run_with_hooks(
            grpc,
            admin,
            config,
            hooks,
            shutdown.clone(),
        ));
        let ingestor = Self {
            nats,
            grpc_addr,
            admin_addr,
            shutdown,
            task,
        };
        ingestor.wait_ready().await;
        ingestor
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if self.admin_get("/readyz").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("ingestor never became ready");
    }

    pub async fn client(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("connect to ingestor")
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.nats.url()).await.expect("connect to nats"))
    }

    /// Every message in the EVENTS stream, in sequence order.
    pub async fn stored_messages(&self) -> Vec<StoredMessage> {
        let js = self.jetstream().await;
        let mut stream = js.get_stream(EVENTS_STREAM).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut messages = Vec::new();
        for sequence in 1..=last {
            let raw = stream.get_raw_message(sequence).await.unwrap();
            let msg_id = raw.headers.get("Nats-Msg-Id").map(|value| value.as_str().to_owned());
            let batch = chute_common::payload::decode(&raw.payload).expect("stored payload decodes");
            messages.push(StoredMessage {
                subject: raw.subject.to_string(),
                batch,
                msg_id,
            });
        }
        messages
    }

    /// Cancels the shutdown token and waits for `run` to return; it must return `Ok`.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        let result = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("run returns after shutdown");
        result
            .expect("run does not panic")
            .expect("run returns Ok after a drain");
    }

    /// (status, body) of a GET on the admin port.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        chute_common::testing::http_get(self.admin_addr, path).await
    }
}

impl Drop for TestIngestor {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn now() -> prost_types::Timestamp {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    chute_common::validate::timestamp_from_nanos(nanos)
}

/// A valid event for `tenant`.
pub fn event(tenant: &str, i: usize) -> Event {
    Event {
        tenant: tenant.to_owned(),
        name: "llm.request".into(),
        time: Some(now()),
        session_id: format!("conv-{}", i % 3),
        user_id: format!("user-{}", i % 5),
        attributes: [("model".to_string(), "small".to_string())].into(),
        metrics: [("tokens_in".to_string(), i as f64), ("latency_ms".to_string(), 12.5)].into(),
        body: format!("{{\"i\":{i}}}"),
        ..Default::default()
    }
}
