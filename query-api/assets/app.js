// The Chute live page: history from the rollups, then every live event folded in at the next
// animation frame. See fold.js for how live numbers are reconciled with ClickHouse, sse.js for
// the stream reader and latency.js for the ingest -> pixel histogram (window.chuteLatency).

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { MINUTE_MS, bucketStart, eventTimeMs, ranges, SumBuckets, QuantileBuckets, KeyedCounts } from "./fold.js";
import { LatencyHistogram } from "./latency.js";
import { readEvents, HttpError } from "./sse.js";

const STEP_MS = MINUTE_MS;
const WINDOW_BUCKETS = 30;
const SETTLE_MS = 3_000;
const MAX_NAMES = 8;
const NEWEST_ROWS = 50;
const TOP_ROWS = 8;
const SESSION_ROWS = 10;
const LIST_RANGE_MS = 15 * MINUTE_MS;
const ACTIVE_SESSION_MS = 5 * MINUTE_MS;
const STORED_LOOKBACK_MS = 10_000;
/** The stream sends a `summary` every second: this long without a byte means it is dead. */
const STREAM_SILENCE_MS = 5_000;
const KEY_STORAGE = "chute.apiKey";
const THEME_STORAGE = "chute.theme";
const SUM_METRICS = ["tokens_in", "tokens_out", "cost_usd"];
const PALETTE = ["#1f6feb", "#e16f24", "#2da44e", "#bf3989", "#8250df", "#d4a72c", "#0e8a9e", "#cf222e"];
const LATENCY_EDGES_MS = [5, 10, 20, 50, 100, 200, 500, 1000, Infinity];

const query = new URLSearchParams(location.search);
const bucketOptions = { stepMs: STEP_MS, settleMs: SETTLE_MS, keepBuckets: WINDOW_BUCKETS + 2 };

/** One reconciled series: its buckets and the /v1/timeseries parameters of its rollup. */
function series(buckets, params) {
  return { buckets, params };
}

const state = {
  tenant: query.get("tenant") || "",
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  keysOn: false,
  metric: query.get("metric") || "latency_ms",
  attribute: query.get("attribute") || "model",
  total: series(new SumBuckets(bucketOptions), { agg: "count" }),
  names: new Map(),
  sums: new Map(SUM_METRICS.map((metric) => [metric, series(new SumBuckets(bucketOptions), { agg: "sum", metric })])),
  quantiles: null,
  top: new KeyedCounts(),
  sessions: new KeyedCounts(),
  sessionSeen: new Map(),
  newest: [],
  pending: [],
  frameRequested: false,
  latency: new LatencyHistogram(),
  sseLatency: new LatencyHistogram(),
  received: 0,
  painted: 0,
  foldedHidden: 0,
  missed: 0,
  lastFrame: null,
  liveNewestIngested: 0,
  storedNewestIngested: null,
  rate: null,
  status: "connecting",
  everConnected: false,
  reconnects: 0,
  lostAt: null,
  notice: "",
  charts: {},
  chartSignatures: {},
  chartNames: "",
  errors: [],
};

function quantileSeries() {
  return {
    p50: series(new QuantileBuckets({ ...bucketOptions, quantile: 0.5 }), { agg: "p50", metric: state.metric }),
    p99: series(new QuantileBuckets({ ...bucketOptions, quantile: 0.99 }), { agg: "p99", metric: state.metric }),
  };
}
state.quantiles = quantileSeries();

function allSeries() {
  return [state.total, ...state.names.values(), ...state.sums.values(), ...Object.values(state.quantiles)];
}

// ------------------------------------------------------------------ HTTP

class ApiError extends HttpError {
  constructor(status, message, parameter) {
    super(status, message);
    this.parameter = parameter;
  }
}

function authHeaders() {
  return state.key ? { authorization: `Bearer ${state.key}` } : {};
}

function apiUrl(path, params = {}) {
  const url = new URL(path, location.origin);
  if (state.tenant) url.searchParams.set("tenant", state.tenant);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) url.searchParams.set(name, String(value));
  }
  return url;
}

async function api(path, params) {
  let response;
  try {
    response = await fetch(apiUrl(path, params), { headers: authHeaders(), cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, `query API unreachable (${err.message})`);
  }
  if (!response.ok) {
    let body = {};
    try {
      body = await response.json();
    } catch {
      // Not JSON (a proxy, a restart): the status says enough.
    }
    throw new ApiError(response.status, body.error || `HTTP ${response.status}`, body.parameter);
  }
  return response.json();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ status and notices

const $ = (id) => document.getElementById(id);

function setStatus(status, text) {
  state.status = status;
  const pill = $("status");
  pill.dataset.state = status;
  pill.textContent = text || status;
}

function notice(text, level = "warn") {
  state.notice = text;
  const box = $("notice");
  box.hidden = !text;
  box.dataset.level = level;
  box.textContent = text;
}

function showTenant() {
  $("tenant").textContent = state.tenant ? `tenant: ${state.tenant}` : "tenant: from API key";
}

// ------------------------------------------------------------------ API key and tenant prompts

/** Shows the dialog asking for what the API refused; resolves when the user submitted it. */
function prompt({ title, message, askKey, askTenant, error }) {
  const dialog = $("auth-dialog");
  $("auth-title").textContent = title;
  $("auth-message").textContent = message;
  $("key-label").hidden = !askKey;
  $("tenant-label").hidden = !askTenant;
  $("auth-error").hidden = !error;
  $("auth-error").textContent = error || "";
  $("key").value = "";
  $("tenant-input").value = state.tenant;
  return new Promise((resolve) => {
    const form = $("auth-form");
    const submitted = (event) => {
      event.preventDefault();
      form.removeEventListener("submit", submitted);
      dialog.close();
      resolve({ key: $("key").value.trim(), tenant: $("tenant-input").value.trim() });
    };
    form.addEventListener("submit", submitted);
    if (!dialog.open) dialog.showModal();
    (askKey ? $("key") : $("tenant-input")).focus();
  });
}

/** Handles a refusal by asking the user; returns whether to retry. */
async function resolveRefusal(err) {
  if (err.status === 401) {
    const hadKey = Boolean(state.key);
    state.key = "";
    sessionStorage.removeItem(KEY_STORAGE);
    setStatus("error", "API key needed");
    const answer = await prompt({
      title: hadKey ? "API key refused" : "API key required",
      message:
        "This query API checks API keys. The key stays in this tab's session storage and is sent as `authorization: Bearer …` with every request and the live stream.",
      askKey: true,
      error: hadKey ? `The query API refused the key: ${err.message}.` : "",
    });
    state.key = answer.key;
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    return true;
  }
  if (err.status === 400 && err.parameter === "tenant") {
    setStatus("error", "tenant needed");
    const answer = await prompt({
      title: "Which tenant?",
      message: "API keys are off on this query API, so the page needs the tenant to show (the `?tenant=` parameter).",
      askTenant: true,
      error: state.tenant ? err.message : "",
    });
    state.tenant = answer.tenant;
    const url = new URL(location.href);
    url.searchParams.set("tenant", state.tenant);
    history.replaceState(null, "", url);
    showTenant();
    return true;
  }
  if (err.status === 403) {
    setStatus("error", "forbidden");
    notice(`${err.message}. Open the page without ?tenant= to see your key's tenant.`, "error");
    return false;
  }
  return false;
}

// ------------------------------------------------------------------ reconciliation with the rollups

function windowStarts(nowMs) {
  const last = bucketStart(nowMs, STEP_MS);
  return Array.from({ length: WINDOW_BUCKETS }, (_, i) => last - (WINDOW_BUCKETS - 1 - i) * STEP_MS);
}

/** Requests the rollup of `starts` for one series and applies it. */
async function reconcile(target, starts, nowMs) {
  for (const range of ranges(starts, STEP_MS)) {
    const inRange = starts.filter((start) => start >= range.from && start < range.to);
    const id = target.buckets.begin(inRange, nowMs);
    try {
      const answer = await api("/v1/timeseries", { ...target.params, step: "1m", from: range.from, to: range.to });
      const values = new Map(answer.points.map((point) => [Date.parse(point.t), point.value]));
      target.buckets.apply(id, values);
      scheduleFrame();
    } catch (err) {
      target.buckets.abandon(id);
      if (err.status && err.status !== 401) {
        state.errors.push(`timeseries ${err.status}: ${err.message}`);
        if (state.errors.length > 50) state.errors.shift();
      }
    }
  }
}

function loadHistory(target, nowMs = Date.now()) {
  return reconcile(target, windowStarts(nowMs), nowMs);
}

/** Every second: closed buckets, late events and forced ones go back to the rollups. */
function reconcileDue() {
  const nowMs = Date.now();
  const oldest = windowStarts(nowMs)[0];
  for (const target of allSeries()) {
    const due = target.buckets.due(nowMs).filter((start) => start >= oldest);
    if (due.length) reconcile(target, due, nowMs);
  }
}

function nameSeries(name, nowMs) {
  let target = state.names.get(name);
  if (!target && state.names.size < MAX_NAMES) {
    target = series(new SumBuckets(bucketOptions), { agg: "count", name });
    state.names.set(name, target);
    // History first: the request is marked before this event is folded, so the event stays
    // on top of whatever the answer holds.
    loadHistory(target, nowMs);
  }
  return target;
}

async function pollTop() {
  const nowMs = Date.now();
  state.top.begin();
  try {
    const answer = await api("/v1/top", { by: `attribute:${state.attribute}`, from: nowMs - LIST_RANGE_MS, limit: TOP_ROWS });
    state.top.apply(answer.items.map((item) => [item.key, item.value || 0]));
    scheduleFrame();
  } catch (err) {
    state.top.mark = null;
  }
}

async function pollSessions() {
  const nowMs = Date.now();
  // Bounded memory: sessions not seen for the listed range are forgotten.
  for (const [id, seen] of state.sessionSeen) if (nowMs - seen > LIST_RANGE_MS) state.sessionSeen.delete(id);
  state.sessions.begin();
  try {
    const answer = await api("/v1/sessions", { from: nowMs - LIST_RANGE_MS, limit: SESSION_ROWS });
    state.sessions.apply(answer.sessions.map((session) => [session.session_id, session.events]));
    for (const session of answer.sessions) {
      const end = Date.parse(session.end);
      if (end > (state.sessionSeen.get(session.session_id) || 0)) state.sessionSeen.set(session.session_id, end);
    }
    scheduleFrame();
  } catch (err) {
    state.sessions.mark = null;
  }
}

/**
 * How far ClickHouse is behind the live stream: the newest stored event's ingest time. Only the
 * last 10 s of event time are read (a raw query with FINAL: kept small, every 3 s), so events
 * stamped further in the past do not count here.
 */
async function pollStored() {
  const nowMs = Date.now();
  try {
    const answer = await api("/v1/events", { from: nowMs - STORED_LOOKBACK_MS, limit: 1 });
    const newest = answer.events[0];
    state.storedNewestIngested = newest ? Date.parse(newest.ingested_at) : null;
  } catch {
    // Shown as unknown until the next poll.
  }
}

// ------------------------------------------------------------------ the live stream

function streamUrl() {
  return apiUrl("/v1/stream");
}

function onStreamEvent(event) {
  if (event.event === "event") {
    const receivedAt = performance.timeOrigin + performance.now();
    let live;
    try {
      live = JSON.parse(event.data);
    } catch {
      return;
    }
    state.received += 1;
    state.sseLatency.record(receivedAt - live.ingested_at_ms);
    if (document.visibilityState === "hidden") {
      // No animation frames in a hidden tab: fold now (bounded memory), nothing is painted.
      fold(live, Date.now());
      state.foldedHidden += 1;
      return;
    }
    state.pending.push(live);
    scheduleFrame();
  } else if (event.event === "summary") {
    const summary = JSON.parse(event.data);
    state.rate = summary.rate;
  } else if (event.event === "lagged") {
    const { missed } = JSON.parse(event.data);
    state.missed += missed;
    notice(
      `The page fell behind the live stream and missed ${missed.toLocaleString()} events; the charts are reconciled from the rollups.`,
    );
    for (const target of allSeries()) target.buckets.forceAll(Date.now());
    lastSlowRender = 0;
    scheduleFrame();
  }
}

async function streamLoop() {
  let delay = 500;
  for (;;) {
    const controller = new AbortController();
    let lastByte = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - lastByte > STREAM_SILENCE_MS) controller.abort(new Error("no data for 5 s"));
    }, 1_000);
    let reason = "the stream ended";
    try {
      await readEvents(streamUrl(), {
        headers: authHeaders(),
        signal: controller.signal,
        onOpen: () => {
          delay = 500;
          onStreamOpen();
        },
        onEvent: (event) => {
          lastByte = Date.now();
          onStreamEvent(event);
        },
      });
    } catch (err) {
      reason = controller.signal.aborted ? String(controller.signal.reason?.message || "aborted") : err.message;
      if (err.status === 401 || (err.status === 400 && err.parameter === "tenant")) {
        clearInterval(watchdog);
        await resolveRefusal(err);
        continue;
      }
    } finally {
      clearInterval(watchdog);
    }
    onStreamLost(reason, delay);
    await sleep(delay);
    delay = Math.min(delay * 2, 5_000);
  }
}

function onStreamOpen() {
  if (state.everConnected) {
    state.reconnects += 1;
    const gap = state.lostAt ? ((Date.now() - state.lostAt) / 1000).toFixed(1) : "?";
    notice(`Reconnected to the live stream after ${gap} s; events of the gap are reconciled from the rollups.`, "ok");
    for (const target of allSeries()) target.buckets.forceAll(Date.now());
    reconcileDue();
    pollTop();
    pollSessions();
  }
  state.everConnected = true;
  state.lostAt = null;
  setStatus("live", "live");
}

function onStreamLost(reason, delay) {
  if (!state.lostAt) state.lostAt = Date.now();
  setStatus("reconnecting", "reconnecting…");
  notice(`Lost the live stream (${reason}); reconnecting in ${(delay / 1000).toFixed(1)} s…`);
}

// ------------------------------------------------------------------ folding and painting

function fold(event, nowMs) {
  const timeMs = eventTimeMs(event);
  state.total.buckets.add(timeMs, 1, nowMs);
  nameSeries(event.name, nowMs)?.buckets.add(timeMs, 1, nowMs);
  const metrics = event.metrics || {};
  for (const [metric, target] of state.sums) {
    if (metric in metrics) target.buckets.add(timeMs, metrics[metric], nowMs);
  }
  if (state.metric in metrics) {
    state.quantiles.p50.buckets.add(timeMs, metrics[state.metric], nowMs);
    state.quantiles.p99.buckets.add(timeMs, metrics[state.metric], nowMs);
  }
  state.top.add((event.attributes || {})[state.attribute]);
  if (event.session_id) {
    state.sessions.add(event.session_id);
    state.sessionSeen.set(event.session_id, Math.max(state.sessionSeen.get(event.session_id) || 0, timeMs));
  }
  if (event.ingested_at_ms > state.liveNewestIngested) state.liveNewestIngested = event.ingested_at_ms;
}

/**
 * At most `?fps=` (default 30) redraws a second: past that, more frames only make the renderer's
 * main thread busier (each redraw rasterizes the charts), and a busy main thread delays the next
 * events more than waiting for a slower frame does. Events that arrive between frames are folded
 * together.
 */
const MIN_FRAME_MS = 1000 / Math.min(120, Math.max(1, Number(query.get("fps")) || 30));
let lastFrameAt = -Infinity;

function scheduleFrame() {
  if (state.frameRequested) return;
  state.frameRequested = true;
  const wait = lastFrameAt + MIN_FRAME_MS - performance.now();
  // rAF fires every ~16.7 ms: asking 2 ms early keeps a 30 fps cap on whole frames.
  if (wait > 2) setTimeout(() => requestAnimationFrame(frame), wait - 2);
  else requestAnimationFrame(frame);
}

/**
 * One animation frame: fold every event received since the last frame, redraw, then record
 * each event's ingest -> pixel latency. uPlot draws in a microtask queued by `setData`, so the
 * microtask queued after it runs once the canvas is drawn, just before the frame is presented.
 * Past a few events per frame drawing each one is pointless: the frame aggregates them and every
 * event's latency is that of the frame that first showed its contribution.
 */
function frame() {
  state.frameRequested = false;
  lastFrameAt = performance.now();
  const events = state.pending;
  state.pending = [];
  const nowMs = Date.now();
  for (const event of events) fold(event, nowMs);
  if (events.length) {
    state.newest = events.slice(-NEWEST_ROWS).reverse().concat(state.newest).slice(0, NEWEST_ROWS);
  }
  render(nowMs);
  if (events.length) queueMicrotask(() => painted(events));
}

function painted(events) {
  const paintedAt = performance.timeOrigin + performance.now();
  let freshest = -Infinity;
  for (const event of events) {
    state.latency.record(paintedAt - event.ingested_at_ms);
    if (event.ingested_at_ms > freshest) freshest = event.ingested_at_ms;
    if (event.painted_ms === undefined) event.painted_ms = paintedAt - event.ingested_at_ms;
  }
  state.painted += events.length;
  state.lastFrame = { events: events.length, latency_ms: paintedAt - freshest, at: paintedAt };
}

// ------------------------------------------------------------------ rendering

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function axis(label, format) {
  const stroke = cssVar("--muted");
  const grid = cssVar("--grid");
  return {
    label,
    stroke,
    grid: { stroke: grid, width: 1 },
    ticks: { stroke: grid, width: 1 },
    values: format ? (_, ticks) => ticks.map(format) : undefined,
    size: 56,
  };
}

const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

function metricUnit(metric) {
  if (metric.endsWith("_ms")) return "ms";
  if (metric.endsWith("_s") || metric.endsWith("_seconds")) return "s";
  if (metric.endsWith("_usd")) return "USD";
  return metric;
}

function chartWidth(element) {
  return Math.max(240, element.clientWidth || element.parentElement.clientWidth - 24);
}

function makeChart(id, seriesList, axes, height, scales) {
  const element = $(id);
  state.charts[id]?.destroy();
  element.textContent = "";
  const options = {
    width: chartWidth(element),
    height,
    scales: { x: { time: true }, ...scales },
    series: [{ label: "time" }, ...seriesList],
    axes: [{ ...axis(null), label: "time (local)", size: 40 }, ...axes],
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
  };
  const chart = new uPlot(options, [[], ...seriesList.map(() => [])], element);
  state.charts[id] = chart;
  delete state.chartSignatures[id];
  return chart;
}

function buildCharts() {
  const names = [...state.names.keys()];
  state.chartNames = names.join("\u0000");
  makeChart(
    "chart-events",
    names.map((name, i) => ({ label: name, stroke: PALETTE[i % PALETTE.length], width: 2, points: { size: 4 } })),
    [axis("events/s", (v) => compact.format(v))],
    220,
  );
  const unit = metricUnit(state.metric);
  makeChart(
    "chart-quantiles",
    [
      { label: "p50", stroke: PALETTE[0], width: 2, points: { size: 4 } },
      { label: "p99", stroke: PALETTE[1], width: 2, points: { size: 4 } },
    ],
    [axis(unit, (v) => compact.format(v))],
    200,
  );
  makeChart(
    "chart-tokens",
    [
      { label: "tokens_in", stroke: PALETTE[2], width: 2, scale: "tokens", points: { size: 4 } },
      { label: "tokens_out", stroke: PALETTE[3], width: 2, scale: "tokens", points: { size: 4 } },
      { label: "cost_usd", stroke: PALETTE[4], width: 2, scale: "usd", dash: [6, 3], points: { size: 4 } },
    ],
    [
      { ...axis("tokens/min", (v) => compact.format(v)), scale: "tokens" },
      { ...axis("USD/min", (v) => (v < 10 ? `$${v.toFixed(v < 1 ? 3 : 1)}` : `$${compact.format(v)}`)), side: 1, grid: { show: false }, scale: "usd", size: 64 },
    ],
    200,
    { tokens: {}, usd: {} },
  );
  $("quantile-title").textContent = state.metric;
  $("attribute-title").textContent = state.attribute;
}

/** events/s of a minute bucket: the whole minute once closed, the elapsed part while open. */
function perSecond(count, start, nowMs) {
  const elapsed = Math.min(STEP_MS, Math.max(1_000, nowMs - start));
  return (count * 1000) / elapsed;
}

/**
 * Redraws a chart only when what it shows changed: a canvas redraw is most of a frame's cost in
 * a software-rendered browser, and at high rates most frames change only one chart.
 */
function setChartData(id, data) {
  const signature = data.map((values) => values.join(",")).join(";");
  if (state.chartSignatures[id] === signature) return;
  state.chartSignatures[id] = signature;
  state.charts[id].setData(data);
}

function setText(id, text) {
  const element = $(id);
  if (element.textContent !== text) element.textContent = text;
}

function setEmpty(name, empty) {
  const element = document.querySelector(`[data-empty-for="${name}"]`);
  if (element && element.hidden !== !empty) element.hidden = !empty;
}

function renderCharts(nowMs) {
  if ([...state.names.keys()].join("\u0000") !== state.chartNames) buildCharts();
  const starts = windowStarts(nowMs);
  const xs = starts.map((start) => start / 1000);

  const eventsData = [xs];
  for (const target of state.names.values()) {
    eventsData.push(starts.map((start) => perSecond(target.buckets.value(start), start, nowMs)));
  }
  setChartData("chart-events", eventsData);
  const total = starts.reduce((sum, start) => sum + state.total.buckets.value(start), 0);
  setText("events-total", `${total.toLocaleString()} events in ${WINDOW_BUCKETS} min`);
  setEmpty("events", total === 0);

  const quantileData = [xs, ...["p50", "p99"].map((q) => starts.map((start) => state.quantiles[q].buckets.value(start)))];
  setChartData("chart-quantiles", quantileData);
  setEmpty("quantiles", quantileData[1].every((v) => v === null));

  const tokenData = [xs, ...SUM_METRICS.map((metric) => starts.map((start) => state.sums.get(metric).buckets.value(start)))];
  setChartData("chart-tokens", tokenData);
  setEmpty("tokens", tokenData.slice(1).every((values) => values.every((v) => !v)));
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function ago(ms, nowMs) {
  const seconds = Math.max(0, Math.round((nowMs - ms) / 1000));
  return seconds < 90 ? `${seconds} s ago` : `${Math.round(seconds / 60)} min ago`;
}

function renderLists(nowMs) {
  const top = state.top.top(TOP_ROWS);
  const topBody = $("top-body");
  topBody.textContent = "";
  for (const [key, value] of top) {
    const row = topBody.insertRow();
    cell(row, key);
    cell(row, Math.round(value).toLocaleString(), "num");
  }
  setEmpty("top", top.length === 0);

  const sessions = state.sessions.top(SESSION_ROWS);
  const sessionsBody = $("sessions-body");
  sessionsBody.textContent = "";
  for (const [id, events] of sessions) {
    const row = sessionsBody.insertRow();
    cell(row, id);
    cell(row, Math.round(events).toLocaleString(), "num");
    cell(row, state.sessionSeen.has(id) ? ago(state.sessionSeen.get(id), nowMs) : "–", "num");
  }
  let active = 0;
  for (const seen of state.sessionSeen.values()) if (nowMs - seen <= ACTIVE_SESSION_MS) active += 1;
  $("sessions-count").textContent = `${active.toLocaleString()} active in 5 min`;
  setEmpty("sessions", sessions.length === 0);

  const eventsBody = $("events-body");
  eventsBody.textContent = "";
  for (const event of state.newest) {
    const row = eventsBody.insertRow();
    row.dataset.eventId = event.event_id;
    cell(row, new Date(eventTimeMs(event)).toLocaleTimeString());
    cell(row, event.name);
    cell(row, event.session_id || "–");
    cell(row, event.user_id || "–");
    cell(row, event.painted_ms === undefined ? "…" : `${event.painted_ms.toFixed(1)} ms`, "num");
  }
  setEmpty("newest", state.newest.length === 0);
}

function fmtMs(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? value.toFixed(1) : Math.round(value).toLocaleString();
}

function renderTiles(nowMs) {
  $("tile-rate").textContent = state.rate === null ? "–" : Math.round(state.rate).toLocaleString();
  const liveRecent = nowMs - state.liveNewestIngested < 10_000;
  if (state.storedNewestIngested === null || !state.liveNewestIngested) {
    $("tile-lag").textContent = "–";
  } else {
    const behind = Math.max(0, state.liveNewestIngested - state.storedNewestIngested);
    $("tile-lag").textContent = !liveRecent && behind === 0 ? "caught up" : `${fmtMs(behind)} ms`;
  }
  $("tile-frame").textContent = state.lastFrame ? fmtMs(state.lastFrame.latency_ms) : "–";
  $("tile-latency").textContent = state.latency.count
    ? `${fmtMs(state.latency.percentile(0.5))} / ${fmtMs(state.latency.percentile(0.99))}`
    : "–";
  $("tile-latency-n").textContent = `ms, ${state.latency.count.toLocaleString()} events painted`;
  $("tile-sse").textContent = state.sseLatency.count
    ? `${fmtMs(state.sseLatency.percentile(0.5))} / ${fmtMs(state.sseLatency.percentile(0.99))}`
    : "–";
  $("tile-missed").textContent = state.missed.toLocaleString();
}

function renderLatencyBars() {
  const counts = LATENCY_EDGES_MS.map(() => 0);
  for (const [highestMs, count] of state.latency.snapshot().buckets) {
    counts[LATENCY_EDGES_MS.findIndex((edge) => highestMs < edge)] += count;
  }
  const most = Math.max(1, ...counts);
  const bars = $("latency-bars");
  bars.textContent = "";
  LATENCY_EDGES_MS.forEach((edge, i) => {
    const row = document.createElement("div");
    row.className = "bar-row";
    const low = i === 0 ? 0 : LATENCY_EDGES_MS[i - 1];
    row.textContent = `${edge === Infinity ? `≥ ${low}` : `< ${edge}`} ms: ${counts[i].toLocaleString()}`;
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = `${(100 * counts[i]) / most}%`;
    row.appendChild(fill);
    bars.appendChild(row);
  });
  setEmpty("latency", state.latency.count === 0);
}

let lastSlowRender = 0;

function render(nowMs) {
  renderCharts(nowMs);
  // Tables and tiles at most 4 times a second: the charts carry the per-frame update.
  if (nowMs - lastSlowRender >= 250) {
    lastSlowRender = nowMs;
    renderLists(nowMs);
    renderTiles(nowMs);
    renderLatencyBars();
  }
}

// ------------------------------------------------------------------ event details

async function showEvent(event) {
  $("event-id").textContent = event.event_id;
  $("event-live").textContent = JSON.stringify(event, null, 2);
  $("event-stored").textContent = "loading…";
  $("event-dialog").showModal();
  const timeMs = eventTimeMs(event);
  try {
    const answer = await api("/v1/events", { name: event.name, from: timeMs, to: timeMs + 1, limit: 1000 });
    const stored = answer.events.find((candidate) => candidate.event_id === event.event_id);
    $("event-stored").textContent = stored
      ? JSON.stringify(stored, null, 2)
      : "Not in ClickHouse yet: the aggregator inserts within about a second. Close and click again.";
  } catch (err) {
    $("event-stored").textContent = `The query API answered ${err.status || ""}: ${err.message}`;
  }
}

// ------------------------------------------------------------------ theme and controls

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
}

function initialTheme() {
  const chosen = query.get("theme") || localStorage.getItem(THEME_STORAGE);
  if (chosen === "dark" || chosen === "light") return chosen;
  return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

function bindControls() {
  $("theme").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem(THEME_STORAGE, next);
    applyTheme(next);
    buildCharts();
    render(Date.now());
  });
  $("change-key").addEventListener("click", async () => {
    await resolveRefusal(new ApiError(401, "key change requested"));
    location.reload();
  });
  $("metric-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const metric = $("metric").value.trim();
    if (!metric || metric === state.metric) return;
    state.metric = metric;
    state.quantiles = quantileSeries();
    buildCharts();
    for (const target of Object.values(state.quantiles)) loadHistory(target);
  });
  $("attribute-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const attribute = $("attribute").value.trim();
    if (!attribute || attribute === state.attribute) return;
    state.attribute = attribute;
    state.top = new KeyedCounts();
    $("attribute-title").textContent = attribute;
    pollTop();
  });
  $("events-body").addEventListener("click", (event) => {
    // By id: the list may have moved on since the row was drawn.
    const row = event.target.closest("tr");
    const live = row && state.newest.find((candidate) => candidate.event_id === row.dataset.eventId);
    if (live) showEvent(live);
  });
  let resizeTimer = null;
  addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const [id, chart] of Object.entries(state.charts)) chart.setSize({ width: chartWidth($(id)), height: chart.height });
    }, 100);
  });
}

// ------------------------------------------------------------------ test and benchmark hooks

Object.defineProperty(window, "chuteLatency", {
  get() {
    return {
      ...state.latency.snapshot(),
      received: state.received,
      painted: state.painted,
      folded_while_hidden: state.foldedHidden,
      missed: state.missed,
      ingest_to_sse: state.sseLatency.snapshot(),
      clock: "ingested_at_ms (ingestor clock) vs performance.timeOrigin + performance.now() (browser clock): same machine",
    };
  },
});

window.chute = {
  /** Starts the latency histograms and counters afresh (the benchmark, between load phases). */
  resetLatency() {
    state.latency.reset();
    state.sseLatency.reset();
    state.received = 0;
    state.painted = 0;
    state.foldedHidden = 0;
    state.missed = 0;
    state.lastFrame = null;
  },
  /** The page's state as plain data, for the browser test. */
  snapshot() {
    const buckets = (target) =>
      target.buckets.series().map(([start, value]) => ({ start, value, source: target.buckets.source(start) }));
    return {
      status: state.status,
      notice: state.notice,
      tenant: state.tenant,
      keysOn: state.keysOn,
      received: state.received,
      painted: state.painted,
      missed: state.missed,
      reconnects: state.reconnects,
      total: buckets(state.total),
      names: Object.fromEntries([...state.names].map(([name, target]) => [name, buckets(target)])),
      charts: Object.fromEntries(Object.entries(state.charts).map(([id, chart]) => [id, chart.data])),
      top: state.top.top(TOP_ROWS),
      sessions: state.sessions.top(SESSION_ROWS),
      newest: state.newest.length,
      errors: state.errors.slice(-20),
    };
  },
};

// ------------------------------------------------------------------ start

async function start() {
  applyTheme(initialTheme());
  showTenant();
  bindControls();
  buildCharts();
  render(Date.now());
  // The first request tells whether a key or a tenant is needed.
  let names;
  let delay = 1_000;
  for (;;) {
    try {
      const from = windowStarts(Date.now())[0];
      names = await api("/v1/top", { by: "name", from, limit: MAX_NAMES });
      break;
    } catch (err) {
      if (await resolveRefusal(err)) continue;
      if (err.status === 403) return;
      setStatus("error", "unreachable");
      notice(`Cannot load the dashboard: ${err.message}. Retrying in ${delay / 1000} s…`, "error");
      await sleep(delay);
      delay = Math.min(delay * 2, 10_000);
    }
  }
  state.keysOn = Boolean(state.key);
  $("change-key").hidden = !state.keysOn;
  notice("");
  const nowMs = Date.now();
  for (const item of names.items) nameSeries(item.key, nowMs);
  streamLoop();
  for (const target of [state.total, ...state.sums.values(), ...Object.values(state.quantiles)]) loadHistory(target, nowMs);
  pollTop();
  pollSessions();
  pollStored();
  setInterval(reconcileDue, 1_000);
  setInterval(pollTop, 5_000);
  setInterval(pollSessions, 5_000);
  setInterval(pollStored, 3_000);
  // Tiles and "x s ago" keep moving when no event arrives.
  setInterval(() => {
    lastSlowRender = 0;
    scheduleFrame();
  }, 1_000);
}

start();
