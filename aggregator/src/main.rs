use anyhow::Context;
use async_nats::jetstream;
use chute_aggregator::config::{Cli, Command, Config, DlqAction, LedgerAction, MigrateUsersArgs};
use chute_common::service;
use chute_common::validate::list_or_none;
use chute_schema::{Migrator, Target};

fn main() -> anyhow::Result<()> {
    // Before the runtime starts: the re-exec replaces the process.
    service::reexec_with_bounded_malloc();
    run()
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let Cli { config, command } = service::config_from_process();
    config.log.init_tracing();
    match command.unwrap_or(Command::Run) {
        Command::Run => {
            let admin = service::bind("admin", config.admin_listen).await?;
            chute_aggregator::run(admin, config, service::shutdown_on_signal())
                .await
                .map_err(|err| anyhow::anyhow!("aggregator failed: {err} ({err:?})"))
        }
        Command::Migrate {
            dry_run,
            cluster,
            users,
        } => migrate(&config, dry_run, cluster, &users).await,
        Command::Dlq { action } => dlq(&config, action).await,
        Command::Ledger { action } => ledger(&config, action).await,
    }
}

async fn migrate(
    config: &Config,
    dry_run: bool,
    cluster: Option<String>,
    users: &MigrateUsersArgs,
) -> anyhow::Result<()> {
    let target = match cluster {
        Some(cluster) => Target::cluster(&config.clickhouse_login.database, cluster),
        None => Target::single(&config.clickhouse_login.database),
    };
    let client = config.clickhouse()?.with_database("default");
    let users = users
        .users()
        .map_err(|err| anyhow::anyhow!("ClickHouse users: {err}"))?;
    let migrator = Migrator::new(client, target)
        .with_users(users.clone())
        .logged_in_as(&config.clickhouse_login.user);
    if dry_run {
        print!("{}", migrator.plan().await.context("plan migrations")?.to_sql());
        return Ok(());
    }
    let plan = migrator.run().await.context("apply migrations")?;
    let applied: Vec<String> = plan.pending.iter().map(|m| m.file_name.clone()).collect();
    println!(
        "migrations applied: {} (already applied: {})",
        list_or_none(&applied),
        plan.already_applied.len()
    );
    if !users.is_empty() {
        let login = config.clickhouse_login.user.as_str();
        let names: Vec<&str> = users
            .users
            .iter()
            .map(|user| user.name.as_str())
            .filter(|name| *name != login)
            .collect();
        println!("users created or updated: {}", names.join(", "));
    }
    Ok(())
}

async fn dlq(config: &Config, action: DlqAction) -> anyhow::Result<()> {
    let js = operator_jetstream(config, "chute-aggregator-dlq").await?;
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

async fn ledger(config: &Config, action: LedgerAction) -> anyhow::Result<()> {
    let js = operator_jetstream(config, "chute-aggregator-ledger").await?;
    let ledger = chute_aggregator::server::open_ledger(&js, config).await?;
    match action {
        LedgerAction::Show => {
            let (state, revision) = ledger.read().await?;
            println!("{}", serde_json::json!({ "revision": revision, "ledger": state }));
        }
        LedgerAction::Reset { dry_run, force, .. } => {
            let stream = chute_aggregator::consumer::events_stream(&js).await?;
            let positions = chute_aggregator::recover::positions(
                &stream,
                &config.clickhouse()?,
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

/// JetStream for an operator subcommand, connected as `client_name` so that the server's
/// connection list tells it apart from running aggregators.
async fn operator_jetstream(config: &Config, client_name: &str) -> anyhow::Result<jetstream::Context> {
    let client = config.nats.connect(client_name).await?;
    Ok(jetstream::new(client))
}
