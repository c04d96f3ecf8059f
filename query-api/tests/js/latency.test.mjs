// Unit tests of the ingest -> pixel histogram (query-api/assets/latency.js).
import { test } from "node:test";
import assert from "node:assert/strict";

import { LatencyHistogram, bucketIndex, bucketHighest } from "../../assets/latency.js";

test("bucket indexes are monotonic and every value is within 1/64 of its bucket's highest", () => {
  let previous = -1;
  for (let us = 0; us < 5_000_000; us += us < 1000 ? 1 : 997) {
    const index = bucketIndex(us);
    assert.ok(index >= previous, `index goes down at ${us}`);
    previous = index;
    const highest = bucketHighest(index);
    assert.ok(highest >= us, `highest ${highest} below ${us}`);
    assert.ok(highest - us <= Math.max(0, us / 64), `bucket of ${us} too wide (${highest})`);
  }
  assert.equal(bucketIndex(127), 127);
  assert.equal(bucketHighest(bucketIndex(2 ** 31 - 1)), 2 ** 31 - 1);
});

test("percentiles of known values", () => {
  const h = new LatencyHistogram();
  assert.equal(h.percentile(0.5), null);
  for (let ms = 1; ms <= 100; ms++) h.record(ms);
  assert.equal(h.count, 100);
  const p50 = h.percentile(0.5);
  const p99 = h.percentile(0.99);
  assert.ok(p50 >= 50 && p50 <= 50 * (1 + 1 / 64), `p50 ${p50}`);
  assert.ok(p99 >= 99 && p99 <= 99 * (1 + 1 / 64), `p99 ${p99}`);
  assert.equal(h.percentile(1), 100);
  const snapshot = h.snapshot();
  assert.equal(snapshot.count, 100);
  assert.equal(snapshot.min_ms, 1);
  assert.equal(snapshot.max_ms, 100);
  assert.equal(snapshot.mean_ms, 50.5);
  assert.equal(snapshot.buckets.reduce((sum, [, n]) => sum + n, 0), 100);
});

test("negative values count as zero and are reported; junk is ignored", () => {
  const h = new LatencyHistogram();
  h.record(-2);
  h.record(Number.NaN);
  h.record(3, 0);
  h.record(0.0004);
  assert.equal(h.count, 2);
  assert.equal(h.negative, 1);
  assert.equal(h.percentile(0.99), 0);
  h.record(3, 10);
  assert.equal(h.count, 12);
  assert.equal(h.percentile(0.99), 3);
  h.reset();
  assert.equal(h.snapshot().p50_ms, null);
});

test("huge values land in the last bucket without growing memory", () => {
  const h = new LatencyHistogram();
  h.record(1e12);
  assert.equal(h.count, 1);
  assert.equal(h.snapshot().max_ms, 1e12);
  assert.ok(h.percentile(0.5) <= 1e12);
});
