use anyhow::Context;
use chute_aggregator::config::{Cli, Command, DlqAction, LedgerAction};
use chute_schema::{Migrator, Target};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { config, command } =
        chute_common::config::load(std::env::args_os(), std::env::vars_os()).unwrap_or_else(|err| err.exit());
    chute_common::telemetry::init_tracing(&config.log, config.log_format);
    match command.unwrap_or(Command::Run) {
        Command::Run => {
            let admin = tokio::net::TcpListener::bind(config.admin_listen)
                .await
                .with_context(|| format!("bind admin {}", config.admin_listen))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(chute_common::shutdown::cancel_on_signal(shutdown.clone()));
            chute_aggregator::run(admin, config, shutdown)
                .await
                .map_err(|err| anyhow::anyhow!("aggregator failed: {err} ({err:?})"))
        }
        Command::Migrate { dry_run, cluster } => {
            let target = match cluster {
                Some(cluster) => Target::cluster(&config.clickhouse_database, cluster),
                None => Target::single(&config.clickhouse_database),
            };
            let client = config.clickhouse().with_database("default");
            let migrator = Migrator::new(client, target);
            if dry_run {
                print!("{}", migrator.plan().await.context("plan migrations")?.to_sql());
            } else {
                let plan = migrator.run().await.context("apply migrations")?;
                let applied: Vec<String> = plan.pending.iter().map(|m| m.file_name.clone()).collect();
                println!(
                    "migrations applied: {} (already applied: {})",
                    if applied.is_empty() {
                        "none".to_owned()
                    } else {
                        applied.join(", ")
                    },
                    plan.already_applied.len()
                );
            }
            Ok(())
        }
        Command::Dlq { action } => {
            let client =
                chute_common::stream::connect(&config.nats_url, "chute-aggregator-dlq", config.nats_connect_wait)
                    .await?;
            let js = async_nats::jetstream::new(client);
            match action {
                DlqAction::List => {
                    for (entry, _) in chute_aggregator::dlq::list(&js).await? {
                        println!("{}", serde_json::to_string(&entry)?);
                    }
                }
                DlqAction::Replay { sequence } => {
                    let count = chute_aggregator::dlq::replay(&js, sequence).await?;
                    println!("replayed {count} message(s) to their original subjects");
                }
            }
            Ok(())
        }
        Command::Ledger { action } => {
            let client =
                chute_common::stream::connect(&config.nats_url, "chute-aggregator-ledger", config.nats_connect_wait)
                    .await?;
            let js = async_nats::jetstream::new(client);
            let ledger = chute_aggregator::server::open_ledger(&js, &config).await?;
            match action {
                LedgerAction::Show => {
                    let (state, revision) = ledger.read().await?;
                    println!("{}", serde_json::json!({ "revision": revision, "ledger": state }));
                }
                LedgerAction::Reset { dry_run, force, .. } => {
                    let stream = chute_aggregator::consumer::events_stream(&js).await?;
                    let positions = chute_aggregator::recover::positions(
                        &stream,
                        &config.clickhouse(),
                        config.partitions,
                        &config.limits(),
                    )
                    .await
                    .context("find positions in ClickHouse")?;
                    for position in &positions {
                        println!("{}", serde_json::to_string(position)?);
                    }
                    if dry_run {
                        println!("dry run: ledger not written");
                    } else {
                        let state = chute_aggregator::recover::reset(&ledger, &stream, &positions, force).await?;
                        println!("ledger reset: bound to stream epoch {}", state.stream_epoch);
                    }
                }
            }
            Ok(())
        }
    }
}
