use anyhow::Context;
use chute_loadtest::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = chute_common::service::config_from_process();
    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(args).await,
        Some(Command::Ceiling(args)) => {
            let report = chute_loadtest::ceiling::run(&args)
                .await
                .context("ceiling measurement")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Some(Command::Steady(args)) => {
            let report = chute_loadtest::steady::run(&args)
                .await
                .context("steady-state search")?;
            match report.steady_state_events_per_s {
                Some(rate) => println!("steady state: {rate:.0} events/s"),
                None => println!("steady state: no probed rate passed"),
            }
            Ok(())
        }
        Some(Command::Summary(args)) => {
            let result = chute_loadtest::report::summarize(&args.dir)
                .with_context(|| format!("summarize {}", args.dir.display()))?;
            chute_loadtest::json::write_json(&args.out, &result)?;
            print!("{}", chute_loadtest::report::bench_table(&result));
            println!("\nwritten to {}", args.out.display());
            Ok(())
        }
    }
}

async fn run(args: chute_loadtest::config::RunArgs) -> anyhow::Result<()> {
    let report = chute_loadtest::run(&args).await.context("load run")?;
    print!("{}", chute_loadtest::report::run_table(&report));
    if !report.ok() {
        anyhow::bail!("the run did not pass (see the table above and the JSON result)");
    }
    Ok(())
}
