//! Output: JSON files, the end-of-run table, and the `make bench` summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ceiling::CeilingReport;
use crate::cpu::{CpuReport, CHUTE_PATH};
use crate::driver::{delivery_word, RateLatency, RunReport};
use crate::error::{Error, Result};
use crate::stats::LatencySummary;
use crate::steady::SteadyReport;

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
            let word = delivery_word(report);
            let (check, waited) = match word {
                "exact" => ("OK", "drained in"),
                "not verified" => ("NOT VERIFIED", "gave up after"),
                _ => ("FAILED", "drained in"),
            };
            let _ = writeln!(
                out,
                "  loss/duplicate check       {check} — acked {}, in ClickHouse {} distinct / {} rows ({waited} {:.1} s)",
                delivery.sent.acked,
                delivery.stored.unique,
                delivery.stored.rows,
                delivery.drain_seconds
            );
            if word == "not verified" {
                let _ = writeln!(
                    out,
                    "  verdict                    not verified: {} acknowledged events were not in ClickHouse yet and none was doubled; they may land later",
                    delivery.sent.acked.saturating_sub(delivery.stored.unique)
                );
            } else {
                let _ = writeln!(out, "  verdict                    {:?}", delivery.verdict);
            }
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
    if let Some(cpu) = &report.cpu {
        cpu_rows(&mut out, cpu, "  ");
    }
    out
}

/// µs per event of each process and of Chute's own path.
fn cpu_rows(out: &mut String, cpu: &CpuReport, indent: &str) {
    let _ = writeln!(
        out,
        "{indent}CPU per event over the load window ({:.1} s, {} events; CPU-µs/event = CPU-s per million events)",
        cpu.window_seconds, cpu.events
    );
    for (name, process) in &cpu.processes {
        let _ = writeln!(
            out,
            "{indent}  {name:<24} {:>8.2} µs/event {:>6.2} cores",
            process.us_per_event, process.cores
        );
    }
    match (cpu.chute_path_cpu_us_per_event, cpu.chute_path_events_per_core_second) {
        (Some(us), per_core) => {
            let _ = writeln!(
                out,
                "{indent}  {:<24} {us:>8.2} µs/event = {} events/s per core ({})",
                "Chute's own path",
                per_core.map_or("-".to_owned(), count),
                CHUTE_PATH.join(" + ")
            );
        }
        (None, _) => {
            let _ = writeln!(
                out,
                "{indent}  {:<24} not measured (needs --pid for {})",
                "Chute's own path",
                CHUTE_PATH.join(", ")
            );
        }
    }
    if !cpu.missing.is_empty() {
        let _ = writeln!(
            out,
            "{indent}  not readable at both ends of the window: {}",
            cpu.missing.join(", ")
        );
    }
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
    /// `exact`, `NOT exact` or `not verified` ([`delivery_word`]).
    #[serde(default)]
    pub delivery: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// `bench/results/<date>.json`. Keys added since the first results default when an older file
/// is read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchResult {
    pub date: String,
    pub machine: serde_json::Value,
    pub ceiling: CeilingReport,
    pub max_throughput: Option<MaxThroughput>,
    pub fixed_rates: Vec<RateLatency>,
    /// Peak RSS (VmHWM) of each process over the whole bench, KiB.
    pub peak_rss_kib: BTreeMap<String, u64>,
    /// The same in MiB (the stable key).
    pub rss_peak_mib: BTreeMap<String, f64>,
    /// Label of the fixed-rate run the CPU figures come from (50k/s when it ran, else the
    /// highest fixed rate measured).
    pub cpu_run: Option<String>,
    /// Its target rate, events/s.
    pub cpu_rate: Option<f64>,
    /// Process -> CPU-µs per event over that run's load window.
    pub cpu_us_per_event: BTreeMap<String, f64>,
    /// ingestor + nats-server + aggregator, CPU-µs per event.
    pub chute_path_cpu_us_per_event: Option<f64>,
    /// 1e6 / `chute_path_cpu_us_per_event`.
    pub chute_path_events_per_core_second: Option<f64>,
    /// The insert ceiling of the same run, rows/s (`ceiling.insert_rows_per_second`).
    pub insert_ceiling_rows_per_s: f64,
    /// The highest open-loop rate sustained for a whole probe (`loadtest steady`), events/s.
    pub steady_state_events_per_s: Option<f64>,
    /// `steady_state_events_per_s / insert_ceiling_rows_per_s`.
    pub steady_state_ratio: Option<f64>,
    /// The search's probes (rate, verdict, why).
    pub steady_state_probes: Vec<crate::steady::Probe>,
    /// Fixed-rate latencies: run (`10000`, `50000`, `50000-pinned`) -> kind (`ack_p50`,
    /// `ack_p99`, `queryable_p50`, `queryable_p99`, `live_p50`, `live_p99`) -> milliseconds.
    pub latency_ms: BTreeMap<String, BTreeMap<String, f64>>,
    pub targets: Vec<TargetCheck>,
    pub runs: Vec<RunReport>,
}

/// Combines the files `make bench` leaves in `dir`: `ceiling.json`, `run-*.json` (one per load
/// run), `steady.json` (`loadtest steady`, optional), `rss.json` (process name -> VmHWM KiB) and
/// `machine.json`.
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
    let steady: Option<SteadyReport> = crate::json::read_json(&dir.join("steady.json")).ok();
    let mut result = combine(ceiling, runs, peak_rss_kib, machine);
    if let Some(steady) = steady {
        with_steady_state(&mut result, steady);
    }
    Ok(result)
}

/// Adds the steady-state search to a summary: the headline rate, its ratio to the insert
/// ceiling of the same run, and the target check (pure).
pub fn with_steady_state(result: &mut BenchResult, steady: SteadyReport) {
    let ceiling = result.insert_ceiling_rows_per_s;
    result.steady_state_events_per_s = steady.steady_state_events_per_s;
    result.steady_state_ratio = steady
        .steady_state_events_per_s
        .filter(|_| ceiling > 0.0)
        .map(|rate| rate / ceiling);
    result.targets.insert(
        0,
        TargetCheck {
            target: "steady state >= 50% of the ClickHouse insert ceiling".into(),
            measured: match (steady.steady_state_events_per_s, result.steady_state_ratio) {
                (Some(rate), Some(ratio)) => format!(
                    "{} ({:.0}% of {} rows/s; first failing probe {})",
                    self::rate(rate),
                    ratio * 100.0,
                    count(ceiling),
                    steady.lowest_failing_events_per_s.map_or("-".into(), self::rate)
                ),
                _ => format!(
                    "no probed rate passed (lowest failing {})",
                    steady.lowest_failing_events_per_s.map_or("-".into(), self::rate)
                ),
            },
            met: result.steady_state_ratio.is_some_and(|ratio| ratio >= 0.5),
        },
    );
    result.steady_state_probes = steady.probes;
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
    let insert_ceiling_rows_per_s = ceiling.insert_rows_per_second;
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
            delivery: delivery_word(run).to_owned(),
        }
    });
    let fixed_rates: Vec<RateLatency> = runs
        .iter()
        .filter(|run| run.mode == "open")
        .map(RateLatency::of)
        .collect();
    let latency_ms = runs
        .iter()
        .filter(|run| run.mode == "open")
        .map(|run| {
            let mut kinds = BTreeMap::from([
                ("ack_p50".to_owned(), run.ack_latency.p50_ms),
                ("ack_p99".to_owned(), run.ack_latency.p99_ms),
            ]);
            if let Some(delivery) = &run.clickhouse {
                kinds.insert("queryable_p50".into(), delivery.accepted_to_inserted.p50_ms);
                kinds.insert("queryable_p99".into(), delivery.accepted_to_inserted.p99_ms);
            }
            if let Some(live) = run.live.as_ref().filter(|live| live.events > 0) {
                kinds.insert("live_p50".into(), live.latency.p50_ms);
                kinds.insert("live_p99".into(), live.latency.p99_ms);
            }
            let key = format!("{:.0}", run.target_rate.unwrap_or_default());
            let key = if run.label.ends_with("-pinned") {
                format!("{key}-pinned")
            } else {
                key
            };
            (key, kinds)
        })
        .collect();

    // CPU per event: the 50k/s run (the BRIEF's rate), else the highest fixed rate measured.
    let cpu_run = runs
        .iter()
        .filter(|run| run.mode == "open" && !run.label.ends_with("-pinned"))
        .filter(|run| run.cpu.as_ref().is_some_and(|cpu| cpu.events > 0))
        .max_by(|a, b| {
            let key = |run: &RunReport| {
                let rate = run.target_rate.unwrap_or_default();
                ((rate - 50_000.0).abs() < 1.0, rate)
            };
            key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal)
        });
    let cpu = cpu_run.and_then(|run| run.cpu.as_ref());

    let mut targets = Vec::new();
    if let (Some(run), Some(cpu)) = (cpu_run, cpu) {
        targets.push(TargetCheck {
            target: "Chute's own path <= 2 µs CPU per event".into(),
            measured: match (cpu.chute_path_cpu_us_per_event, cpu.chute_path_events_per_core_second) {
                (Some(us), per_core) => format!(
                    "{us:.2} µs at {} ({} events/s per core)",
                    rate(run.target_rate.unwrap_or_default()),
                    per_core.map_or("-".to_owned(), count)
                ),
                (None, _) => "not measured".into(),
            },
            met: cpu.chute_path_cpu_us_per_event.is_some_and(|us| us <= 2.0),
        });
    }
    if let Some(max) = &max_throughput {
        targets.push(TargetCheck {
            target: "closed loop: end-to-end >= 250,000 events/s".into(),
            measured: format!("{:.0} events/s", max.end_to_end_rate),
            met: max.end_to_end_rate >= 250_000.0,
        });
        targets.push(TargetCheck {
            target: "closed loop: end-to-end >= 50% of the insert ceiling".into(),
            measured: format!("{:.0}%", max.ratio_to_insert_ceiling * 100.0),
            met: max.ratio_to_insert_ceiling >= 0.5,
        });
    }
    for target_rate in [10_000.0, 50_000.0] {
        let Some(fixed) = fixed_rates
            .iter()
            .find(|fixed| !fixed.pinned && (fixed.target_rate - target_rate).abs() < 1.0)
        else {
            continue;
        };
        let at = rate(target_rate);
        targets.push(TargetCheck {
            target: format!("at {at}: ack p99 < 10 ms"),
            measured: format!("{:.2} ms", fixed.ack_p99_ms),
            met: fixed.ack_p99_ms < 10.0,
        });
        targets.push(TargetCheck {
            target: format!("at {at}: accepted -> queryable p99 < 500 ms"),
            measured: fixed
                .queryable_p99_ms
                .map_or("not measured".into(), |ms| format!("{ms:.0} ms")),
            met: fixed.queryable_p99_ms.is_some_and(|ms| ms < 500.0),
        });
        targets.push(TargetCheck {
            target: format!("at {at}: accepted -> live stream p99 < 50 ms"),
            measured: match (&fixed.live_p99_ms, &fixed.live_source) {
                (Some(ms), Some(source)) => format!("{ms:.1} ms ({source})"),
                _ => "not measured".into(),
            },
            met: fixed.live_p99_ms.is_some_and(|ms| ms < 50.0),
        });
    }
    targets.push(TargetCheck {
        target: "no loss, no duplicate in any run".into(),
        measured: format!(
            "{} of {} runs exact{}",
            runs.iter().filter(|run| delivery_ok(run)).count(),
            runs.len(),
            match runs.iter().filter(|run| delivery_word(run) == "not verified").count() {
                0 => String::new(),
                unverified => format!(
                    "; {unverified} not verified (the check gave up while acknowledged events were still landing)"
                ),
            }
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
        rss_peak_mib: peak_rss_kib
            .iter()
            .map(|(name, kib)| (name.clone(), *kib as f64 / 1024.0))
            .collect(),
        peak_rss_kib,
        cpu_run: cpu_run.map(|run| run.label.clone()),
        cpu_rate: cpu_run.and_then(|run| run.target_rate),
        cpu_us_per_event: cpu.map(|cpu| cpu.cpu_us_per_event.clone()).unwrap_or_default(),
        chute_path_cpu_us_per_event: cpu.and_then(|cpu| cpu.chute_path_cpu_us_per_event),
        chute_path_events_per_core_second: cpu.and_then(|cpu| cpu.chute_path_events_per_core_second),
        insert_ceiling_rows_per_s,
        steady_state_events_per_s: None,
        steady_state_ratio: None,
        steady_state_probes: Vec::new(),
        latency_ms,
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
    match result.steady_state_events_per_s {
        Some(steady) => {
            let _ = writeln!(
                out,
                "\n2. Steady state (open loop, backlog flat and accepted -> queryable p99 < 1 s for a whole probe)\n   sustained                          {:>8} events/s = {:.0}% of the insert ceiling",
                count(steady),
                result.steady_state_ratio.unwrap_or_default() * 100.0
            );
        }
        None if !result.steady_state_probes.is_empty() => {
            let _ = writeln!(out, "\n2. Steady state: no probed rate passed");
        }
        None => {}
    }
    for probe in &result.steady_state_probes {
        let _ = writeln!(out, "   probe {}", probe.summary());
    }
    if let Some(max) = &result.max_throughput {
        let _ = writeln!(
            out,
            "\n2b. Maximum end-to-end (closed loop, {:.0} s of load; secondary)",
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
            max.delivery
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
            if fixed.pinned {
                format!("{} pinned", rate(fixed.target_rate))
            } else {
                rate(fixed.target_rate)
            },
            rate(fixed.achieved_rate),
            format!("{:.2} ms", fixed.ack_p99_ms),
            optional_ms(fixed.queryable_p99_ms),
            live,
            fixed.delivery
        );
    }
    let _ = writeln!(out, "\n4. Peak RSS (VmHWM over the whole bench)");
    for (name, mib) in &result.rss_peak_mib {
        let _ = writeln!(out, "   {name:<22} {mib:>8.1} MiB");
    }
    let cpu = result.cpu_run.as_ref().and_then(|label| {
        result
            .runs
            .iter()
            .find(|run| &run.label == label)
            .and_then(|run| run.cpu.as_ref())
    });
    match (cpu, result.cpu_rate) {
        (Some(cpu), Some(target)) => {
            let _ = writeln!(out, "\n5. CPU per event (open loop at {})", rate(target));
            cpu_rows(&mut out, cpu, "   ");
        }
        _ => {
            let _ = writeln!(
                out,
                "\n5. CPU per event: not measured (no fixed-rate run with CPU readings)"
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{cpu_report, Reading};

    fn run(label: &str, mode: &str, target_rate: Option<f64>, cpu: Option<CpuReport>) -> RunReport {
        let mut run: RunReport = serde_json::from_value(serde_json::json!({
            "label": label, "run_id": label, "started_at": "", "mode": mode, "transport": "unary",
            "target_rate": target_rate, "concurrency": 8, "connections": 2, "events_per_request": 100,
            "grpc": "", "duration_seconds": 10.0,
            "requests": {"sent": 0, "acked": 0, "failed": 0, "retries": 0},
            "events": {"acked": 500000, "rejected": 0, "failed": 0, "unknown": 0},
            "achieved_rate": 50000.0,
            "ack_latency": {"count": 0, "mean_ms": 0.0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 1.0,
                            "p999_ms": 0.0, "max_ms": 0.0},
            "errors": {}, "clickhouse": null, "clickhouse_error": null, "live": null,
            "live_error": null, "loadtest_peak_rss_kib": 2048
        }))
        .expect("a run report without the cpu field still reads");
        run.cpu = cpu;
        run
    }

    fn cpu(ticks: &[(&str, u64)], events: u64) -> CpuReport {
        let wanted: Vec<String> = ticks.iter().map(|(name, _)| (*name).to_owned()).collect();
        let before: Reading = ticks.iter().map(|(name, _)| ((*name).to_owned(), 0)).collect();
        let after: Reading = ticks.iter().map(|(name, t)| ((*name).to_owned(), *t)).collect();
        cpu_report(&wanted, &before, &after, events, 10.0, 100)
    }

    #[test]
    fn summary_takes_cpu_from_the_50k_run_and_rss_in_mib() {
        let at_50k = cpu(
            &[
                ("ingestor", 100),
                ("nats-server", 50),
                ("aggregator", 50),
                ("clickhouse", 500),
                ("loadtest", 20),
            ],
            500_000,
        );
        let at_10k = cpu(&[("ingestor", 100), ("nats-server", 50), ("aggregator", 50)], 100_000);
        let runs = vec![
            run("open-10000", "open", Some(10_000.0), Some(at_10k)),
            run("open-50000", "open", Some(50_000.0), Some(at_50k)),
            run("closed-max", "closed", None, None),
        ];
        let rss = BTreeMap::from([("ingestor".to_owned(), 3072)]);
        let result = combine(CeilingReport::default(), runs, rss, serde_json::Value::Null);
        assert_eq!(result.cpu_run.as_deref(), Some("open-50000"));
        assert_eq!(result.cpu_rate, Some(50_000.0));
        // 100 ticks = 1 s over 500k events = 2 µs per event.
        assert!((result.cpu_us_per_event["ingestor"] - 2.0).abs() < 1e-9);
        assert!((result.cpu_us_per_event["clickhouse"] - 10.0).abs() < 1e-9);
        assert!((result.chute_path_cpu_us_per_event.unwrap() - 4.0).abs() < 1e-9);
        assert!((result.chute_path_events_per_core_second.unwrap() - 250_000.0).abs() < 1e-6);
        let check = result
            .targets
            .iter()
            .find(|check| check.target.contains("own path"))
            .expect("a CPU target check");
        assert!(!check.met, "{check:?}");
        // RSS: the old key (KiB) stays, the new one is MiB; the loadtest's own peak is added.
        assert_eq!(result.peak_rss_kib["ingestor"], 3072);
        assert_eq!(result.rss_peak_mib["ingestor"], 3.0);
        assert_eq!(result.rss_peak_mib["loadtest"], 2.0);

        let table = bench_table(&result);
        assert!(table.contains("5. CPU per event (open loop at 50k/s)"), "{table}");
        assert!(table.contains("Chute's own path"), "{table}");
        let json = serde_json::to_value(&result).unwrap();
        assert!(json["cpu_us_per_event"]["nats-server"].is_number(), "{json}");
        assert!(json["chute_path_cpu_us_per_event"].is_number());
        assert!(json["rss_peak_mib"]["ingestor"].is_number());
    }

    #[test]
    fn steady_state_is_the_headline_and_pinned_runs_stay_apart() {
        let at_50k = cpu(&[("ingestor", 100), ("nats-server", 50), ("aggregator", 50)], 500_000);
        let pinned_cpu = cpu(&[("ingestor", 10), ("nats-server", 5), ("aggregator", 5)], 500_000);
        let mut pinned = run("open-50000-pinned", "open", Some(50_000.0), Some(pinned_cpu));
        pinned.ack_latency.p99_ms = 4.0;
        let runs = vec![
            run("open-10000", "open", Some(10_000.0), None),
            run("open-50000", "open", Some(50_000.0), Some(at_50k)),
            pinned,
        ];
        let ceiling = CeilingReport {
            insert_rows_per_second: 200_000.0,
            ..CeilingReport::default()
        };
        let mut result = combine(ceiling, runs, BTreeMap::new(), serde_json::Value::Null);
        // The pinned run is neither the CPU run nor the 50k/s target check.
        assert_eq!(result.cpu_run.as_deref(), Some("open-50000"));
        assert!(result.fixed_rates.iter().any(|fixed| fixed.pinned));
        assert_eq!(result.latency_ms["50000-pinned"]["ack_p99"], 4.0);
        assert_eq!(result.latency_ms["10000"]["ack_p99"], 1.0);
        let ack_checks: Vec<_> = result
            .targets
            .iter()
            .filter(|check| check.target.contains("ack p99"))
            .collect();
        assert_eq!(ack_checks.len(), 2, "10k/s and 50k/s: {ack_checks:?}");
        assert!(
            ack_checks.iter().all(|check| check.measured == "1.00 ms"),
            "{ack_checks:?}"
        );

        let probe = |rate: f64, passed: bool| crate::steady::Probe {
            rate,
            passed,
            reasons: if passed { vec![] } else { vec!["backlog grew".into()] },
            run: RateLatency {
                label: format!("steady-{rate}"),
                target_rate: rate,
                achieved_rate: rate,
                ack_p99_ms: 5.0,
                queryable_p99_ms: Some(400.0),
                live_p99_ms: None,
                live_source: None,
                delivery_ok: true,
                delivery: "exact".into(),
                pinned: false,
            },
            backlog_growth_events: Some(0.0),
            backlog_max_messages: Some(3.0),
            stopped_early: false,
        };
        let steady = SteadyReport {
            steady_state_events_per_s: Some(90_000.0),
            lowest_failing_events_per_s: Some(105_000.0),
            probes: vec![probe(105_000.0, false), probe(90_000.0, true)],
            ..SteadyReport::default()
        };
        with_steady_state(&mut result, steady);
        assert_eq!(result.insert_ceiling_rows_per_s, 200_000.0);
        assert_eq!(result.steady_state_events_per_s, Some(90_000.0));
        assert!((result.steady_state_ratio.unwrap() - 0.45).abs() < 1e-9);
        assert!(result.targets[0].target.starts_with("steady state"));
        assert!(!result.targets[0].met, "45% < 50%: {:?}", result.targets[0]);
        let json = serde_json::to_value(&result).unwrap();
        for key in [
            "steady_state_events_per_s",
            "insert_ceiling_rows_per_s",
            "steady_state_ratio",
            "latency_ms",
        ] {
            assert!(!json[key].is_null(), "{key} in {json}");
        }
        let table = bench_table(&result);
        assert!(table.contains("2. Steady state"), "{table}");
        assert!(table.contains("50k/s pinned"), "{table}");
        assert!(table.contains("backlog grew"), "{table}");
    }

    #[test]
    fn a_check_that_gave_up_while_events_were_landing_is_not_verified_not_lost() {
        use crate::stats::LatencySummary;
        use crate::verify::{verdict, Sent, Stored};
        use crate::warehouse::DeliveryReport;
        let with = |unique: u64, rows: u64, drained: bool| {
            let mut run = run("closed-max", "closed", None, None);
            let sent = Sent { acked: 100, unknown: 0 };
            let stored = Stored { unique, rows };
            let verdict = verdict(sent, stored);
            run.clickhouse = Some(DeliveryReport {
                stored,
                sent,
                verdict,
                ok: verdict.is_ok() && drained,
                drained,
                drain_seconds: 30.0,
                accepted_to_inserted: LatencySummary::default(),
                end_to_end_rate: 1.0,
                first_ingested_ms: 0,
                last_inserted_ms: 0,
            });
            run
        };
        assert_eq!(delivery_word(&with(100, 100, true)), "exact");
        assert_eq!(delivery_word(&with(90, 90, false)), "not verified");
        assert_eq!(
            delivery_word(&with(90, 90, true)),
            "NOT exact",
            "missing once everything could land"
        );
        assert_eq!(
            delivery_word(&with(100, 101, false)),
            "NOT exact",
            "a duplicate is final"
        );
        assert_eq!(delivery_word(&run("r", "open", Some(1.0), None)), "not verified");
        let table = run_table(&with(90, 90, false));
        assert!(table.contains("check       NOT VERIFIED"), "{table}");
        assert!(table.contains("not verified: 10 acknowledged events"), "{table}");
        assert!(!table.contains("Lost"), "{table}");
        assert!(run_table(&with(90, 90, true)).contains("Lost { missing: 10 }"));
        assert!(run_table(&with(100, 100, true)).contains("check       OK"));

        let runs = vec![with(100, 100, true), with(90, 90, false)];
        let result = combine(CeilingReport::default(), runs, BTreeMap::new(), serde_json::Value::Null);
        let check = result
            .targets
            .iter()
            .find(|check| check.target.starts_with("no loss"))
            .unwrap();
        assert!(!check.met);
        assert!(
            check.measured.starts_with("1 of 2 runs exact; 1 not verified"),
            "{check:?}"
        );
        assert_eq!(result.max_throughput.as_ref().unwrap().delivery, "exact");
        assert!(
            bench_table(&result).contains("delivery exact"),
            "{}",
            bench_table(&result)
        );
    }

    #[test]
    fn without_cpu_readings_the_summary_says_so() {
        let runs = vec![run("open-10000", "open", Some(10_000.0), None)];
        let result = combine(CeilingReport::default(), runs, BTreeMap::new(), serde_json::Value::Null);
        assert_eq!(result.cpu_run, None);
        assert!(result.cpu_us_per_event.is_empty());
        assert_eq!(result.chute_path_cpu_us_per_event, None);
        assert!(bench_table(&result).contains("CPU per event: not measured"));
        // Old result files (without the new keys) still read.
        let mut json = serde_json::to_value(&result).unwrap();
        for key in [
            "rss_peak_mib",
            "cpu_run",
            "cpu_us_per_event",
            "chute_path_cpu_us_per_event",
        ] {
            json.as_object_mut().unwrap().remove(key);
        }
        let _: BenchResult = serde_json::from_value(json).unwrap();
    }
}
