use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream;
use chute_common::service;
use chute_router::config::{Cli, Command, Config, DlqAction};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { config, command } = service::config_from_process();
    config.log.init_tracing();
    let env: HashMap<String, String> = std::env::vars().collect();
    let env = Arc::new(env);
    match command.unwrap_or(Command::Run) {
        Command::Run => {
            let admin = service::bind("admin", config.admin_listen).await?;
            chute_router::run(admin, config, env, service::shutdown_on_signal())
                .await
                .map_err(|err| anyhow::anyhow!("router failed: {err} ({err:?})"))
        }
        Command::Check => check(&config, &env),
        Command::Dlq { action } => dlq(&config, action).await,
    }
}

/// `router check`: validates the rules file and prints one line per rule.
fn check(config: &Config, env: &chute_router::server::Env) -> anyhow::Result<()> {
    let Some(path) = config.rules_file.as_ref() else {
        anyhow::bail!("router check: no rules file (--rules-file or CHUTE_ROUTER_RULES_FILE)");
    };
    let rules = chute_router::server::load_rules(Some(path), env).map_err(|err| anyhow::anyhow!("{err}"))?;
    for rule in &rules.rules {
        let kind = match &rule.kind {
            chute_router::spec::RuleKind::Route => "route",
            chute_router::spec::RuleKind::Threshold(_) => "threshold",
            chute_router::spec::RuleKind::Anomaly(_) => "anomaly",
        };
        let webhook = rule.webhook.as_deref().unwrap_or("-");
        println!(
            "{}:{}: {} ({kind}, webhook {webhook})",
            path.display(),
            rule.line,
            rule.name
        );
    }
    println!(
        "{}: {} rules, {} webhooks: ok",
        path.display(),
        rules.rules.len(),
        rules.webhooks.len()
    );
    Ok(())
}

async fn dlq(config: &Config, action: DlqAction) -> anyhow::Result<()> {
    let client = config.nats.connect("chute-router-dlq").await?;
    let js = jetstream::new(client.clone());
    match action {
        DlqAction::List => {
            for entry in chute_router::dlq::list(&js).await? {
                println!("{}", serde_json::to_string(&entry)?);
            }
        }
        DlqAction::Replay { sequence } => {
            let replayed = chute_router::webhook::replay_dead_letters(&js, sequence).await?;
            println!("replayed: {replayed}");
        }
    }
    client.flush().await?;
    Ok(())
}
