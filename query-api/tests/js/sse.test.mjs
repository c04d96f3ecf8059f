// Unit tests of the fetch-based Server-Sent Events reader (query-api/assets/sse.js).
import { test } from "node:test";
import assert from "node:assert/strict";

import { SseParser, readEvents, HttpError } from "../../assets/sse.js";

test("events split across chunks, with CRLF, LF and CR line ends", () => {
  const parser = new SseParser();
  assert.deepEqual(parser.push("event: summary\r\nda"), []);
  assert.deepEqual(parser.push("ta: {\"count\":1}\r"), []);
  assert.deepEqual(parser.push("\n\r\n"), [{ event: "summary", data: '{"count":1}', id: null }]);
  assert.deepEqual(parser.push("data:a\ndata: b\n\nevent:lagged\rdata:{}\r\r"), [
    { event: "message", data: "a\nb", id: null },
  ]);
  // A CR at the end of a chunk may be half of a CRLF: the event completes with the next chunk.
  assert.deepEqual(parser.push(":"), [{ event: "lagged", data: "{}", id: null }]);
});

test("comments, empty events and unknown fields are skipped", () => {
  const parser = new SseParser();
  assert.deepEqual(parser.push(": keep-alive\n\nevent: x\n\nretry: 10\nid: 7\ndata\n\n"), [
    { event: "message", data: "", id: "7" },
  ]);
});

function fakeFetch(status, chunks, body = {}) {
  return async () => {
    if (status !== 200) return new Response(JSON.stringify(body), { status });
    const stream = new ReadableStream({
      start(controller) {
        for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
        controller.close();
      },
    });
    return new Response(stream, { status: 200 });
  };
}

test("readEvents sends the headers, opens, and delivers every event until the end", async () => {
  const seen = [];
  let opened = 0;
  let sentHeaders;
  const fetchImpl = async (url, init) => {
    sentHeaders = init.headers;
    return fakeFetch(200, ["event: event\ndata: {\"n\":1}\n", "\nevent: event\ndata: {\"n\":2}\n\n"])();
  };
  await readEvents("http://x/v1/stream", {
    headers: { authorization: "Bearer k" },
    onOpen: () => (opened += 1),
    onEvent: (event) => seen.push(JSON.parse(event.data).n),
    fetchImpl,
  });
  assert.equal(opened, 1);
  assert.deepEqual(seen, [1, 2]);
  assert.equal(sentHeaders.authorization, "Bearer k");
  assert.equal(sentHeaders.accept, "text/event-stream");
});

test("readEvents turns a refusal into an HttpError with the API's message", async () => {
  await assert.rejects(
    readEvents("http://x/v1/stream", { onEvent() {}, fetchImpl: fakeFetch(401, [], { error: "unknown api key" }) }),
    (err) => err instanceof HttpError && err.status === 401 && err.message === "unknown api key",
  );
});
