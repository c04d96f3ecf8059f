//! `loadtest ceiling --only jetstream`: the publish ceiling against a real nats-server, into one
//! scratch stream or several (the 16 partitions spread over them), which are deleted afterwards.

use chute_common::config::NO_ENV;
use chute_common::testing::nats::NatsServer;
use chute_loadtest::config::Command;
use chute_loadtest::Cli;
use futures::TryStreamExt;

async fn ceiling(nats: &NatsServer, streams: &str) -> chute_loadtest::ceiling::CeilingReport {
    let url = nats.url();
    let argv = [
        "loadtest",
        "ceiling",
        "--endpoints-file",
        "/nonexistent/endpoints.env",
        "--nats-url",
        &url,
        "--only",
        "jetstream",
        "--rows",
        "20000",
        "--jetstream-streams",
        streams,
    ];
    let cli: Cli = chute_common::config::load(argv, NO_ENV).expect("flags parse");
    let Some(Command::Ceiling(args)) = cli.command else {
        panic!("not the ceiling subcommand")
    };
    chute_loadtest::ceiling::run(&args).await.expect("ceiling")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_ceiling_publishes_every_event_into_one_or_several_streams_and_cleans_up() {
    let nats = NatsServer::start();
    for (streams, expected) in [("1", 1), ("4", 4)] {
        let report = ceiling(&nats, streams).await;
        assert_eq!(report.jetstream_events, 20_000, "{report:?}");
        assert_eq!(report.jetstream_streams, expected);
        assert_eq!(report.jetstream_replicas, 1);
        assert!(report.jetstream_events_per_second > 0.0, "{report:?}");
        // --only jetstream: nothing was inserted.
        assert_eq!(report.rows, 0);
        assert_eq!(report.insert_batches, 0);
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let names: Vec<String> = async_nats::jetstream::new(client)
        .stream_names()
        .try_collect()
        .await
        .unwrap();
    assert!(
        names.iter().all(|name| !name.starts_with("CHUTE_BENCH_CEILING")),
        "scratch streams left behind: {names:?}"
    );
}
