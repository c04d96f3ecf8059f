//! Trimming: what is committed leaves the `EVENTS` stream.
//!
//! `EVENTS` keeps messages by limits (age, a byte cap, discard-new), so without trimming a
//! stream whose aggregators are all caught up would still fill to its cap and refuse every
//! publish. A background task purges the whole stream (unfiltered) through the lowest
//! `committed` position among the partitions that still hold messages
//! ([`TrimPlanner::whole_stream`]), and, under pressure only, per partition the messages of
//! `events.<p>` with a sequence <= its `committed` position: all of them are in ClickHouse by
//! definition. The cap then only ever counts an undelivered backlog, which it must refuse (never
//! drop). Per-partition purges wait for pressure because nats-server 2.9 loads every block of
//! the stream for a filtered purge, inside the requesting connection (4-6 s each in a 2 GB
//! stream, stalling the aggregator's other requests); an unfiltered one drops whole blocks.
//!
//! - **Bounded by `committed`.** `committed` only grows, and every message a crash could need
//!   again (a pending batch's ranges, the next read) has a sequence > `committed`.
//! - **Replay window.** `--stream-keep-committed` keeps committed history for a while: a
//!   partition is purged only up to the position it had at least that long ago (in-memory
//!   snapshots; after a restart nothing is old enough, so a restart only ever keeps more). The
//!   default, 10 minutes, is JetStream's duplicate window: a restarted nats-server rebuilds its
//!   duplicate map only from the messages it still stores, so a client retry inside the window
//!   of a request whose messages were already purged would be stored again (and counted twice
//!   in rollups).
//! - **Pressure beats history.** Above [`PRESSURE_RATIO`] of the stream's byte cap the window is
//!   ignored and everything committed goes: kept history must never make a caught-up pipeline
//!   refuse ingest. Only then does the duplicate-after-restart exposure above come back.
//! - **Never empty.** NATS 2.9 loses a stream's sequence numbers when a *filtered* purge leaves
//!   it empty and the server then crashes: it restarts with first = last = 0 and numbers new
//!   messages from 1 again (measured on 2.9.10; an unfiltered purge or a clean shutdown keep
//!   them). The ledger's positions would be ahead of the new messages and readers would skip
//!   them. So a purge stops below the newest sequence its round saw, which is at most the
//!   current newest: the message holding the highest sequence is never purged, and trimming
//!   never empties the stream. The cost is one message.
//! - **Other readers.** A durable consumer on `EVENTS` (the router's, or any other an operator
//!   adds) may still need committed messages: a purge stops at the lowest ack floor among them,
//!   so a router that lags or restarts still reads everything. Under pressure the floor is
//!   ignored like the window (ingest must never be refused for a slow side reader); such a
//!   reader then misses what was purged, and `chute_aggregator_trim_passed_consumer_total`
//!   counts it. An abandoned durable consumer stops holding the stream once JetStream deletes it
//!   (the router's has an inactivity threshold).
//! - **Same stream.** A round trims only when the ledger is bound to this very stream (its
//!   epoch, `chute_common::stream::stream_epoch`); a recreated stream is left alone.
//! - **Who trims.** Every aggregator may purge the whole stream (the same idempotent request).
//!   Per partition: the owner, and everyone for a partition nobody holds a live lease on, so
//!   that no partition is left untrimmed while ownership settles. A purge is idempotent, so
//!   overlapping trimmers cost one no-op request each.
//!
//! [`TrimPlanner`] is the policy as data (unit-tested, no I/O); [`run`] is the task.
//! See "Trimming" in `EXACTLY_ONCE.md`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use chute_common::error::NatsFailure;
use chute_common::stream::{events_subject, partition_of_subject, EVENTS_STREAM};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::ledger::{Ledger, LedgerState};
use crate::telemetry;

/// How often and how much to trim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrimSettings {
    /// Time between two trim rounds.
    pub interval: Duration,
    /// Committed history to keep: purge only positions committed at least this long ago.
    pub keep_committed: Duration,
}

impl Default for TrimSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            keep_committed: Duration::from_secs(600),
        }
    }
}

/// Above this share of the stream's byte cap, committed history is not kept.
pub const PRESSURE_RATIO: f64 = 0.5;

/// Whether a stream holding `bytes` of a `max_bytes` cap is under pressure (no cap: never).
pub fn under_pressure(bytes: u64, max_bytes: i64) -> bool {
    max_bytes > 0 && bytes as f64 >= PRESSURE_RATIO * max_bytes as f64
}

/// Remove the messages of `events.<partition>` with a stream sequence <= `through`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Purge {
    pub partition: u32,
    pub through: u64,
}

/// What one round should do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TrimPlan {
    pub purges: Vec<Purge>,
    /// Partitions whose committed position is beyond the stream's last sequence: the ledger
    /// describes another stream (recreated or replaced). Never trimmed on that position.
    pub ahead_of_stream: Vec<(u32, u64)>,
    /// Partitions purged past a durable consumer's ack floor (only under pressure).
    pub passed_consumer: Vec<u32>,
}

/// The trimming policy: committed positions seen over time, and how far this instance purged.
#[derive(Debug, Default)]
pub struct TrimPlanner {
    keep_committed: Duration,
    /// Per partition, oldest first: when a committed position was first seen. Positions are
    /// strictly increasing; only the newest snapshot older than `keep_committed` and the ones
    /// after it are kept.
    seen: BTreeMap<u32, VecDeque<(Instant, u64)>>,
    /// Per partition: the position this instance last purged through.
    purged: BTreeMap<u32, u64>,
    /// The stream is under pressure: purge up to the newest committed position seen.
    ignore_window: bool,
    /// The lowest ack floor among durable consumers on the stream (module docs: "Other readers").
    consumer_floor: Option<u64>,
    /// Where this instance last purged the whole stream through ([`TrimPlanner::whole_stream`]).
    purged_all: u64,
}

impl TrimPlanner {
    pub fn new(keep_committed: Duration) -> Self {
        Self {
            keep_committed,
            ..Self::default()
        }
    }

    /// Records the committed positions read from the ledger at `now`. Every partition is
    /// recorded, owned or not, so a partition taken over later already has its history.
    pub fn observe(&mut self, now: Instant, positions: impl IntoIterator<Item = (u32, u64)>) {
        for (partition, committed) in positions {
            let seen = self.seen.entry(partition).or_default();
            match seen.back() {
                Some((_, last)) if *last == committed => {}
                Some((_, last)) if *last > committed => {
                    // A position never goes back unless the ledger was reset: forget everything
                    // about this partition rather than trim on a position that no longer holds.
                    tracing::warn!(partition, committed, previous = *last, "committed position went back");
                    seen.clear();
                    seen.push_back((now, committed));
                    self.purged.remove(&partition);
                }
                _ => seen.push_back((now, committed)),
            }
            // Keep the newest snapshot that is old enough, drop the ones before it.
            while seen
                .get(1)
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.keep_committed)
            {
                seen.pop_front();
            }
        }
    }

    /// Under pressure the window is ignored (see the module docs).
    pub fn set_pressure(&mut self, under_pressure: bool) {
        self.ignore_window = under_pressure;
    }

    /// The lowest stream sequence acknowledged by every durable consumer on the stream (`None`:
    /// there is none). Purges stop there unless the stream is under pressure.
    pub fn set_consumer_floor(&mut self, floor: Option<u64>) {
        self.consumer_floor = floor;
    }

    /// Where a purge of a partition committed through `committed` stops, and whether a durable
    /// consumer's floor was passed to get there (only under pressure).
    fn through(&self, committed: u64, last_sequence: u64) -> (u64, bool) {
        // Never the stream's newest message (module docs: "Never empty").
        let through = committed.min(last_sequence.saturating_sub(1));
        match self.consumer_floor {
            Some(floor) if floor < through && !self.ignore_window => (floor, false),
            Some(floor) => (through, floor < through),
            None => (through, false),
        }
    }

    /// The newest committed position of `partition` seen at least `keep_committed` before `now`
    /// (the newest seen at all while under pressure).
    pub fn purgeable(&self, partition: u32, now: Instant) -> Option<u64> {
        let seen = self.seen.get(&partition)?;
        if self.ignore_window {
            return seen.back().map(|(_, committed)| *committed);
        }
        seen.iter()
            .rev()
            .find(|(at, _)| now.saturating_duration_since(*at) >= self.keep_committed)
            .map(|(_, committed)| *committed)
    }

    /// The purges due at `now` among `candidates` (the partitions this instance trims), given the
    /// stream's last sequence. Only partitions that moved since this instance's last purge.
    pub fn plan(&self, now: Instant, candidates: &[u32], last_sequence: u64) -> TrimPlan {
        let mut plan = TrimPlan::default();
        for partition in candidates {
            let Some(committed) = self.purgeable(*partition, now) else {
                continue;
            };
            if committed > last_sequence {
                plan.ahead_of_stream.push((*partition, committed));
                continue;
            }
            let (through, passes_consumer) = self.through(committed, last_sequence);
            if through == 0 || self.purged.get(partition).is_some_and(|done| *done >= through) {
                continue;
            }
            if passes_consumer {
                plan.passed_consumer.push(*partition);
            }
            plan.purges.push(Purge {
                partition: *partition,
                through,
            });
        }
        plan
    }

    /// The unfiltered purge due at `now`: through the lowest position that every partition
    /// still holding messages (`occupied`, from the stream's per-subject counts) may be purged
    /// to, never past the stream's newest message nor a durable consumer's ack floor (not even
    /// under pressure: passing it is left to the per-partition purges). `None` when a partition
    /// with messages has no purgeable position yet, or is ahead of the stream, or when nothing
    /// moved since the last one. A partition with no message at all holds nothing back: a
    /// message published to it later gets a sequence above the stream's last one, which this
    /// never reaches.
    pub fn whole_stream(&self, now: Instant, occupied: &[u32], last_sequence: u64) -> Option<u64> {
        if occupied.is_empty() {
            return None;
        }
        let mut through = last_sequence.saturating_sub(1);
        if let Some(floor) = self.consumer_floor {
            through = through.min(floor);
        }
        for partition in occupied {
            let committed = self.purgeable(*partition, now)?;
            if committed > last_sequence {
                return None;
            }
            through = through.min(committed);
        }
        (through > self.purged_all).then_some(through)
    }

    /// Records an unfiltered purge through `through` that JetStream confirmed: no partition
    /// holds a message at or below it any more.
    pub fn done_whole_stream(&mut self, through: u64, partitions: impl IntoIterator<Item = u32>) {
        self.purged_all = self.purged_all.max(through);
        for partition in partitions {
            let done = self.purged.entry(partition).or_default();
            *done = (*done).max(through);
        }
    }

    /// Records a purge that JetStream confirmed.
    pub fn done(&mut self, purge: Purge) {
        let done = self.purged.entry(purge.partition).or_default();
        *done = (*done).max(purge.through);
    }
}

/// The partitions `me` trims: the ones it holds a live lease on, and those nobody does (between
/// an owner's death and a takeover, or with no aggregator owning them at all).
pub fn trim_candidates(state: &LedgerState, me: &str, now_ms: u64) -> Vec<u32> {
    state
        .partitions
        .iter()
        .filter(|(_, partition)| match &partition.owner {
            Some(owner) if partition.lease_until_ms > now_ms => owner == me,
            _ => true,
        })
        .map(|(partition, _)| *partition)
        .collect()
}

/// Trims `EVENTS` every `settings.interval` until `shutdown`, and keeps the stream size gauges
/// current. Failures are logged and retried next round; they never stop the aggregator.
pub async fn run(
    js: jetstream::Context,
    ledger: Ledger,
    me: String,
    settings: TrimSettings,
    shutdown: CancellationToken,
) {
    let mut planner = TrimPlanner::new(settings.keep_committed);
    let mut stream = None;
    while !shutdown.is_cancelled() {
        if stream.is_none() {
            stream = js.get_stream(EVENTS_STREAM).await.ok();
        }
        if let Some(stream) = &stream {
            if let Err(err) = trim_round(stream, &ledger, &me, &mut planner).await {
                telemetry::trim_failed(&err);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// The lowest ack floor (stream sequence) among the stream's durable consumers, `None` when it
/// has none. The aggregator's own readers are ephemeral and never count.
async fn durable_consumer_floor(stream: &Stream) -> Result<Option<u64>> {
    use futures::TryStreamExt;
    let consumers: Vec<_> = stream
        .consumers()
        .try_collect()
        .await
        .map_err(|err| Error::nats(format!("{EVENTS_STREAM} consumers"), err))?;
    Ok(consumers
        .iter()
        .filter(|info| info.config.durable_name.is_some())
        .map(|info| info.ack_floor.stream_sequence)
        .min())
}

/// One round: stream size, ledger positions, purges.
async fn trim_round(stream: &Stream, ledger: &Ledger, me: &str, planner: &mut TrimPlanner) -> Result<()> {
    // The stream's state and its per-subject message counts, from one request.
    let info_error = |err| Error::nats(format!("{EVENTS_STREAM} info"), err);
    let mut with_subjects = stream.info_with_subjects(">").await.map_err(info_error)?;
    let info = with_subjects.info.clone();
    let mut occupied = Vec::new();
    // A subject that is not `events.<partition>` has no ledger position: no whole-stream purge.
    let mut foreign_subject = false;
    while let Some((subject, count)) = futures::TryStreamExt::try_next(&mut with_subjects)
        .await
        .map_err(info_error)?
    {
        if count == 0 {
            continue;
        }
        match partition_of_subject(&subject) {
            Some(partition) => occupied.push(partition),
            None => foreign_subject = true,
        }
    }
    telemetry::stream_size(info.state.bytes, info.state.messages, info.config.max_bytes);
    let (state, _) = ledger.read().await?;
    let stream_epoch = chute_common::stream::stream_epoch(&info);
    if state.stream_epoch != stream_epoch {
        // The stream was recreated (or the ledger replaced) since this aggregator bound them:
        // these positions say nothing about the messages in this stream.
        telemetry::trim_other_stream(state.stream_epoch, stream_epoch);
        return Ok(());
    }
    let now = Instant::now();
    let pressure = under_pressure(info.state.bytes, info.config.max_bytes);
    if pressure {
        telemetry::trim_under_pressure(info.state.bytes, info.config.max_bytes);
    }
    planner.set_pressure(pressure);
    planner.set_consumer_floor(durable_consumer_floor(stream).await?);
    planner.observe(
        now,
        state
            .partitions
            .iter()
            .map(|(partition, position)| (*partition, position.committed)),
    );
    // JetStream reports purged messages, not bytes: bytes are estimated at the mean stored size.
    let mean_message_bytes = info.state.bytes / info.state.messages.max(1);
    // First the whole stream, unfiltered, through what every partition allows: nats-server 2.9
    // drops whole blocks for it. A filtered purge instead loads every block of the stream that
    // holds the subject, whatever the range (`filestore.go` PurgeEx): after a backlog each one
    // took 4-6 s inside the aggregator's connection, holding its pulls and ledger writes, and
    // inserts stopped for over 30 s. So per-partition purges run only under pressure, when a
    // partition that lags (or a durable consumer's floor) holds the whole-stream purge back and
    // ingest would otherwise be refused.
    let whole = (!foreign_subject)
        .then(|| planner.whole_stream(now, &occupied, info.state.last_sequence))
        .flatten();
    let mut trimmed = 0;
    let mut first_error = None;
    if let Some(through) = whole {
        match stream.purge().sequence(through + 1).await {
            Ok(response) => {
                planner.done_whole_stream(through, state.partitions.keys().copied());
                trimmed += response.purged;
                telemetry::stream_trimmed(None, through, response.purged, response.purged * mean_message_bytes);
            }
            Err(err) => {
                first_error = Some(Error::nats(format!("purge {EVENTS_STREAM} through {through}"), err));
            }
        }
    }
    let now_ms = (chute_common::validate::unix_nanos_now() / 1_000_000) as u64;
    let plan = if pressure {
        planner.plan(now, &trim_candidates(&state, me, now_ms), info.state.last_sequence)
    } else {
        TrimPlan::default()
    };
    for partition in &plan.passed_consumer {
        telemetry::trim_passed_consumer(*partition);
    }
    for (partition, committed) in &plan.ahead_of_stream {
        telemetry::committed_ahead_of_stream(*partition, *committed, info.state.last_sequence);
    }
    for purge in plan.purges {
        // `sequence` is exclusive: everything on the subject below `through + 1` goes.
        let result = stream
            .purge()
            .filter(events_subject(purge.partition))
            .sequence(purge.through + 1)
            .await;
        match result {
            Ok(response) => {
                planner.done(purge);
                trimmed += response.purged;
                telemetry::stream_trimmed(
                    Some(purge.partition),
                    purge.through,
                    response.purged,
                    response.purged * mean_message_bytes,
                );
            }
            Err(err) => {
                let what = format!("purge {} through {}", events_subject(purge.partition), purge.through);
                first_error.get_or_insert(Error::nats(what, err));
            }
        }
    }
    if trimmed > 0 {
        if let Ok(info) = stream.get_info().await {
            telemetry::stream_size(info.state.bytes, info.state.messages, info.config.max_bytes);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::PartitionState;

    const SECOND: Duration = Duration::from_secs(1);

    fn purge(partition: u32, through: u64) -> Purge {
        Purge { partition, through }
    }

    /// A planner with `keep` that saw `positions` at `start`.
    fn observed<const N: usize>(keep: Duration, start: Instant, positions: [(u32, u64); N]) -> TrimPlanner {
        let mut planner = TrimPlanner::new(keep);
        planner.observe(start, positions);
        planner
    }

    #[test]
    fn without_a_window_everything_committed_goes_once() {
        let start = Instant::now();
        let mut planner = observed(Duration::ZERO, start, [(0, 10), (1, 0), (2, 7)]);
        let plan = planner.plan(start, &[0, 1, 2], 100);
        assert_eq!(plan.purges, vec![purge(0, 10), purge(2, 7)], "nothing committed on 1");
        for purge in plan.purges {
            planner.done(purge);
        }
        planner.observe(start + SECOND, [(0, 10), (1, 0), (2, 9)]);
        assert_eq!(
            planner.plan(start + SECOND, &[0, 1, 2], 100).purges,
            vec![purge(2, 9)],
            "only partitions that moved since the last purge"
        );
    }

    #[test]
    fn a_durable_consumer_holds_the_purge_except_under_pressure() {
        let start = Instant::now();
        let mut planner = observed(Duration::ZERO, start, [(0, 10), (1, 30)]);
        planner.set_consumer_floor(Some(12));
        let plan = planner.plan(start, &[0, 1], 100);
        assert_eq!(
            plan.purges,
            vec![purge(0, 10), purge(1, 12)],
            "stops at the reader's ack floor"
        );
        assert!(plan.passed_consumer.is_empty());
        planner.done(purge(1, 12));
        assert!(
            planner.plan(start, &[1], 100).purges.is_empty(),
            "nothing more until the reader acks"
        );
        planner.set_consumer_floor(Some(25));
        assert_eq!(planner.plan(start, &[1], 100).purges, vec![purge(1, 25)]);
        planner.set_pressure(true);
        let plan = planner.plan(start, &[1], 100);
        assert_eq!(plan.purges, vec![purge(1, 30)], "pressure beats a slow reader");
        assert_eq!(plan.passed_consumer, vec![1], "and says so");
    }

    #[test]
    fn the_whole_stream_goes_through_what_every_partition_with_messages_allows() {
        let start = Instant::now();
        let mut planner = observed(Duration::ZERO, start, [(0, 500), (1, 300), (2, 40)]);
        // Partition 2 has no message left: it holds nothing back.
        assert_eq!(planner.whole_stream(start, &[0, 1], 1_000), Some(300));
        planner.done_whole_stream(300, [0, 1, 2]);
        assert_eq!(planner.whole_stream(start, &[0, 1], 1_000), None, "nothing moved");
        assert_eq!(
            planner.plan(start, &[0, 1, 2], 1_000).purges,
            vec![purge(0, 500)],
            "per-partition purges start where the whole-stream one stopped"
        );
        // A partition with messages but no position yet holds everything back.
        assert_eq!(planner.whole_stream(start, &[0, 1, 7], 1_000), None);
        // Never the newest message, never past a durable consumer's floor, even under pressure.
        planner.observe(start + SECOND, [(0, 2_000), (1, 2_000)]);
        assert_eq!(planner.whole_stream(start + SECOND, &[0, 1], 2_000), Some(1_999));
        planner.set_pressure(true);
        planner.set_consumer_floor(Some(900));
        assert_eq!(planner.whole_stream(start + SECOND, &[0, 1], 2_000), Some(900));
        // Nothing occupied: nothing to purge.
        assert_eq!(planner.whole_stream(start + SECOND, &[], 2_000), None);
    }

    #[test]
    fn the_whole_stream_waits_for_every_partitions_window_and_a_ledger_of_this_stream() {
        let start = Instant::now();
        let keep = Duration::from_secs(600);
        let mut planner = observed(keep, start, [(0, 100), (1, 100)]);
        assert_eq!(planner.whole_stream(start, &[0, 1], 1_000), None, "not old enough");
        planner.observe(start + Duration::from_secs(300), [(0, 400), (1, 200)]);
        assert_eq!(planner.whole_stream(start + keep, &[0, 1], 1_000), Some(100));
        assert_eq!(
            planner.whole_stream(start + keep, &[0, 1], 50),
            None,
            "a position beyond the stream's last sequence: the ledger is another stream's"
        );
    }

    #[test]
    fn never_beyond_the_committed_position_nor_the_stream() {
        let start = Instant::now();
        let mut planner = observed(Duration::ZERO, start, [(0, 10), (1, 50)]);
        let plan = planner.plan(start, &[0, 1], 20);
        assert_eq!(plan.purges, vec![purge(0, 10)]);
        assert_eq!(
            plan.ahead_of_stream,
            vec![(1, 50)],
            "a ledger of another stream is not trimmed on"
        );
        planner.observe(start + SECOND, [(0, 4)]);
        assert_eq!(
            planner.plan(start + SECOND, &[0], 20).purges,
            vec![purge(0, 4)],
            "a position that went back (ledger reset) replaces the history, it never trims past it"
        );
    }

    #[test]
    fn the_newest_message_of_the_stream_always_stays() {
        let start = Instant::now();
        let mut planner = TrimPlanner::new(Duration::ZERO);
        // Partition 0 holds the stream's newest message (20), committed.
        planner.observe(start, [(0, 20), (1, 19)]);
        let plan = planner.plan(start, &[0, 1], 20);
        assert_eq!(plan.purges, vec![purge(0, 19), purge(1, 19)]);
        for purge in plan.purges {
            planner.done(purge);
        }
        assert!(planner.plan(start, &[0, 1], 20).purges.is_empty(), "nothing new");
        assert_eq!(
            planner.plan(start, &[0, 1], 21).purges,
            vec![purge(0, 20)],
            "once a newer message exists, 20 may go"
        );
        planner.observe(start, [(2, 1)]);
        assert!(
            planner.plan(start, &[2], 1).purges.is_empty(),
            "a one-message stream stays"
        );
    }

    #[test]
    fn the_window_trims_only_positions_committed_long_enough_ago() {
        let start = Instant::now();
        let keep = Duration::from_secs(60);
        let mut planner = observed(keep, start, [(0, 10)]);
        planner.observe(start + 30 * SECOND, [(0, 20)]);
        assert!(
            planner.plan(start + 59 * SECOND, &[0], 100).purges.is_empty(),
            "nothing seen a minute ago yet: a (re)started trimmer keeps everything"
        );
        planner.observe(start + 60 * SECOND, [(0, 30)]);
        assert_eq!(planner.plan(start + 60 * SECOND, &[0], 100).purges, vec![purge(0, 10)]);
        planner.done(purge(0, 10));
        assert!(planner.plan(start + 89 * SECOND, &[0], 100).purges.is_empty());
        assert_eq!(planner.plan(start + 90 * SECOND, &[0], 100).purges, vec![purge(0, 20)]);
        planner.observe(start + 200 * SECOND, [(0, 30)]);
        assert_eq!(
            planner.seen[&0].len(),
            1,
            "snapshots older than the newest old-enough one are dropped"
        );
        assert_eq!(planner.plan(start + 200 * SECOND, &[0], 100).purges, vec![purge(0, 30)]);
    }

    #[test]
    fn history_is_kept_for_partitions_owned_elsewhere() {
        let start = Instant::now();
        let planner = observed(Duration::from_secs(10), start, [(0, 10), (1, 10)]);
        assert_eq!(
            planner.plan(start + 10 * SECOND, &[0], 100).purges,
            vec![purge(0, 10)],
            "1 is someone else's"
        );
        // Partition 1 is taken over: its history is already old enough.
        assert_eq!(planner.plan(start + 10 * SECOND, &[1], 100).purges, vec![purge(1, 10)]);
    }

    #[test]
    fn owners_trim_their_partitions_and_everyone_trims_the_ownerless() {
        let lease = |owner: Option<&str>, until: u64| PartitionState {
            owner: owner.map(str::to_owned),
            lease_until_ms: until,
            committed: 5,
            ..Default::default()
        };
        let mut state = LedgerState::default();
        state.partitions.insert(0, lease(Some("a"), 2_000));
        state.partitions.insert(1, lease(Some("b"), 2_000));
        state.partitions.insert(2, lease(Some("b"), 500)); // b's lease on 2 expired
        state.partitions.insert(3, lease(None, 0));
        assert_eq!(trim_candidates(&state, "a", 1_000), vec![0, 2, 3]);
        assert_eq!(trim_candidates(&state, "b", 1_000), vec![1, 2, 3]);
        assert_eq!(trim_candidates(&state, "c", 1_000), vec![2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn under_pressure_the_window_is_ignored() {
        let start = Instant::now();
        let mut planner = observed(Duration::from_secs(600), start, [(0, 10)]);
        planner.observe(start + SECOND, [(0, 20)]);
        assert!(
            planner.plan(start + SECOND, &[0], 100).purges.is_empty(),
            "inside the window"
        );
        planner.set_pressure(true);
        assert_eq!(planner.plan(start + SECOND, &[0], 100).purges, vec![purge(0, 20)]);
        assert!(under_pressure(50, 100) && !under_pressure(49, 100) && !under_pressure(99, -1));
    }
}
