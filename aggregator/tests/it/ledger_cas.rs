//! The ledger's compare-and-set on a replicated (R3) bucket: concurrent writers through every
//! node of a 3-node cluster, each update a read-modify-write that adds one member to the state,
//! while the bucket's leader is made to step down. Every update that returned must be in the
//! final state: a lost one is an owner's commit undone. (With a plain KV update, nats-server
//! 2.9.10 lost about 45 % of them without any leader change: nats-io/nats-server#4320.)

use std::time::{Duration, Instant};

use chute_aggregator::ledger::Ledger;
use chute_common::testing::nats_cluster::NatsCluster;

const WRITERS: usize = 12;
const UPDATES_EACH: u64 = 40;

async fn ledger_via(cluster: &NatsCluster, node: usize, bucket: &str) -> Ledger {
    let client = async_nats::connect(cluster.url(node)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Ledger::open(&js, bucket, 3).await {
            Ok(ledger) => return ledger,
            Err(err) if Instant::now() < deadline => {
                eprintln!("open ledger via node {node}: {err}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("open ledger via node {node}: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_an_r3_ledger_lose_no_update() {
    let cluster = NatsCluster::start(3);
    let bucket = "cas_r3";
    // Created once, then opened by every writer.
    ledger_via(&cluster, 0, bucket).await;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let ledger = ledger_via(&cluster, writer % 3, bucket).await;
        writers.push(tokio::spawn(async move {
            for update in 0..UPDATES_EACH {
                // A member per update: a write retried after a timeout is harmless, a lost one is not.
                let member = format!("w{writer}-{update}");
                ledger
                    .update(|state| state.members.insert(member.clone(), 0))
                    .await
                    .map_err(|err| format!("writer {writer}, update {update}: {err}"))?;
            }
            Ok::<_, String>(())
        }));
    }
    let started = Instant::now();
    // Two leader changes while they write: the check must hold across elections.
    let admin = async_nats::connect(cluster.url(2)).await.unwrap();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = admin
            .request(format!("$JS.API.STREAM.LEADER.STEPDOWN.KV_{bucket}"), "".into())
            .await
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
        assert_eq!(answer["success"], true, "step down: {answer}");
    }
    for writer in writers {
        if let Err(err) = writer.await.unwrap() {
            for node in 0..cluster.len() {
                let log = cluster.log(node);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "--- node {node} log, last 40 lines (newest first):\n{}",
                    tail.join("\n")
                );
            }
            panic!("{err}");
        }
    }
    let (state, revision) = ledger_via(&cluster, 1, bucket).await.read().await.unwrap();
    let expected = WRITERS * UPDATES_EACH as usize;
    eprintln!(
        "{expected} concurrent CAS updates through 3 nodes at R3, two leader changes, in {:?}: \
         {} in the state, revision {revision}",
        started.elapsed(),
        state.members.len()
    );
    assert_eq!(state.members.len(), expected, "updates were lost");
}

/// The ledger's writes expect the bucket stream's last sequence, so a bucket holding another key
/// would refuse every write: the writer says so instead of retrying for ever.
#[tokio::test]
async fn a_ledger_bucket_holding_another_key_is_an_error_not_a_livelock() {
    let nats = chute_common::testing::nats::NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let ledger = Ledger::open(&js, "shared", 1).await.unwrap();
    ledger.update(|state| state.gap_checked = 1).await.unwrap();
    js.publish("$KV.shared.other", "x".into()).await.unwrap().await.unwrap();
    let started = Instant::now();
    let err = ledger
        .update(|state| state.gap_checked = 2)
        .await
        .expect_err("every write conflicts");
    assert!(err.to_string().contains("holds 2 keys"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The ledger itself is untouched.
    assert_eq!(ledger.read().await.unwrap().0.gap_checked, 1);
}
