//! Output: JSON files, the end-of-run table, and the `make bench` summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ceiling::CeilingReport;
use crate::driver::RunReport;
use crate::error::{Error, Result};
use crate::stats::LatencySummary;

fn latency_row(out: &mut String, name: &str, latency: &LatencySummary) {
    let _ = writeln!(
        out,
        "  {name:<26} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  p99.9 {:>8.2}  max {:>8.2} ms  (n={})",
        latency.p50_ms, latency.p90_ms, latency.p99_ms, latency.p999_ms, latency.max_ms, latency.count
    );
}

/// The end-of-run table.
pub fn run_table(report: &RunReport) -> String {
    let mut out = String::new();
    let target = report
        .target_rate
        .map(|rate| format!(" at {rate:.0} ev/s"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "run {} ({} loop{target}, {}, {} ev/request, {:.1} s)",
        report.run_id, report.mode, report.transport, report.events_per_request, report.duration_seconds
    );
    let _ = writeln!(
        out,
        "  acknowledged               {} events in {} requests ({} rejected, {} failed, {} retries)",
        report.events.acked,
        report.requests.acked,
        report.events.rejected,
        report.events.failed,
        report.requests.retries
    );
    let _ = writeln!(out, "  achieved rate              {:.0} events/s", report.achieved_rate);
    latency_row(&mut out, "ack latency", &report.ack_latency);
    if !report.errors.is_empty() {
        let errors: Vec<String> = report.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
        let _ = writeln!(out, "  errors (attempts)          {}", errors.join(", "));
    }
    match (&report.clickhouse, &report.clickhouse_error) {
        (Some(delivery), _) => {
            latency_row(&mut out, "accepted -> inserted", &delivery.accepted_to_inserted);
            let _ = writeln!(
                out,
                "  end-to-end rate            {:.0} events/s into ClickHouse (first accept -> last insert)",
                delivery.end_to_end_rate
            );
            let _ = writeln!(
                out,
                "  loss/duplicate check       {} — acked {}, in ClickHouse {} distinct / {} rows (drained in {:.1} s)",
                if delivery.ok { "OK" } else { "FAILED" },
                delivery.sent.acked,
                delivery.stored.unique,
                delivery.stored.rows,
                delivery.drain_seconds
            );
            let _ = writeln!(out, "  verdict                    {:?}", delivery.verdict);
        }
        (None, Some(err)) => {
            let _ = writeln!(out, "  clickhouse check           not done: {err}");
        }
        (None, None) => {
            let _ = writeln!(out, "  clickhouse check           skipped (--no-verify)");
        }
    }
    match (&report.live, &report.live_error) {
        (Some(live), _) => {
            latency_row(&mut out, &format!("accepted -> live ({})", live.source), &live.latency);
            if live.lagged_missed > 0 {
                let _ = writeln!(
                    out,
                    "  live subscriber lagged     {} events skipped",
                    live.lagged_missed
                );
            }
        }
        (None, Some(err)) => {
            let _ = writeln!(out, "  live stream                not measured: {err}");
        }
        (None, None) => {}
    }
    out
}

/// One fixed-rate latency run in the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateLatency {
    pub label: String,
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub ack_p99_ms: f64,
    pub queryable_p99_ms: Option<f64>,
    pub live_p99_ms: Option<f64>,
    pub live_source: Option<String>,
    pub delivery_ok: bool,
}

/// The maximum sustained throughput run in the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaxThroughput {
    pub label: String,
    pub load_seconds: f64,
    /// Acknowledged events per second during the load.
    pub ack_rate: f64,
    /// Events in ClickHouse per second, first accept -> last insert (the headline).
    pub end_to_end_rate: f64,
    pub ratio_to_insert_ceiling: f64,
    pub ratio_to_jetstream_ceiling: f64,
    pub delivery_ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// `bench/results/<date>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    pub date: String,
    pub machine: serde_json::Value,
    pub ceiling: CeilingReport,
    pub max_throughput: Option<MaxThroughput>,
    pub fixed_rates: Vec<RateLatency>,
    /// Peak RSS (VmHWM) of each process over the whole bench, KiB.
    pub peak_rss_kib: BTreeMap<String, u64>,
    pub targets: Vec<TargetCheck>,
    pub runs: Vec<RunReport>,
}

/// Combines the files `make bench` leaves in `dir`: `ceiling.json`, `run-*.json` (one per load
/// run), `rss.json` (process name -> VmHWM KiB) and `machine.json`.
pub fn summarize(dir: &Path) -> Result<BenchResult> {
    let ceiling: CeilingReport = crate::json::read_json(&dir.join("ceiling.json"))?;
    let peak_rss_kib: BTreeMap<String, u64> = crate::json::read_json(&dir.join("rss.json")).unwrap_or_default();
    let machine: serde_json::Value = crate::json::read_json(&dir.join("machine.json")).unwrap_or_default();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|err| Error::io(dir.display(), err))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("run-") && name.ends_with(".json"))
        })
        .collect();
    paths.sort();
    let runs = paths
        .iter()
        .map(|path| crate::json::read_json::<RunReport>(path))
        .collect::<Result<Vec<_>>>()?;
    Ok(combine(ceiling, runs, peak_rss_kib, machine))
}

/// The summary of one bench run: ratios and target checks (pure).
pub fn combine(
    ceiling: CeilingReport,
    runs: Vec<RunReport>,
    mut peak_rss_kib: BTreeMap<String, u64>,
    machine: serde_json::Value,
) -> BenchResult {
    if let Some(loadtest) = runs.iter().filter_map(|run| run.loadtest_peak_rss_kib).max() {
        peak_rss_kib.entry("loadtest".to_owned()).or_insert(loadtest);
    }
    let delivery_ok = |run: &RunReport| run.clickhouse.as_ref().is_some_and(|delivery| delivery.ok);
    let max_throughput = runs.iter().find(|run| run.mode == "closed").map(|run| {
        let end_to_end_rate = run.clickhouse.as_ref().map_or(0.0, |delivery| delivery.end_to_end_rate);
        MaxThroughput {
            label: run.label.clone(),
            load_seconds: run.duration_seconds,
            ack_rate: run.achieved_rate,
            end_to_end_rate,
            ratio_to_insert_ceiling: end_to_end_rate / ceiling.insert_rows_per_second.max(1e-9),
            ratio_to_jetstream_ceiling: end_to_end_rate / ceiling.jetstream_events_per_second.max(1e-9),
            delivery_ok: delivery_ok(run),
        }
    });
    let fixed_rates: Vec<RateLatency> = runs
        .iter()
        .filter(|run| run.mode == "open")
        .map(|run| RateLatency {
            label: run.label.clone(),
            target_rate: run.target_rate.unwrap_or_default(),
            achieved_rate: run.achieved_rate,
            ack_p99_ms: run.ack_latency.p99_ms,
            queryable_p99_ms: run
                .clickhouse
                .as_ref()
                .map(|delivery| delivery.accepted_to_inserted.p99_ms),
            live_p99_ms: run
                .live
                .as_ref()
                .filter(|live| live.events > 0)
                .map(|live| live.latency.p99_ms),
            live_source: run.live.as_ref().map(|live| live.source.clone()),
            delivery_ok: delivery_ok(run),
        })
        .collect();

    let mut targets = Vec::new();
    if let Some(max) = &max_throughput {
        targets.push(TargetCheck {
            target: "sustained end-to-end >= 250,000 events/s".into(),
            measured: format!("{:.0} events/s", max.end_to_end_rate),
            met: max.end_to_end_rate >= 250_000.0,
        });
        targets.push(TargetCheck {
            target: "end-to-end >= 50% of the ClickHouse insert ceiling".into(),
            measured: format!("{:.0}%", max.ratio_to_insert_ceiling * 100.0),
            met: max.ratio_to_insert_ceiling >= 0.5,
        });
    }
    if let Some(at_50k) = fixed_rates
        .iter()
        .find(|rate| (rate.target_rate - 50_000.0).abs() < 1.0)
    {
        targets.push(TargetCheck {
            target: "at 50k/s: ack p99 < 10 ms".into(),
            measured: format!("{:.2} ms", at_50k.ack_p99_ms),
            met: at_50k.ack_p99_ms < 10.0,
        });
        targets.push(TargetCheck {
            target: "at 50k/s: accepted -> queryable p99 < 500 ms".into(),
            measured: at_50k
                .queryable_p99_ms
                .map_or("not measured".into(), |ms| format!("{ms:.0} ms")),
            met: at_50k.queryable_p99_ms.is_some_and(|ms| ms < 500.0),
        });
        targets.push(TargetCheck {
            target: "at 50k/s: accepted -> live stream p99 < 50 ms".into(),
            measured: match (&at_50k.live_p99_ms, &at_50k.live_source) {
                (Some(ms), Some(source)) => format!("{ms:.1} ms ({source})"),
                _ => "not measured".into(),
            },
            met: at_50k.live_p99_ms.is_some_and(|ms| ms < 50.0),
        });
    }
    targets.push(TargetCheck {
        target: "no loss, no duplicate in any run".into(),
        measured: format!(
            "{} of {} runs exact",
            runs.iter().filter(|run| delivery_ok(run)).count(),
            runs.len()
        ),
        met: !runs.is_empty() && runs.iter().all(delivery_ok),
    });

    BenchResult {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        machine,
        ceiling,
        max_throughput,
        fixed_rates,
        peak_rss_kib,
        targets,
        runs,
    }
}

/// `132k`, `9874`.
fn count(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else {
        format!("{value:.0}")
    }
}

fn rate(events_per_second: f64) -> String {
    format!("{}/s", count(events_per_second))
}

fn optional_ms(ms: Option<f64>) -> String {
    ms.map_or("-".to_owned(), |ms| format!("{ms:.1} ms"))
}

/// The printed summary of a bench run.
pub fn bench_table(result: &BenchResult) -> String {
    let mut out = String::new();
    let ceiling = &result.ceiling;
    let _ = writeln!(out, "Chute benchmark, {}", result.date);
    if let Some(load) = result.machine.get("loadavg").and_then(|load| load.as_str()) {
        let _ = writeln!(
            out,
            "machine: {} cores; load average at start / end: {load} (above ~0.5 means other work shared the cores)",
            result
                .machine
                .get("cores")
                .map_or("?".to_owned(), |cores| cores.to_string())
        );
    }
    let exited = result.machine.get("exited").and_then(|exited| exited.as_str());
    if let Some(exited) = exited.filter(|exited| !exited.is_empty()) {
        let _ = writeln!(
            out,
            "SERVICES THAT EXITED (name@step): {exited} — later numbers are not valid"
        );
    }
    let _ = writeln!(
        out,
        "\n1. Ceilings (same generated events, {:.0} bytes each in JetStream)",
        ceiling.event_bytes
    );
    let _ = writeln!(
        out,
        "   ClickHouse bulk RowBinary insert   {:>8} rows/s   ({} rows in {} inserts of <= {})",
        count(ceiling.insert_rows_per_second),
        ceiling.rows,
        ceiling.insert_batches,
        ceiling.batch_rows
    );
    let _ = writeln!(
        out,
        "   JetStream publish (PubAck)         {:>8} events/s ({} messages, {:.0} MiB/s)",
        count(ceiling.jetstream_events_per_second),
        ceiling.jetstream_messages,
        ceiling.jetstream_mib_per_second
    );
    if let Some(max) = &result.max_throughput {
        let _ = writeln!(
            out,
            "\n2. Maximum sustained end-to-end (closed loop, {:.0} s of load)",
            max.load_seconds
        );
        let _ = writeln!(
            out,
            "   acknowledged                       {:>8} events/s",
            count(max.ack_rate)
        );
        let _ = writeln!(
            out,
            "   in ClickHouse (accept -> insert)   {:>8} events/s = {:.0}% of the insert ceiling, {:.0}% of JetStream's; delivery {}",
            count(max.end_to_end_rate),
            max.ratio_to_insert_ceiling * 100.0,
            max.ratio_to_jetstream_ceiling * 100.0,
            if max.delivery_ok { "exact" } else { "NOT exact" }
        );
    }
    let _ = writeln!(out, "\n3. Latency at fixed rates (p99)");
    let _ = writeln!(
        out,
        "   {:<10} {:>10} {:>12} {:>16} {:>22} {:>9}",
        "target", "achieved", "ack", "-> queryable", "-> live stream", "delivery"
    );
    for fixed in &result.fixed_rates {
        let live = match (&fixed.live_p99_ms, &fixed.live_source) {
            (Some(ms), Some(source)) => format!("{ms:.1} ms ({source})"),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "   {:<10} {:>10} {:>12} {:>16} {:>22} {:>9}",
            rate(fixed.target_rate),
            rate(fixed.achieved_rate),
            format!("{:.2} ms", fixed.ack_p99_ms),
            optional_ms(fixed.queryable_p99_ms),
            live,
            if fixed.delivery_ok { "exact" } else { "NOT exact" }
        );
    }
    let _ = writeln!(out, "\n4. Peak RSS (VmHWM over the whole bench)");
    for (name, kib) in &result.peak_rss_kib {
        let _ = writeln!(out, "   {name:<22} {:>8.1} MiB", *kib as f64 / 1024.0);
    }
    let _ = writeln!(out, "\nTargets (BRIEF)");
    for check in &result.targets {
        let _ = writeln!(
            out,
            "   [{}] {:<50} {}",
            if check.met { " met " } else { "MISSED" },
            check.target,
            check.measured
        );
    }
    out
}
