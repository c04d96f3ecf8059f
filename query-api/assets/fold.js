// Folding live events into rollup-sized buckets, and reconciling them with the rollups.
//
// The page shows per-minute series (counts, sums, quantiles) that ClickHouse also holds as
// rollups. It loads them from /v1/timeseries, then adds every event of /v1/stream to the bucket
// of its event time. The live numbers alone can drift from what ClickHouse holds: the history
// request and the stream overlap by the aggregator's lag, the stream may skip events (`lagged`)
// and late events land in buckets already drawn. So each bucket keeps
//
//   shown = base + live
//
// where `base` is the last rollup value applied and `live` is what the stream added since the
// request that produced `base` was *sent* (events folded while a request is in flight stay in
// `live` after its answer arrives). A bucket is reconciled, i.e. its rollup requested again, once
// it has closed and the aggregator has had `settleMs` to insert its last events; again whenever a
// late event lands in it afterwards; and at once for every bucket after the stream reported
// missed events (after `settleMs` too, so the missed events are stored by then). After a closed
// bucket is reconciled and nothing else arrives, `shown` equals the rollup: the numbers on screen
// are the numbers ClickHouse holds. `settleMs` (3 s) is a bet on the aggregator's lag (p99 about
// half a second here); in case it lost, every bucket is confirmed once more `confirmMs` (30 s)
// after it closed.
//
// Pure data and arithmetic: no DOM, no fetch, the clock is an argument (unit tests:
// query-api/tests/js/fold.test.mjs).

export const MINUTE_MS = 60_000;

/** Start (unix ms) of the bucket of `timeMs`. */
export function bucketStart(timeMs, stepMs = MINUTE_MS) {
  return Math.floor(timeMs / stepMs) * stepMs;
}

/** Event time of a live event (unix ms): its `time`, else when it was ingested. */
export function eventTimeMs(event) {
  if (typeof event.time === "string") {
    const parsed = Date.parse(event.time);
    if (Number.isFinite(parsed)) return parsed;
  }
  return event.ingested_at_ms;
}

/**
 * Contiguous ranges `[from, to)` covering the given bucket starts, so one request reconciles
 * several neighbouring buckets.
 */
export function ranges(starts, stepMs = MINUTE_MS) {
  const sorted = [...starts].sort((a, b) => a - b);
  const out = [];
  for (const start of sorted) {
    const last = out[out.length - 1];
    if (last && last.to === start) last.to = start + stepMs;
    else out.push({ from: start, to: start + stepMs });
  }
  return out;
}

/**
 * Reconciliation bookkeeping shared by every bucketed series: which buckets exist, which are
 * in flight, which have been reconciled after they closed and which got late events since.
 */
class ReconciledBuckets {
  constructor({ stepMs = MINUTE_MS, settleMs = 3_000, confirmMs = 30_000, keepBuckets = 30 } = {}) {
    this.stepMs = stepMs;
    this.settleMs = settleMs;
    this.confirmMs = confirmMs;
    this.keepBuckets = keepBuckets;
    /** start -> bucket state */
    this.buckets = new Map();
    this.nextRequest = 1;
  }

  bucket(start) {
    let bucket = this.buckets.get(start);
    if (!bucket) {
      bucket = this.emptyBucket();
      bucket.inflight = null; // {id, mark} of the request in flight
      bucket.settled = false; // a rollup requested after close+settle was applied
      bucket.confirmed = false; // a rollup requested after close+confirm was applied
      bucket.dirty = false; // live data arrived after that rollup
      bucket.forced = false; // reconcile now whatever the clock says (missed events)
      bucket.lastTouch = -Infinity; // when live data last arrived (unix ms)
      this.buckets.set(start, bucket);
    }
    return bucket;
  }

  /** Whether the bucket starting at `start` is closed and settled at `nowMs`. */
  closed(start, nowMs) {
    return start + this.stepMs + this.settleMs <= nowMs;
  }

  /** Folds a live contribution into the bucket of `timeMs`, arriving at `nowMs`. */
  touch(timeMs, nowMs) {
    const bucket = this.bucket(bucketStart(timeMs, this.stepMs));
    if (bucket.settled) bucket.dirty = true;
    bucket.lastTouch = nowMs;
    return bucket;
  }

  /** Every bucket must be reconciled again, `settleMs` after `nowMs` (the stream skipped events). */
  forceAll(nowMs) {
    for (const bucket of this.buckets.values()) {
      bucket.forced = true;
      bucket.lastTouch = Math.max(bucket.lastTouch, nowMs);
    }
  }

  /**
   * Bucket starts to request now, `settleMs` after live data last arrived in them: closed but
   * not yet reconciled since, or with late events, or forced, or due for the confirmation; never
   * one whose request is in flight. Oldest first. (Waiting `settleMs` after a late event also outlasts the query API's
   * fresh-answer cache, 1 s by default, so the answer is computed after the event was stored.)
   */
  due(nowMs) {
    const starts = [];
    for (const [start, bucket] of this.buckets) {
      if (bucket.inflight) continue;
      const closed = this.closed(start, nowMs);
      const quiet = nowMs >= bucket.lastTouch + this.settleMs;
      const confirm = bucket.settled && !bucket.confirmed && nowMs >= start + this.stepMs + this.confirmMs;
      if (quiet && (bucket.forced || (closed && (!bucket.settled || bucket.dirty)) || confirm)) starts.push(start);
    }
    return starts.sort((a, b) => a - b);
  }

  /**
   * Marks `starts` as requested at `nowMs` (creating them when new: a history load); returns the
   * request id to pass to `apply`/`abandon`.
   */
  begin(starts, nowMs) {
    const id = this.nextRequest++;
    for (const start of starts) {
      const bucket = this.bucket(start);
      bucket.inflight = {
        id,
        mark: this.markOf(bucket),
        closedAtSend: this.closed(start, nowMs),
        confirmsAtSend: nowMs >= start + this.stepMs + this.confirmMs,
      };
      bucket.forced = false;
    }
    return id;
  }

  /** The request failed: its buckets become due again on the next tick. */
  abandon(id) {
    for (const bucket of this.buckets.values()) {
      if (bucket.inflight && bucket.inflight.id === id) {
        bucket.inflight = null;
        bucket.forced = true;
      }
    }
  }

  /** Applies the rollup answer `values` (start -> value) of request `id`. */
  apply(id, values) {
    for (const [start, value] of values) {
      const bucket = this.buckets.get(start);
      if (!bucket || !bucket.inflight || bucket.inflight.id !== id) continue;
      this.rebase(bucket, value, bucket.inflight.mark);
      if (bucket.inflight.closedAtSend) {
        bucket.settled = true;
        if (bucket.inflight.confirmsAtSend) bucket.confirmed = true;
        // Live data folded after the request was sent may or may not be in the answer.
        bucket.dirty = this.hasLive(bucket);
      }
      bucket.inflight = null;
    }
    this.trim();
  }

  /** Drops buckets older than the kept window. */
  trim() {
    if (this.buckets.size <= this.keepBuckets) return;
    const starts = [...this.buckets.keys()].sort((a, b) => a - b);
    for (const start of starts.slice(0, starts.length - this.keepBuckets)) this.buckets.delete(start);
  }

  /** The shown value of every bucket, oldest first: [[start, value], ...]. */
  series() {
    return [...this.buckets.keys()].sort((a, b) => a - b).map((start) => [start, this.value(start)]);
  }

  /** Where a bucket's number comes from, for the page and the browser test. */
  source(start) {
    const bucket = this.buckets.get(start);
    if (!bucket) return "none";
    if (bucket.settled && !bucket.dirty) return "rollup";
    return "live";
  }
}

/** Counts and sums: additive, so `shown = base + live` exactly. */
export class SumBuckets extends ReconciledBuckets {
  emptyBucket() {
    return { base: 0, live: 0 };
  }

  markOf(bucket) {
    return bucket.live;
  }

  hasLive(bucket) {
    return bucket.live !== 0;
  }

  rebase(bucket, value, mark) {
    bucket.base = Number.isFinite(value) ? value : 0;
    bucket.live -= mark;
  }

  add(timeMs, amount = 1, nowMs = Date.now()) {
    if (!Number.isFinite(amount)) return;
    this.touch(timeMs, nowMs).live += amount;
  }

  value(start) {
    const bucket = this.buckets.get(start);
    return bucket ? bucket.base + bucket.live : 0;
  }
}

/**
 * Quantiles do not add up: a bucket shows the rollup's quantile (ClickHouse's t-digest) once it
 * has one and nothing newer arrived, else the quantile of the live values seen for it (a bounded
 * reservoir sample), else the rollup it had.
 */
export class QuantileBuckets extends ReconciledBuckets {
  constructor({ quantile = 0.5, sampleSize = 4096, random = Math.random, ...rest } = {}) {
    super(rest);
    this.quantile = quantile;
    this.sampleSize = sampleSize;
    this.random = random;
  }

  emptyBucket() {
    return { base: null, sample: [], seen: 0, liveSinceMark: 0 };
  }

  markOf(bucket) {
    return bucket.seen;
  }

  hasLive(bucket) {
    return bucket.liveSinceMark > 0;
  }

  rebase(bucket, value, mark) {
    bucket.base = Number.isFinite(value) ? value : null;
    bucket.liveSinceMark = bucket.seen - mark;
    bucket.sample = [];
    bucket.seen = bucket.liveSinceMark;
  }

  add(timeMs, value, nowMs = Date.now()) {
    if (!Number.isFinite(value)) return;
    const bucket = this.touch(timeMs, nowMs);
    bucket.seen += 1;
    bucket.liveSinceMark += 1;
    if (bucket.sample.length < this.sampleSize) {
      bucket.sample.push(value);
    } else {
      // Reservoir sampling: every value seen has the same chance to be in the sample.
      const slot = Math.floor(this.random() * bucket.seen);
      if (slot < this.sampleSize) bucket.sample[slot] = value;
    }
  }

  value(start) {
    const bucket = this.buckets.get(start);
    if (!bucket) return null;
    if (bucket.sample.length > 0 && !(bucket.settled && !bucket.dirty)) {
      return quantileOf(bucket.sample, this.quantile);
    }
    return bucket.base;
  }
}

/** Linear-interpolated quantile of `values` (not modified), `null` for none. */
export function quantileOf(values, q) {
  if (values.length === 0) return null;
  const sorted = Float64Array.from(values).sort();
  const position = q * (sorted.length - 1);
  const lower = Math.floor(position);
  const upper = Math.min(lower + 1, sorted.length - 1);
  return sorted[lower] + (sorted[upper] - sorted[lower]) * (position - lower);
}

/**
 * Counts by key (top-N lists: models, sessions) from a periodic query plus what the stream
 * added since that query was sent.
 */
export class KeyedCounts {
  constructor() {
    this.base = new Map();
    this.live = new Map();
    this.mark = null;
  }

  add(key, amount = 1) {
    if (key === undefined || key === null || key === "") return;
    this.live.set(key, (this.live.get(key) || 0) + amount);
  }

  /** Call when the query is sent. */
  begin() {
    this.mark = new Map(this.live);
  }

  /** Applies the query's answer (key -> value). */
  apply(values) {
    this.base = new Map(values);
    const mark = this.mark || new Map();
    const live = new Map();
    for (const [key, value] of this.live) {
      const since = value - (mark.get(key) || 0);
      if (since !== 0) live.set(key, since);
    }
    this.live = live;
    this.mark = null;
  }

  /** The `limit` largest, [[key, value], ...], ties by key. */
  top(limit) {
    const merged = new Map(this.base);
    for (const [key, value] of this.live) merged.set(key, (merged.get(key) || 0) + value);
    return [...merged]
      .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
      .slice(0, limit);
  }
}
