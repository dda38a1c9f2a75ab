// ssehub.js: a small browser client for Server-Sent Events. Plain ES module, no build step.
//
//   EventStreamParser  the WHATWG "Interpreting an event stream" rules, sans-IO: text in,
//                      events out (the same rules and test table as ssehub.protocol's decoder).
//   fetchEventStream   SSE over fetch, for POST bodies and headers EventSource cannot send:
//                      abort, backoff with jitter, the server's retry, resume with the last id.
//   subscribeChannel   a channel of the hub, over EventSource (or fetch): connection state,
//                      reconnect count, last id, the in-band `ssehub.gap` and `close` events.
//
// Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html

const LF = 0x0a;
const CR = 0x0d;

/** One dispatched event: `type`, `data`, and `id`, the last event ID string at dispatch. */
export class ServerSentEvent {
  constructor(type, data, id) {
    this.type = type;
    this.data = data;
    this.id = id;
  }
}

/**
 * The default bound on the characters held for one event (its data plus an unterminated
 * line), as in the Python decoder: an event stream has no length prefix, so without a
 * bound a server that never ends a line makes the client buffer without end.
 */
export const DEFAULT_MAX_EVENT_SIZE = 16 * 1024 * 1024;

/**
 * Incremental parser. Feed it decoded text in chunks of any size (a line break, even a CRLF
 * pair, may be split across chunks); it calls `onEvent` for each dispatched event.
 *
 * - `lastEventId`: the last event ID string (what a reconnect sends as Last-Event-ID).
 *   The option sets where it starts: like browsers (and ssehub's Python decoder), a
 *   resumed stream's events without an `id` keep the id the client resumed from.
 * - `retry`: the reconnection time in ms set by the stream, or null.
 * - `maxEventSize`: beyond it `feed` throws an EventStreamError and drops its state; the
 *   connection should be dropped too.
 *
 * Work is linear in the input: a partial line is kept as a list of pieces and joined once,
 * when its end arrives, so text arriving a character at a time is not re-scanned.
 */
export class EventStreamParser {
  constructor(
    onEvent,
    {
      onRetry = null,
      onComment = null,
      lastEventId = "",
      maxEventSize = DEFAULT_MAX_EVENT_SIZE,
    } = {},
  ) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.onComment = onComment;
    this.lastEventId = lastEventId;
    this.retry = null;
    this.maxEventSize = maxEventSize;
    this.end();
  }

  /** Feed a chunk of decoded text. */
  feed(text) {
    if (!this._started && text.length > 0) {
      this._started = true;
      // "One leading U+FEFF BYTE ORDER MARK character must be ignored if any are present."
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    let start = 0;
    const n = text.length;
    if (this._afterCR && n > 0) {
      // A CRLF pair split across chunks is one line break, not two.
      if (text.charCodeAt(0) === LF) start = 1;
      this._afterCR = false;
    }
    for (let i = start; i < n; i++) {
      const c = text.charCodeAt(i);
      if (c !== LF && c !== CR) continue;
      this._pieces.push(text.slice(start, i));
      const line = this._pieces.length === 1 ? this._pieces[0] : this._pieces.join("");
      this._pieces = [];
      this._pendingSize = 0;
      if (c === CR) {
        if (i + 1 < n) {
          if (text.charCodeAt(i + 1) === LF) i++;
        } else {
          this._afterCR = true;
        }
      }
      start = i + 1;
      this._line(line);
    }
    if (start < n) {
      this._pieces.push(text.slice(start));
      this._pendingSize += n - start;
      this._checkSize();
    }
  }

  _checkSize() {
    const size = this._dataSize + this._pendingSize;
    if (size > this.maxEventSize) {
      this.end();
      throw new EventStreamError(
        `server-sent event exceeds maxEventSize: ${size} characters buffered for one event ` +
          `or line, the limit is ${this.maxEventSize}`,
      );
    }
  }

  /** The stream ended: "any pending data must be discarded" (an event without its blank line). */
  end() {
    // A reconnection is a new stream: its own leading BOM is dropped too.
    this._started = false;
    this._pieces = [];
    this._pendingSize = 0;
    this._afterCR = false;
    this._data = [];
    this._dataSize = 0;
    this._hasData = false;
    this._eventType = "";
    this._idBuffer = this.lastEventId;
  }

  _line(line) {
    if (line.length === 0) {
      this._dispatch();
      return;
    }
    const colon = line.indexOf(":");
    if (colon === 0) {
      if (this.onComment) this.onComment(line.slice(1));
      return;
    }
    let field;
    let value;
    if (colon === -1) {
      // "the whole line as the field name, and the empty string as the field value".
      field = line;
      value = "";
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 0x20) value = value.slice(1);
    }
    switch (field) {
      case "event":
        this._eventType = value;
        break;
      case "data":
        this._data.push(value);
        this._hasData = true;
        this._dataSize += value.length + 1;
        this._checkSize();
        break;
      case "id":
        if (!value.includes("\0")) this._idBuffer = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) {
          this.retry = parseInt(value, 10);
          if (this.onRetry) this.onRetry(this.retry);
        }
        break;
      default:
        // Unknown fields are ignored.
        break;
    }
  }

  _dispatch() {
    // The last event ID string is set even when the event itself is not dispatched.
    this.lastEventId = this._idBuffer;
    if (!this._hasData) {
      this._eventType = "";
      return;
    }
    // Data lines are joined with LF (the spec appends LF to each and removes the last one).
    const data = this._data.join("\n");
    const type = this._eventType || "message";
    this._data = [];
    this._dataSize = 0;
    this._hasData = false;
    this._eventType = "";
    this.onEvent(new ServerSentEvent(type, data, this.lastEventId));
  }
}

/** Parse a whole stream held in a string; returns {events, retry, lastEventId}. */
export function parseEventStream(text, chunkSize = 0) {
  const events = [];
  const parser = new EventStreamParser((event) => events.push(event));
  if (chunkSize > 0) {
    for (let i = 0; i < text.length; i += chunkSize) parser.feed(text.slice(i, i + chunkSize));
  } else {
    parser.feed(text);
  }
  parser.end();
  return { events, retry: parser.retry, lastEventId: parser.lastEventId };
}

/** The response was not an event stream; `status` and `body` say what came instead. */
export class EventStreamError extends Error {
  constructor(message, { status = 0, body = "", retriable = false } = {}) {
    super(message);
    this.name = "EventStreamError";
    this.status = status;
    this.body = body;
    this.retriable = retriable;
  }
}

/**
 * Reconnection delay before attempt `attempt` (0-based): exponential from `base` ms, capped
 * at `max`, with "equal jitter" (a random point in the upper half) so that many clients cut
 * off at once do not come back at once.
 */
export function backoffDelay(attempt, base = 1000, max = 30000, random = Math.random) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 20));
  return ceiling / 2 + random() * (ceiling / 2);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(() => {
      if (signal) signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    if (signal) signal.addEventListener("abort", onAbort, { once: true });
  });
}

function isAbort(error, signal) {
  return (signal && signal.aborted) || (error && error.name === "AbortError");
}

/**
 * Stream an event stream over fetch. Resolves when the stream is finished with
 * `{outcome, lastEventId, reconnects}`, where outcome is "done" (`until` returned true),
 * "ended" (the server closed the stream and no `until` was given) or "aborted" (`signal`).
 * Rejects with an EventStreamError when the server answers with something other than an
 * event stream, or when it cannot be reached after `maxRetries` reconnects.
 *
 * Options:
 * - method, headers, body: the first request (`fetch` options).
 * - signal: an AbortSignal; aborting stops the request and any pending reconnect.
 * - onOpen(response), onEvent(event), onRetry(ms), onReconnect({attempt, delay, error}).
 * - until(event): return true on the event that ends the stream (e.g. data "[DONE]").
 * - resume(lastEventId): the request {url, method, headers, body} that continues the stream
 *   after `lastEventId`; without it a reconnect repeats the first request with a
 *   Last-Event-ID header. Reconnects happen when the connection fails or ends before
 *   `until` said done; with `until` unset, a clean end is the end.
 * - lastEventId: start after this id (sent as Last-Event-ID).
 * - retry: base reconnection delay in ms until the server sends `retry:` (default 1000).
 * - maxRetry: delay cap (default 30000); maxRetries: reconnects in a row (default 8).
 */
export async function fetchEventStream(url, options = {}) {
  const {
    method = "GET",
    headers = {},
    body = undefined,
    signal = undefined,
    onOpen = null,
    onEvent = () => {},
    onRetry = null,
    onReconnect = null,
    until = null,
    resume = null,
    lastEventId = "",
    retry = 1000,
    maxRetry = 30000,
    maxRetries = 8,
    maxEventSize = DEFAULT_MAX_EVENT_SIZE,
    fetch: fetchImpl = globalThis.fetch.bind(globalThis),
  } = options;

  let baseDelay = retry;
  let last = lastEventId;
  let request = { url, method, headers, body };
  let failures = 0;
  let reconnects = 0;
  let first = true;

  for (;;) {
    if (!first) {
      const next = resume ? resume(last) : { ...request };
      request = {
        method: "GET",
        ...next,
        headers: { ...(next.headers || {}), ...(last ? { "Last-Event-ID": last } : {}) },
      };
    } else if (last) {
      request = { ...request, headers: { ...headers, "Last-Event-ID": last } };
    }
    first = false;

    let finished = false;
    let progressed = false;
    let error = null;
    try {
      const response = await fetchImpl(request.url, {
        method: request.method,
        headers: { Accept: "text/event-stream", ...request.headers },
        body: request.body,
        signal,
        cache: "no-store",
      });
      const type = response.headers.get("content-type") || "";
      if (response.status === 204) {
        // The server says there is nothing more (a closed channel): do not come back.
        return { outcome: "ended", lastEventId: last, reconnects };
      }
      if (!response.ok || !type.toLowerCase().startsWith("text/event-stream")) {
        const text = await response.text().catch(() => "");
        throw new EventStreamError(
          response.ok
            ? `expected text/event-stream, got ${type || "no content type"}`
            : `HTTP ${response.status}: ${describeErrorBody(text)}`,
          {
            status: response.status,
            body: text,
            retriable: response.status >= 500 || response.status === 429,
          },
        );
      }
      if (onOpen) onOpen(response);
      // ignoreBOM: the parser drops the one leading BOM itself, as the spec's decoder does.
      const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
      const parser = new EventStreamParser(
        (event) => {
          last = event.id;
          progressed = true;
          onEvent(event);
          if (until && until(event)) finished = true;
        },
        {
          onRetry: (ms) => {
            baseDelay = ms;
            if (onRetry) onRetry(ms);
          },
          // An event of this connection without an `id` keeps the id it resumed from.
          lastEventId: last,
          maxEventSize,
        },
      );
      const reader = response.body.getReader();
      // fetch ties the body to the signal; a custom `fetch` may not, so cancel explicitly.
      const onAbort = () => reader.cancel().catch(() => {});
      if (signal) signal.addEventListener("abort", onAbort, { once: true });
      try {
        while (!finished) {
          const { value, done } = await reader.read();
          if (done) {
            parser.feed(decoder.decode());
            break;
          }
          parser.feed(decoder.decode(value, { stream: true }));
        }
      } finally {
        if (signal) signal.removeEventListener("abort", onAbort);
        // Done early, failed or aborted: release the connection (a no-op after its end).
        reader.cancel().catch(() => {});
        parser.end();
        last = parser.lastEventId;
      }
      if (signal && signal.aborted) return { outcome: "aborted", lastEventId: last, reconnects };
      if (finished || !until) {
        return { outcome: finished ? "done" : "ended", lastEventId: last, reconnects };
      }
      error = new EventStreamError("the stream ended before it was done", { retriable: true });
    } catch (caught) {
      if (isAbort(caught, signal)) return { outcome: "aborted", lastEventId: last, reconnects };
      if (caught instanceof EventStreamError && !caught.retriable) throw caught;
      error = caught;
    }
    // A connection that delivered events was healthy: start the backoff over.
    failures = progressed ? 0 : failures + 1;
    if (failures > maxRetries) {
      throw error instanceof EventStreamError
        ? error
        : new EventStreamError(`cannot reach the stream: ${error}`, { retriable: true });
    }
    const delay = backoffDelay(failures, baseDelay, maxRetry);
    reconnects++;
    if (onReconnect) onReconnect({ attempt: reconnects, delay, error, lastEventId: last });
    try {
      await sleep(delay, signal);
    } catch {
      return { outcome: "aborted", lastEventId: last, reconnects };
    }
  }
}

function describeErrorBody(text) {
  try {
    const parsed = JSON.parse(text);
    if (parsed && parsed.error) {
      return typeof parsed.error === "string" ? parsed.error : parsed.error.message || text;
    }
    if (parsed && parsed.detail) return String(parsed.detail);
  } catch {
    // Not JSON: show the start of it.
  }
  return text.slice(0, 200) || "(empty body)";
}

/** The URL path of a hub channel: each `/`-separated part percent-encoded. */
export function channelPath(name, base = "/channels/") {
  return base + name.split("/").map(encodeURIComponent).join("/");
}

/**
 * Subscribe to a hub channel. Returns an EventTarget with:
 * - `state`: "connecting", "open", "reconnecting" or "closed";
 * - `reconnects`, `lastEventId`;
 * - `close()`.
 * It dispatches "state" (detail: {state, reconnects}), "event" (detail: a ServerSentEvent,
 * every event including gap and close), "gap" (detail: the parsed gap JSON), "close"
 * (the channel was closed; the subscription ends) and "error" (detail: {message}).
 *
 * Options:
 * - lastEventId: start after this id (sent as `?last_event_id=`, which EventSource allows).
 * - fromStart: replay from the oldest retained event.
 * - transport: "eventsource" (default; reconnects natively with Last-Event-ID) or "fetch"
 *   (sees every event type; EventSource only reports the types it listens for).
 * - types: extra event types to listen for with EventSource ("message", "ssehub.gap" and
 *   "close" always are).
 */
export function subscribeChannel(name, options = {}) {
  const { lastEventId = "", fromStart = false, transport = "eventsource", types = [] } = options;
  const target = new EventTarget();
  target.state = "connecting";
  target.reconnects = 0;
  target.lastEventId = lastEventId;
  target.channel = name;

  const setState = (state) => {
    if (target.state === state) return;
    target.state = state;
    target.dispatchEvent(
      new CustomEvent("state", { detail: { state, reconnects: target.reconnects } }),
    );
  };
  const emit = (event) => {
    if (event.id) target.lastEventId = event.id;
    target.dispatchEvent(new CustomEvent("event", { detail: event }));
    if (event.type === "ssehub.gap") {
      let detail = null;
      try {
        detail = JSON.parse(event.data);
      } catch {
        detail = { raw: event.data };
      }
      target.dispatchEvent(new CustomEvent("gap", { detail }));
    } else if (event.type === "close") {
      target.close();
      target.dispatchEvent(new CustomEvent("close", { detail: event }));
    }
  };
  const fail = (message) => {
    target.dispatchEvent(new CustomEvent("error", { detail: { message } }));
  };

  const query = new URLSearchParams();
  if (lastEventId) query.set("last_event_id", lastEventId);
  else if (fromStart) query.set("from", "oldest");
  const qs = query.toString();
  const url = channelPath(name) + (qs ? `?${qs}` : "");

  if (transport === "fetch") {
    const controller = new AbortController();
    target.close = () => {
      controller.abort();
      setState("closed");
    };
    fetchEventStream(url, {
      signal: controller.signal,
      // Reconnect from the last id seen; the first request's query cursor is not repeated.
      resume: (last) => ({
        url: last ? channelPath(name) : url,
      }),
      until: () => target.state === "closed",
      onOpen: () => setState("open"),
      onEvent: emit,
      onReconnect: () => {
        target.reconnects++;
        setState("reconnecting");
      },
      // A subscription lasts until closed: keep coming back, the backoff caps the pace.
      maxRetries: Infinity,
    }).then(
      (result) => {
        if (result.outcome === "ended" && target.state !== "closed") {
          target.dispatchEvent(new CustomEvent("close", { detail: null }));
        }
        setState("closed");
      },
      (error) => {
        fail(error.message);
        setState("closed");
      },
    );
    return target;
  }

  const source = new EventSource(url);
  target.source = source;
  target.close = () => {
    source.close();
    setState("closed");
  };
  const listener = (message) => {
    emit(new ServerSentEvent(message.type, message.data, message.lastEventId));
  };
  for (const type of new Set(["message", "ssehub.gap", "close", ...types])) {
    source.addEventListener(type, listener);
  }
  source.addEventListener("open", () => setState("open"));
  source.addEventListener("error", () => {
    if (target.state === "closed") return;
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up: a 204 (closed channel), an error status or a wrong type.
      fail("the server ended the subscription");
      setState("closed");
    } else {
      target.reconnects++;
      setState("reconnecting");
    }
  });
  return target;
}
