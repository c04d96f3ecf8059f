// Unit tests of the page's bucket folding (query-api/assets/fold.js), run by `node --test`
// (query-api/tests/it/page.rs runs them in `cargo test`).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  MINUTE_MS,
  bucketStart,
  eventTimeMs,
  ranges,
  quantileOf,
  SumBuckets,
  QuantileBuckets,
  KeyedCounts,
} from "../../assets/fold.js";

const T0 = Date.UTC(2026, 10, 30, 12, 0, 0); // a minute boundary
const SETTLE = 3_000;
const options = { stepMs: MINUTE_MS, settleMs: SETTLE, keepBuckets: 30 };

test("buckets start on step boundaries, also before 1970 and for RFC 3339 times", () => {
  assert.equal(bucketStart(T0 + 59_999), T0);
  assert.equal(bucketStart(T0 + 60_000), T0 + MINUTE_MS);
  assert.equal(bucketStart(-1), -MINUTE_MS);
  assert.equal(eventTimeMs({ time: "2026-11-30T12:00:01.123456789Z", ingested_at_ms: 5 }), T0 + 1_123);
  assert.equal(eventTimeMs({ time: null, ingested_at_ms: T0 + 7 }), T0 + 7);
  assert.equal(eventTimeMs({ time: "not a time", ingested_at_ms: T0 + 8 }), T0 + 8);
});

test("neighbouring buckets are requested as one range", () => {
  assert.deepEqual(ranges([T0 + 2 * MINUTE_MS, T0, T0 + MINUTE_MS, T0 + 5 * MINUTE_MS]), [
    { from: T0, to: T0 + 3 * MINUTE_MS },
    { from: T0 + 5 * MINUTE_MS, to: T0 + 6 * MINUTE_MS },
  ]);
  assert.deepEqual(ranges([]), []);
});

test("history plus live events: shown is the rollup plus what arrived after the request was sent", () => {
  const b = new SumBuckets(options);
  // The page loads history at T0+10s while events already flow.
  b.add(T0 + 9_000, 1, T0 + 9_500); // folded before the request: the rollup answers for it
  const id = b.begin([T0], T0 + 10_000);
  b.add(T0 + 10_500, 1, T0 + 10_600); // folded while the request is in flight: stays live
  b.apply(id, new Map([[T0, 7]])); // ClickHouse held 7 (including the first live event)
  assert.equal(b.value(T0), 8);
  b.add(T0 + 20_000, 2, T0 + 20_000);
  assert.equal(b.value(T0), 10);
  assert.equal(b.source(T0), "live");
});

test("a bucket is reconciled once it closed and settled, and then equals the rollup", () => {
  const b = new SumBuckets(options);
  for (let i = 0; i < 5; i++) b.add(T0 + i * 1_000, 1, T0 + i * 1_000);
  assert.deepEqual(b.due(T0 + 30_000), [], "open bucket is not due");
  assert.deepEqual(b.due(T0 + MINUTE_MS + SETTLE - 1), [], "closed but not settled");
  const now = T0 + MINUTE_MS + SETTLE;
  assert.deepEqual(b.due(now), [T0]);
  const id = b.begin([T0], now);
  assert.deepEqual(b.due(now + 1_000), [], "in flight: not requested twice");
  // The live stream missed one event: ClickHouse has 6, the page counted 5.
  b.apply(id, new Map([[T0, 6]]));
  assert.equal(b.value(T0), 6);
  assert.equal(b.source(T0), "rollup");
  assert.deepEqual(b.due(T0 + MINUTE_MS + 30_000 - 1), [], "settled and clean");
  // Confirmed once more 30 s after close, in case the aggregator was slower than settleMs.
  const confirm = T0 + MINUTE_MS + 30_000;
  assert.deepEqual(b.due(confirm), [T0]);
  b.apply(b.begin([T0], confirm), new Map([[T0, 7]]));
  assert.equal(b.value(T0), 7);
  assert.deepEqual(b.due(confirm + 3_600_000), [], "confirmed: never again");
});

test("a late event re-opens a settled bucket until the rollup has it", () => {
  const b = new SumBuckets(options);
  const now = T0 + MINUTE_MS + SETTLE;
  b.add(T0 + 1_000, 1, T0 + 1_000);
  b.apply(b.begin([T0], now), new Map([[T0, 1]]));
  b.add(T0 + 2_000, 1, now + 5_000); // late: event time in a closed minute
  assert.equal(b.value(T0), 2);
  assert.equal(b.source(T0), "live");
  assert.deepEqual(b.due(now + 5_000 + SETTLE - 1), [], "waits until the late event is stored");
  const later = now + 5_000 + SETTLE;
  assert.deepEqual(b.due(later), [T0]);
  b.apply(b.begin([T0], later), new Map([[T0, 2]]));
  assert.equal(b.value(T0), 2);
  assert.equal(b.source(T0), "rollup");
});

test("an event folded while the reconcile is in flight stays dirty and is reconciled again", () => {
  const b = new SumBuckets(options);
  const now = T0 + MINUTE_MS + SETTLE;
  b.add(T0, 3, T0);
  const id = b.begin([T0], now);
  b.add(T0 + 5, 1, now + 10); // may or may not be in the answer
  b.apply(id, new Map([[T0, 3]]));
  assert.equal(b.value(T0), 4);
  assert.equal(b.source(T0), "live");
  assert.deepEqual(b.due(now + 10 + SETTLE), [T0]);
  b.apply(b.begin([T0], now + 10 + SETTLE), new Map([[T0, 4]]));
  assert.equal(b.value(T0), 4, "not double counted: the answer replaced the live count");
});

test("missed events force every bucket, the open one too, and a failed request is retried", () => {
  const b = new SumBuckets(options);
  b.add(T0 + 1_000, 1, T0 + 1_000);
  b.add(T0 + MINUTE_MS, 1, T0 + MINUTE_MS);
  const now = T0 + MINUTE_MS + SETTLE;
  b.forceAll(now - SETTLE);
  assert.deepEqual(b.due(now - 1), [], "forced, but the missed events are given settleMs to be stored");
  assert.deepEqual(b.due(now), [T0, T0 + MINUTE_MS]);
  const id = b.begin([T0, T0 + MINUTE_MS], now);
  b.abandon(id);
  assert.deepEqual(b.due(now), [T0, T0 + MINUTE_MS], "abandoned: due again");
  const retry = b.begin([T0, T0 + MINUTE_MS], now);
  b.apply(retry, new Map([[T0, 40], [T0 + MINUTE_MS, 9]]));
  assert.equal(b.value(T0), 40);
  assert.equal(b.value(T0 + MINUTE_MS), 9);
  assert.equal(b.source(T0), "rollup");
  assert.equal(b.source(T0 + MINUTE_MS), "live", "the open bucket stays live until it closes");
});

test("an answer for another request or a missing bucket changes nothing", () => {
  const b = new SumBuckets(options);
  b.add(T0, 2, T0);
  const first = b.begin([T0], T0 + MINUTE_MS + SETTLE);
  b.apply(first + 100, new Map([[T0, 50]]));
  b.apply(first, new Map([[T0 + 5 * MINUTE_MS, 1]]));
  assert.equal(b.value(T0), 2);
  assert.equal(b.value(T0 + 9 * MINUTE_MS), 0);
});

test("only the kept window of buckets is retained", () => {
  const b = new SumBuckets({ ...options, keepBuckets: 3 });
  const starts = [0, 1, 2, 3, 4].map((i) => T0 + i * MINUTE_MS);
  b.apply(b.begin(starts, T0 + 10 * MINUTE_MS), new Map(starts.map((s) => [s, 1])));
  assert.deepEqual(b.series().map(([start]) => start), starts.slice(2));
});

test("sums ignore non-finite values and null rollups count as zero", () => {
  const b = new SumBuckets(options);
  b.add(T0, Number.NaN, T0);
  b.add(T0, 0.25, T0);
  assert.equal(b.value(T0), 0.25);
  b.apply(b.begin([T0], T0 + MINUTE_MS + SETTLE), new Map([[T0, null]]));
  assert.equal(b.value(T0), 0);
});

test("quantiles: live sample while open, the rollup once settled", () => {
  const q = new QuantileBuckets({ ...options, quantile: 0.5 });
  assert.equal(q.value(T0), null);
  for (const v of [10, 20, 30, 40, 50]) q.add(T0 + v, v, T0 + v);
  assert.equal(q.value(T0), 30);
  const now = T0 + MINUTE_MS + SETTLE;
  q.apply(q.begin([T0], now), new Map([[T0, 31.5]]));
  assert.equal(q.value(T0), 31.5);
  q.add(T0 + 1, 1000, now + 1); // late value: the sample shows until the next reconcile
  assert.equal(q.value(T0), 1000);
  q.apply(q.begin([T0], now + 1 + SETTLE), new Map([[T0, 33]]));
  assert.equal(q.value(T0), 33);
});

test("quantile reservoir stays bounded and keeps every value equally likely", () => {
  let seed = 1;
  const random = () => ((seed = (seed * 48271) % 2147483647) / 2147483647);
  const q = new QuantileBuckets({ ...options, quantile: 0.5, sampleSize: 100, random });
  for (let i = 0; i < 10_000; i++) q.add(T0, i, T0);
  const bucket = q.buckets.get(T0);
  assert.equal(bucket.sample.length, 100);
  const median = q.value(T0);
  assert.ok(median > 3_500 && median < 6_500, `median of a uniform 0..9999 sample: ${median}`);
});

test("quantileOf interpolates and leaves its input alone", () => {
  const values = [3, 1, 2];
  assert.equal(quantileOf(values, 0.5), 2);
  assert.equal(quantileOf(values, 0.75), 2.5);
  assert.equal(quantileOf(values, 1), 3);
  assert.deepEqual(values, [3, 1, 2]);
  assert.equal(quantileOf([], 0.5), null);
});

test("keyed counts: the query's answer plus what arrived after it was sent", () => {
  const k = new KeyedCounts();
  k.add("gpt");
  k.add("gpt");
  k.add("");
  k.add(undefined);
  k.begin();
  k.add("claude"); // after the query was sent
  k.apply([["gpt", 10], ["llama", 4]]);
  assert.deepEqual(k.top(5), [["gpt", 10], ["llama", 4], ["claude", 1]]);
  k.add("llama", 7);
  assert.deepEqual(k.top(2), [["llama", 11], ["gpt", 10]]);
});
