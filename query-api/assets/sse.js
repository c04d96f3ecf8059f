// Server-Sent Events over fetch: `EventSource` cannot send an `authorization` header, and
// putting the API key in the URL would write it into access logs and browser history. So the
// page reads `/v1/stream` with fetch and parses the event stream itself (the WHATWG format:
// `event:`/`data:`/`id:` fields, `:` comments, a blank line ends an event).
//
// `SseParser` is pure and unit tested (query-api/tests/js/sse.test.mjs); `readEvents` is the
// fetch loop around it.

export class SseParser {
  constructor() {
    this.pending = "";
    this.reset();
  }

  reset() {
    this.type = "";
    this.data = [];
    this.id = null;
  }

  /** Feeds decoded text; returns the events completed by it: [{event, data, id}]. */
  push(text) {
    const events = [];
    this.pending += text;
    let start = 0;
    for (;;) {
      const lf = this.pending.indexOf("\n", start);
      const cr = this.pending.indexOf("\r", start);
      let end = lf < 0 ? cr : cr < 0 ? lf : Math.min(lf, cr);
      if (end < 0) break;
      // A CR at the very end may be the first half of CRLF: wait for the next chunk.
      if (end === cr && cr === this.pending.length - 1) break;
      const line = this.pending.slice(start, end);
      start = end + (this.pending[end] === "\r" && this.pending[end + 1] === "\n" ? 2 : 1);
      const event = this.line(line);
      if (event) events.push(event);
    }
    this.pending = this.pending.slice(start);
    return events;
  }

  line(line) {
    if (line === "") {
      if (this.data.length === 0) {
        this.reset();
        return null;
      }
      const event = { event: this.type || "message", data: this.data.join("\n"), id: this.id };
      this.reset();
      return event;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id") this.id = value;
    return null;
  }
}

/** Thrown for a non-2xx answer to the stream request, with the status and the API's message. */
export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/**
 * Opens `url` with `headers` and calls `onEvent(event)` for every event until the stream ends
 * (resolves) or fails or `signal` aborts (rejects). `onOpen()` is called once the answer is 200.
 */
export async function readEvents(url, { headers = {}, signal, onOpen = () => {}, onEvent, fetchImpl = fetch }) {
  const response = await fetchImpl(url, { headers: { accept: "text/event-stream", ...headers }, signal, cache: "no-store" });
  if (!response.ok) {
    let message = `${response.status}`;
    try {
      const body = await response.json();
      message = body.error || body.message || JSON.stringify(body);
    } catch {
      // Not JSON: the status says enough.
    }
    throw new HttpError(response.status, message);
  }
  onOpen();
  const parser = new SseParser();
  const decoder = new TextDecoder();
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    for (const event of parser.push(decoder.decode(value, { stream: true }))) onEvent(event);
  }
}
