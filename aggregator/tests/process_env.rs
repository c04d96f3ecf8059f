//! A `CHUTE_*` variable exported in the shell that runs the tests must not change what they
//! test. This test exports some into its own process (alone in this binary: `set_var` while other
//! tests' threads read the environment would be a data race) and checks that the configs tests
//! build and the service binaries they start do not see them, while `main`'s path still does.

use chute_aggregator::config::Cli;
use chute_common::config::{load, NO_ENV};
use chute_common::testing::service_command;

#[tokio::test]
async fn exported_chute_variables_reach_neither_test_configs_nor_started_binaries() {
    std::env::set_var("CHUTE_PARTITIONS", "3");
    std::env::set_var("CHUTE_NATS_URL", "nats://exported.invalid:4222");

    // What `main` does (with just these two of the process's variables, so that others the shell
    // exports cannot fail this check): the exported values apply.
    let exported = std::env::vars_os().filter(|(name, _)| name == "CHUTE_PARTITIONS" || name == "CHUTE_NATS_URL");
    let from_main: Cli = load(["aggregator"], exported).unwrap();
    assert_eq!(from_main.config.partitions, 3);
    assert_eq!(from_main.config.nats.url, "nats://exported.invalid:4222");

    // What tests do: `Default` and explicit arguments with no environment.
    let aggregator = chute_aggregator::Config::default();
    assert_eq!(aggregator.partitions, 16);
    assert_eq!(aggregator.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(chute_ingestor::Config::default().partitions, 16);
    let from_args: Cli = load(["aggregator", "--lease-ttl", "3s"], NO_ENV).unwrap();
    assert_eq!(from_args.config.partitions, 16);

    // A started binary: `--help` prints each variable's value as the child sees it.
    let binary = env!("CARGO_BIN_EXE_aggregator");
    let inherited = tokio::process::Command::new(binary)
        .arg("--help")
        .output()
        .await
        .unwrap();
    let inherited = String::from_utf8(inherited.stdout).unwrap();
    assert!(inherited.contains("[env: CHUTE_PARTITIONS=3]"), "{inherited}");
    let started = service_command(binary).arg("--help").output().await.unwrap();
    let started = String::from_utf8(started.stdout).unwrap();
    assert!(started.contains("[env: CHUTE_PARTITIONS=]"), "{started}");
    assert!(!started.contains("exported.invalid"), "{started}");
}
