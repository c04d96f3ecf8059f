//! `loadtest steady`: the highest open-loop rate the whole pipeline sustains.
//!
//! A rate passes when, over a probe of `--probe-duration` (60 s by default):
//! - the load generator sent at the rate (acknowledged >= 97 % of it: the ingest side kept up);
//! - the JetStream backlog did not grow: the aggregator's pending messages at the end of the
//!   window exceed those at its start by less than one second of the rate ([`crate::backlog`]);
//! - accepted -> queryable p99 stayed under `--max-queryable-p99` (1 s);
//! - every acknowledged event is in ClickHouse exactly once.
//!
//! The search bisects between `--from` and `--to` (or the insert ceiling of `--ceiling-file`)
//! for `--probes` probes, to a resolution of `--resolution` events/s. A probe whose backlog passes
//! 10 s of its rate stops sending early: it has failed, and a shorter backlog drains sooner
//! before the next probe. Every probe waits for ClickHouse to hold all its events before the
//! next starts, so probes do not inherit each other's backlog.

use serde::{Deserialize, Serialize};

use crate::config::{Mode, SteadyArgs};
use crate::driver::{RateLatency, RunReport};
use crate::error::{Error, Result};

/// One probe's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub rate: f64,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub reasons: Vec<String>,
    /// Its figures, as for a fixed-rate run (rate achieved, latencies, delivery).
    #[serde(flatten)]
    pub run: RateLatency,
    pub backlog_growth_events: Option<f64>,
    pub backlog_max_messages: Option<f64>,
    pub stopped_early: bool,
}

impl Probe {
    /// `50k/s: passed, acknowledged 49990/s, ack p99 4.1 ms, queryable p99 412 ms, backlog
    /// growth 0 events` and, when it failed, why.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}/s: {}, acknowledged {:.0}/s, ack p99 {:.1} ms, queryable p99 {}, backlog growth {}",
            self.rate,
            if self.passed { "passed" } else { "failed" },
            self.run.achieved_rate,
            self.run.ack_p99_ms,
            self.run.queryable_p99_ms.map_or("-".into(), |ms| format!("{ms:.0} ms")),
            self.backlog_growth_events
                .map_or("-".into(), |events| format!("{events:.0} events")),
        );
        if !self.reasons.is_empty() {
            line.push_str(&format!(" ({})", self.reasons.join("; ")));
        }
        line
    }
}

/// `steady.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SteadyReport {
    /// The highest passing rate, events/s (`None`: no probe passed).
    pub steady_state_events_per_s: Option<f64>,
    /// The lowest failing rate, events/s (`None`: none failed).
    pub lowest_failing_events_per_s: Option<f64>,
    pub probe_seconds: f64,
    pub max_queryable_p99_ms: f64,
    pub probes: Vec<Probe>,
    /// Every probe's full run report.
    pub runs: Vec<RunReport>,
}

/// What a probe must show to pass.
#[derive(Debug, Clone, Copy)]
pub struct Criteria {
    pub max_queryable_p99_ms: f64,
    /// Backlog growth allowed, in seconds of the rate.
    pub backlog_seconds: f64,
    /// Share of the rate that must be acknowledged.
    pub min_achieved: f64,
}

impl Default for Criteria {
    fn default() -> Self {
        Self {
            max_queryable_p99_ms: 1_000.0,
            backlog_seconds: 1.0,
            min_achieved: 0.97,
        }
    }
}

/// The verdict on one probe's run (pure).
pub fn judge(rate: f64, run: &RunReport, criteria: Criteria) -> Probe {
    let mut reasons = Vec::new();
    let figures = RateLatency::of(run);
    if !figures.delivery_ok {
        reasons.push(match &run.clickhouse_error {
            Some(err) => format!("delivery not verified: {err}"),
            None => "delivery not exact (loss or duplicate)".to_owned(),
        });
    }
    if run.achieved_rate < criteria.min_achieved * rate {
        reasons.push(format!(
            "acknowledged {:.0}/s of {rate:.0}/s (the ingest side did not keep up)",
            run.achieved_rate
        ));
    }
    match figures.queryable_p99_ms {
        Some(p99) if p99 >= criteria.max_queryable_p99_ms => reasons.push(format!(
            "accepted -> queryable p99 {p99:.0} ms >= {:.0} ms",
            criteria.max_queryable_p99_ms
        )),
        Some(_) => {}
        None => reasons.push("accepted -> queryable not measured".to_owned()),
    }
    let backlog = run.backlog.as_ref();
    match backlog {
        Some(backlog) if backlog.stopped_early => reasons.push(format!(
            "backlog passed {:.0} messages: stopped early",
            backlog.max_messages
        )),
        Some(backlog) if backlog.samples == 0 => reasons.push("backlog not measured".to_owned()),
        Some(backlog) if backlog.growth_events > criteria.backlog_seconds * rate => reasons.push(format!(
            "backlog grew by {:.0} events (> {:.0} s of the rate)",
            backlog.growth_events, criteria.backlog_seconds
        )),
        _ => {}
    }
    Probe {
        rate,
        passed: reasons.is_empty(),
        reasons,
        run: figures,
        backlog_growth_events: backlog.map(|backlog| backlog.growth_events),
        backlog_max_messages: backlog.map(|backlog| backlog.max_messages),
        stopped_early: backlog.is_some_and(|backlog| backlog.stopped_early),
    }
}

/// The search's state: `low` passed (or is the assumed floor), `high` failed (or is the cap).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub low: f64,
    pub high: f64,
    pub best: Option<f64>,
    pub lowest_failing: Option<f64>,
}

impl Bounds {
    pub fn new(from: f64, to: f64) -> Self {
        Self {
            low: from,
            high: to.max(from),
            best: None,
            lowest_failing: None,
        }
    }

    /// The next rate to probe (a multiple of 1,000 between the bounds), or `None` when the bounds
    /// are within `resolution`. When nothing passed, the floor itself is probed last.
    pub fn next(&self, resolution: f64) -> Option<f64> {
        if self.high - self.low <= resolution.max(1_000.0) {
            return (self.best.is_none() && self.lowest_failing != Some(self.low)).then_some(self.low);
        }
        let mid = ((self.low + self.high) / 2.0 / 1_000.0).round() * 1_000.0;
        Some(mid.clamp(self.low + 1.0, self.high - 1.0).round())
    }

    pub fn record(&mut self, rate: f64, passed: bool) {
        if passed {
            self.low = self.low.max(rate);
            self.best = Some(self.best.map_or(rate, |best| best.max(rate)));
        } else {
            self.high = self.high.min(rate);
            self.lowest_failing = Some(self.lowest_failing.map_or(rate, |low| low.min(rate)));
            if rate <= self.low {
                // The assumed floor failed: nothing below it was searched.
                self.low = rate;
            }
        }
    }
}

pub async fn run(args: &SteadyArgs) -> Result<SteadyReport> {
    let to = match (args.to, &args.ceiling_file) {
        (Some(to), _) => to,
        (None, Some(path)) => crate::json::read_json::<crate::ceiling::CeilingReport>(path)?.insert_rows_per_second,
        (None, None) => return Err(Error::Config("loadtest steady needs --to or --ceiling-file".into())),
    };
    let criteria = Criteria {
        max_queryable_p99_ms: args.max_queryable_p99.as_secs_f64() * 1_000.0,
        ..Criteria::default()
    };
    let mut bounds = Bounds::new(args.from, to);
    let mut report = SteadyReport {
        probe_seconds: args.probe_duration.as_secs_f64(),
        max_queryable_p99_ms: criteria.max_queryable_p99_ms,
        ..SteadyReport::default()
    };
    while report.probes.len() < args.probes {
        let Some(rate) = bounds.next(args.resolution) else {
            break;
        };
        let mut run_args = args.run.clone();
        run_args.mode = Mode::Open;
        run_args.rate = rate;
        run_args.duration = args.probe_duration;
        run_args.events = None;
        run_args.stop_backlog_seconds = Some(args.abort_backlog_seconds);
        run_args.label = format!("steady-{rate:.0}");
        run_args.out = Some(args.probe_dir.join(format!("probe-{rate:07.0}.json")));
        eprintln!("steady state: probe {} at {rate:.0} events/s", report.probes.len() + 1);
        let run = crate::driver::run(&run_args).await?;
        let probe = judge(rate, &run, criteria);
        eprintln!("  {}", probe.summary());
        bounds.record(rate, probe.passed);
        report.probes.push(probe);
        report.runs.push(run);
    }
    report.steady_state_events_per_s = bounds.best;
    report.lowest_failing_events_per_s = bounds.lowest_failing;
    if let Some(out) = &args.steady_out {
        crate::json::write_json(out, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backlog::BacklogReport;
    use crate::stats::LatencySummary;
    use crate::verify::{Sent, Stored};
    use crate::warehouse::DeliveryReport;

    /// Runs the bisection against a pipeline that sustains exactly `capacity` events/s.
    fn search(from: f64, to: f64, probes: usize, capacity: f64) -> (Bounds, Vec<f64>) {
        let mut bounds = Bounds::new(from, to);
        let mut probed = Vec::new();
        while probed.len() < probes {
            let Some(rate) = bounds.next(2_000.0) else { break };
            probed.push(rate);
            bounds.record(rate, rate <= capacity);
        }
        (bounds, probed)
    }

    #[test]
    fn bisection_converges_on_the_capacity_from_below() {
        let (bounds, probed) = search(10_000.0, 200_000.0, 8, 63_500.0);
        assert_eq!(probed[0], 105_000.0);
        assert!(probed.iter().all(|rate| rate % 1_000.0 == 0.0), "{probed:?}");
        let best = bounds.best.expect("a rate below the capacity passed");
        assert!((61_500.0..=63_500.0).contains(&best), "{bounds:?} {probed:?}");
        assert!(bounds.lowest_failing.expect("one failed") > 63_500.0);
        // Five probes are enough to land within 1/32 of the range.
        let (bounds, probed) = search(10_000.0, 200_000.0, 5, 63_500.0);
        assert_eq!(probed.len(), 5);
        assert!(63_500.0 - bounds.best.unwrap() <= 190_000.0 / 32.0, "{bounds:?}");
    }

    #[test]
    fn a_pipeline_faster_than_the_range_passes_the_top_and_a_slow_one_probes_the_floor() {
        let (bounds, probed) = search(10_000.0, 200_000.0, 12, 1e9);
        assert!(bounds.best.unwrap() >= 198_000.0, "{probed:?}");
        assert!(bounds.lowest_failing.is_none());
        let (bounds, probed) = search(10_000.0, 200_000.0, 12, 5_000.0);
        assert_eq!(bounds.best, None, "{probed:?}");
        assert_eq!(
            probed.last(),
            Some(&10_000.0),
            "the floor is probed once nothing above passed"
        );
        assert_eq!(bounds.lowest_failing, Some(10_000.0));
        assert_eq!(bounds.next(2_000.0), None, "a failed floor ends the search");
    }

    fn run(achieved: f64, queryable_p99: Option<f64>, growth: f64, exact: bool) -> RunReport {
        let latency = |p99: f64| LatencySummary {
            count: 1,
            mean_ms: 1.0,
            p50_ms: 1.0,
            p90_ms: 1.0,
            p99_ms: p99,
            p999_ms: p99,
            max_ms: p99,
        };
        let mut run: RunReport = serde_json::from_value(serde_json::json!({
            "label": "steady", "run_id": "r", "started_at": "", "mode": "open", "transport": "unary",
            "target_rate": 50000.0, "concurrency": 1, "connections": 1, "events_per_request": 100,
            "grpc": "", "duration_seconds": 60.0,
            "requests": {"sent": 1, "acked": 1, "failed": 0, "retries": 0},
            "events": {"acked": 1, "rejected": 0, "failed": 0, "unknown": 0},
            "achieved_rate": achieved,
            "ack_latency": {"count": 1, "mean_ms": 1.0, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 3.0,
                            "p999_ms": 3.0, "max_ms": 3.0},
            "errors": {}, "clickhouse": null, "clickhouse_error": null, "live": null,
            "live_error": null, "loadtest_peak_rss_kib": null
        }))
        .expect("a run report");
        let sent = Sent { acked: 100, unknown: 0 };
        let stored = Stored {
            unique: if exact { 100 } else { 99 },
            rows: if exact { 100 } else { 99 },
        };
        run.clickhouse = queryable_p99.map(|p99| DeliveryReport {
            stored,
            sent,
            verdict: crate::verify::verdict(sent, stored),
            ok: exact,
            drained: true,
            drain_seconds: 0.5,
            accepted_to_inserted: latency(p99),
            end_to_end_rate: achieved,
            first_ingested_ms: 0,
            last_inserted_ms: 0,
        });
        run.backlog = Some(BacklogReport {
            samples: 60,
            growth_messages: growth / 100.0,
            growth_events: growth,
            ..BacklogReport::default()
        });
        run
    }

    #[test]
    fn a_probe_passes_only_when_every_criterion_holds() {
        let criteria = Criteria::default();
        let passed = judge(50_000.0, &run(49_900.0, Some(420.0), 10_000.0, true), criteria);
        assert!(passed.passed, "{passed:?}");
        for (report, why) in [
            (run(40_000.0, Some(420.0), 0.0, true), "did not keep up"),
            (run(49_900.0, Some(1_200.0), 0.0, true), "queryable p99"),
            (run(49_900.0, Some(420.0), 60_000.0, true), "backlog grew"),
            (run(49_900.0, Some(420.0), 0.0, false), "not exact"),
            (run(49_900.0, None, 0.0, true), "not measured"),
        ] {
            let probe = judge(50_000.0, &report, criteria);
            assert!(!probe.passed, "{why}: {probe:?}");
            assert!(
                probe.reasons.iter().any(|reason| reason.contains(why)),
                "{why}: {probe:?}"
            );
        }
    }
}
