// An HDR-style latency histogram: log-linear buckets over whole microseconds, every value kept
// within 1/64 (1.6 %) of its true value, exact below 128 us, bounded memory (about 1,700
// buckets up to 2^31 us = 35 min; larger values count in the last bucket).
//
// The page records, for each event it draws, the time of the animation frame that painted it
// minus the event's `ingested_at_ms`; `window.chuteLatency` is `snapshot()` of it. Pure, unit
// tested in query-api/tests/js/latency.test.mjs.

const SUB_BUCKETS = 128;
const HALF = SUB_BUCKETS / 2;
const MAX_US = 2 ** 31 - 1;
const BUCKETS = SUB_BUCKETS + (31 - 7) * HALF;

/** Index of the bucket holding `us` (a whole number >= 0). */
export function bucketIndex(us) {
  if (us < SUB_BUCKETS) return us;
  const msb = 31 - Math.clz32(us);
  const shift = msb - 6;
  return SUB_BUCKETS + (shift - 1) * HALF + ((us >>> shift) - HALF);
}

/** Largest microsecond value in bucket `index` (what percentiles report, as HdrHistogram does). */
export function bucketHighest(index) {
  if (index < SUB_BUCKETS) return index;
  const shift = Math.floor((index - SUB_BUCKETS) / HALF) + 1;
  const sub = ((index - SUB_BUCKETS) % HALF) + HALF;
  return ((sub + 1) << shift) - 1 >>> 0;
}

export class LatencyHistogram {
  constructor() {
    this.counts = new Float64Array(BUCKETS);
    this.count = 0;
    this.sumMs = 0;
    this.minMs = Infinity;
    this.maxMs = 0;
    /** Values below zero, recorded as zero (clock steps). */
    this.negative = 0;
  }

  /** Records `n` observations of `ms` milliseconds. */
  record(ms, n = 1) {
    if (!Number.isFinite(ms) || n <= 0) return;
    if (ms < 0) {
      this.negative += n;
      ms = 0;
    }
    const us = Math.min(Math.round(ms * 1000), MAX_US);
    this.counts[bucketIndex(us)] += n;
    this.count += n;
    this.sumMs += ms * n;
    if (ms < this.minMs) this.minMs = ms;
    if (ms > this.maxMs) this.maxMs = ms;
  }

  /** The value (ms) at quantile `q` in [0, 1], `null` when empty. */
  percentile(q) {
    if (this.count === 0) return null;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (let index = 0; index < BUCKETS; index++) {
      seen += this.counts[index];
      if (seen >= rank) return Math.min(bucketHighest(index) / 1000, this.maxMs);
    }
    return this.maxMs;
  }

  reset() {
    this.counts.fill(0);
    this.count = 0;
    this.sumMs = 0;
    this.minMs = Infinity;
    this.maxMs = 0;
    this.negative = 0;
  }

  /** A plain-data view: summary plus the non-empty buckets as [highest ms, count]. */
  snapshot() {
    const buckets = [];
    for (let index = 0; index < BUCKETS; index++) {
      if (this.counts[index] > 0) buckets.push([bucketHighest(index) / 1000, this.counts[index]]);
    }
    return {
      count: this.count,
      min_ms: this.count ? this.minMs : null,
      mean_ms: this.count ? this.sumMs / this.count : null,
      p50_ms: this.percentile(0.5),
      p90_ms: this.percentile(0.9),
      p99_ms: this.percentile(0.99),
      p999_ms: this.percentile(0.999),
      max_ms: this.count ? this.maxMs : null,
      negative: this.negative,
      buckets,
    };
  }
}
