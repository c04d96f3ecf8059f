//! CPU per event: user + system CPU time of each process of the pipeline, from
//! `/proc/<pid>/stat`, over a run's load window, divided by the events acknowledged in it.
//!
//! The processes come from `--pid NAME=PID` (`make bench` passes every service it started); the
//! load generator always measures itself as `loadtest`. `/proc/<pid>/stat` counts every thread
//! of the process, so one reading per process is enough. [`cpu_report`] is the pure part: two
//! readings of clock ticks -> seconds, µs per event, cores busy, and Chute's own path
//! ([`CHUTE_PATH`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The processes that make up Chute's own path (ClickHouse, the query API and the load
/// generator are not counted in it).
pub const CHUTE_PATH: [&str; 3] = ["ingestor", "nats-server", "aggregator"];

/// The name under which the load generator reports itself.
pub const SELF_NAME: &str = "loadtest";

/// A process to measure: `--pid NAME=PID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub name: String,
    pub pid: u32,
}

/// clap value parser of `NAME=PID`.
pub fn parse_process(text: &str) -> std::result::Result<Process, String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got {text:?}"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("empty process name in {text:?}"));
    }
    let pid = pid.trim().parse().map_err(|_| format!("not a pid in {text:?}"))?;
    Ok(Process {
        name: name.to_owned(),
        pid,
    })
}

/// `utime + stime` (clock ticks) from the text of `/proc/<pid>/stat`. The command name (field 2)
/// is in parentheses and may itself contain spaces and parentheses, so the fields are counted
/// from the last `)`: the text after it starts at field 3 (state); utime is field 14, stime 15.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// One reading: process name -> CPU clock ticks so far (processes that could not be read are
/// absent).
pub type Reading = BTreeMap<String, u64>;

/// CPU of one process over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessCpu {
    pub cpu_seconds: f64,
    /// CPU-µs per event = CPU-seconds per million events.
    pub us_per_event: f64,
    /// Average cores busy over the window.
    pub cores: f64,
}

/// CPU per event of a run's load window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    /// Events acknowledged in the window.
    pub events: u64,
    pub window_seconds: f64,
    /// `getconf CLK_TCK`: the resolution of the readings.
    pub clock_ticks_per_second: u64,
    pub processes: BTreeMap<String, ProcessCpu>,
    /// Process -> CPU-µs per event (the same figures as `processes`, flat).
    pub cpu_us_per_event: BTreeMap<String, f64>,
    /// ingestor + nats-server + aggregator; absent unless all three were measured.
    pub chute_path_cpu_us_per_event: Option<f64>,
    /// 1e6 / `chute_path_cpu_us_per_event`: events one core would carry through Chute's path.
    pub chute_path_events_per_core_second: Option<f64>,
    /// Processes asked for but not readable at both ends of the window (exited, wrong pid).
    pub missing: Vec<String>,
}

/// The per-event figures from a reading before and after a window in which `events` were
/// acknowledged (pure). `wanted` are the names asked for; those absent from either reading are
/// reported as `missing`.
pub fn cpu_report(
    wanted: &[String],
    before: &Reading,
    after: &Reading,
    events: u64,
    window_seconds: f64,
    clock_ticks_per_second: u64,
) -> CpuReport {
    let ticks_per_second = clock_ticks_per_second.max(1) as f64;
    let mut processes = BTreeMap::new();
    let mut missing = Vec::new();
    for name in wanted {
        match (before.get(name), after.get(name)) {
            (Some(&start), Some(&end)) => {
                let cpu_seconds = end.saturating_sub(start) as f64 / ticks_per_second;
                processes.insert(
                    name.clone(),
                    ProcessCpu {
                        cpu_seconds,
                        us_per_event: cpu_seconds * 1e6 / events.max(1) as f64,
                        cores: cpu_seconds / window_seconds.max(1e-9),
                    },
                );
            }
            _ => missing.push(name.clone()),
        }
    }
    let cpu_us_per_event: BTreeMap<String, f64> = processes
        .iter()
        .map(|(name, cpu)| (name.clone(), cpu.us_per_event))
        .collect();
    let chute_path_cpu_us_per_event = (events > 0)
        .then(|| {
            CHUTE_PATH
                .iter()
                .map(|name| cpu_us_per_event.get(*name).copied())
                .sum::<Option<f64>>()
        })
        .flatten();
    CpuReport {
        events,
        window_seconds,
        clock_ticks_per_second,
        chute_path_events_per_core_second: chute_path_cpu_us_per_event.filter(|us| *us > 0.0).map(|us| 1e6 / us),
        processes,
        cpu_us_per_event,
        chute_path_cpu_us_per_event,
        missing,
    }
}

/// The processes to read: the given ones plus this process as [`SELF_NAME`] (unless given).
pub fn with_self(processes: &[Process]) -> Vec<(String, Option<u32>)> {
    let mut all: Vec<(String, Option<u32>)> = processes
        .iter()
        .map(|process| (process.name.clone(), Some(process.pid)))
        .collect();
    if !all.iter().any(|(name, _)| name == SELF_NAME) {
        all.push((SELF_NAME.to_owned(), None));
    }
    all
}

/// Reads `/proc/<pid>/stat` (`None`: `/proc/self/stat`) of each process.
pub fn read(processes: &[(String, Option<u32>)]) -> Reading {
    processes
        .iter()
        .filter_map(|(name, pid)| {
            let path = match pid {
                Some(pid) => format!("/proc/{pid}/stat"),
                None => "/proc/self/stat".to_owned(),
            };
            let ticks = parse_stat_ticks(&std::fs::read_to_string(path).ok()?)?;
            Some((name.clone(), ticks))
        })
        .collect()
}

/// `getconf CLK_TCK` (100 on every Linux this runs on; 100 when `getconf` fails).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/proc/<pid>/stat` line with the given command name, utime and stime (other fields as
    /// a real nats-server line has them).
    fn stat_line(pid: u32, comm: &str, utime: u64, stime: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 52083 0 0 0 {utime} {stime} 7 3 20 0 12 0 \
             1234567 1577058304 60000 18446744073709551615 1 1 0 0 0 0 0 0 2143420159 0 0 0 17 1 0 0 0 0 0\n"
        )
    }

    #[test]
    fn ticks_are_utime_plus_stime_whatever_the_command_name() {
        assert_eq!(parse_stat_ticks(&stat_line(42, "nats-server", 1500, 250)), Some(1750));
        // Spaces and parentheses in the name do not shift the fields.
        assert_eq!(parse_stat_ticks(&stat_line(7, "tokio runtime) 1 2 3", 10, 5)), Some(15));
        assert_eq!(parse_stat_ticks(&stat_line(7, "a b (c)", 0, 9)), Some(9));
        // The children's times (fields 16, 17: 7 and 3 above) are not counted.
        assert_eq!(parse_stat_ticks(&stat_line(1, "x", 0, 0)), Some(0));
        assert_eq!(parse_stat_ticks("42 (truncated) S 1 2"), None);
        assert_eq!(parse_stat_ticks("no parenthesis at all"), None);
    }

    #[test]
    fn own_stat_is_readable() {
        let reading = read(&with_self(&[]));
        assert!(reading.contains_key(SELF_NAME), "{reading:?}");
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn pid_flags_parse() {
        assert_eq!(
            parse_process("nats-server=1234"),
            Ok(Process {
                name: "nats-server".into(),
                pid: 1234
            })
        );
        assert!(parse_process("ingestor").is_err());
        assert!(parse_process("=12").is_err());
        assert!(parse_process("ingestor=abc").is_err());
        let all = with_self(&[parse_process("ingestor=5").unwrap()]);
        assert_eq!(
            all,
            vec![("ingestor".to_owned(), Some(5)), (SELF_NAME.to_owned(), None)]
        );
        assert_eq!(with_self(&[parse_process("loadtest=9").unwrap()]).len(), 1);
    }

    fn reading(entries: &[(&str, &str, u64, u64)]) -> Reading {
        entries
            .iter()
            .enumerate()
            .map(|(pid, (name, comm, utime, stime))| {
                let line = stat_line(pid as u32 + 100, comm, *utime, *stime);
                ((*name).to_owned(), parse_stat_ticks(&line).unwrap())
            })
            .collect()
    }

    #[test]
    fn per_event_figures_from_two_readings() {
        let wanted: Vec<String> = ["ingestor", "nats-server", "aggregator", "clickhouse", "loadtest"]
            .map(String::from)
            .to_vec();
        let before = reading(&[
            ("ingestor", "ingestor", 1000, 200),
            ("nats-server", "nats-server", 5000, 1000),
            ("aggregator", "tokio-runtime-w", 300, 100),
            ("clickhouse", "python3 chserver.py", 9000, 1000),
            ("loadtest", "loadtest", 0, 0),
        ]);
        // 10 s at 100 ticks/s and 500,000 events: 1 tick = 10 ms = 0.02 µs per event.
        let after = reading(&[
            ("ingestor", "ingestor", 1400, 300),               // 500 ticks = 5 s
            ("nats-server", "nats-server", 5200, 1050),        // 250 ticks = 2.5 s
            ("aggregator", "tokio-runtime-w", 400, 125),       // 125 ticks = 1.25 s
            ("clickhouse", "python3 chserver.py", 9800, 1200), // 1000 ticks = 10 s
            ("loadtest", "loadtest", 150, 50),                 // 200 ticks = 2 s
        ]);
        let report = cpu_report(&wanted, &before, &after, 500_000, 10.0, 100);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(report.cpu_us_per_event["ingestor"], 10.0), "{report:?}");
        assert!(close(report.cpu_us_per_event["nats-server"], 5.0));
        assert!(close(report.cpu_us_per_event["aggregator"], 2.5));
        assert!(close(report.cpu_us_per_event["clickhouse"], 20.0));
        assert!(close(report.cpu_us_per_event["loadtest"], 4.0));
        assert!(close(report.processes["clickhouse"].cores, 1.0));
        assert!(close(report.processes["ingestor"].cpu_seconds, 5.0));
        assert!(close(report.chute_path_cpu_us_per_event.unwrap(), 17.5));
        assert!(close(report.chute_path_events_per_core_second.unwrap(), 1e6 / 17.5));
        assert!(report.missing.is_empty());
    }

    #[test]
    fn a_process_missing_at_either_end_is_reported_and_leaves_the_path_unmeasured() {
        let wanted: Vec<String> = ["ingestor", "nats-server", "aggregator"].map(String::from).to_vec();
        let before = reading(&[
            ("ingestor", "i", 0, 0),
            ("nats-server", "n", 0, 0),
            ("aggregator", "a", 0, 0),
        ]);
        let after = reading(&[("ingestor", "i", 100, 0), ("nats-server", "n", 100, 0)]);
        let report = cpu_report(&wanted, &before, &after, 1000, 1.0, 100);
        assert_eq!(report.missing, vec!["aggregator".to_owned()]);
        assert_eq!(report.chute_path_cpu_us_per_event, None);
        assert_eq!(report.chute_path_events_per_core_second, None);
        assert_eq!(report.cpu_us_per_event.len(), 2);
        // No events: no per-event path figure (and no division by zero).
        let report = cpu_report(&wanted, &before, &before, 0, 1.0, 100);
        assert_eq!(report.chute_path_cpu_us_per_event, None);
        // A counter that went backwards (pid reused) counts as zero, not a huge number.
        let report = cpu_report(&wanted, &after, &before, 1000, 1.0, 100);
        assert_eq!(report.cpu_us_per_event["ingestor"], 0.0);
    }
}
