// The channel monitor: subscribe to a channel, watch its events, publish to it.

import { channelPath, subscribeChannel } from "./ssehub.js";

// The table keeps the newest rows only, so a busy channel cannot grow the page without end.
const MAX_ROWS = 500;

const $ = (id) => document.getElementById(id);
const channelInput = $("channel");
const stateBadge = $("state");
const rows = $("events");
let subscription = null;
let count = 0;

function time() {
  const now = new Date();
  return `${now.toLocaleTimeString([], { hour12: false })}.${String(now.getMilliseconds()).padStart(3, "0")}`;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function addRow(event) {
  const tr = document.createElement("tr");
  tr.dataset.testid = "event";
  tr.dataset.type = event.type;
  if (event.type === "ssehub.gap" || event.type === "close") tr.classList.add("special");
  tr.append(cell(time(), "time"), cell(event.id, "id"), cell(event.type, "type"));
  tr.append(cell(event.data, "data"));
  rows.prepend(tr);
  while (rows.children.length > MAX_ROWS) rows.lastElementChild.remove();
  count++;
  $("count").textContent = String(count);
}

function showState(state) {
  stateBadge.textContent = state;
  stateBadge.dataset.state = state;
  const live = state === "open" || state === "connecting" || state === "reconnecting";
  $("unsubscribe").disabled = !live;
}

function subscribe() {
  if (subscription) subscription.close();
  const name = channelInput.value.trim();
  $("notice").textContent = "";
  $("reconnects").textContent = "0";
  const sub = subscribeChannel(name, {
    lastEventId: $("cursor").value.trim(),
    fromStart: $("from-start").checked,
    transport: $("transport").value,
  });
  subscription = sub;
  showState(sub.state);
  sub.addEventListener("state", (e) => {
    if (sub !== subscription) return;
    showState(e.detail.state);
    $("reconnects").textContent = String(e.detail.reconnects);
  });
  sub.addEventListener("event", (e) => {
    if (sub !== subscription) return;
    addRow(e.detail);
    if (e.detail.id) $("last-id").textContent = e.detail.id;
  });
  sub.addEventListener("gap", (e) => {
    if (sub !== subscription) return;
    const oldest = e.detail && e.detail.oldest_id;
    $("notice").textContent = oldest
      ? ` · some events were no longer retained; replay starts at ${oldest}`
      : " · the cursor is not in the retained log; replaying what is kept";
  });
  sub.addEventListener("close", () => {
    if (sub === subscription) $("notice").textContent = " · the channel was closed";
  });
  sub.addEventListener("error", (e) => {
    if (sub === subscription) $("notice").textContent = ` · ${e.detail.message}`;
  });
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function describeFailure(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    return `HTTP ${response.status}: ${typeof error === "string" ? error : (error && error.message) || text}`;
  } catch {
    return `HTTP ${response.status}: ${text.slice(0, 200)}`;
  }
}

async function publish() {
  const result = $("publish-result");
  const name = channelInput.value.trim();
  const event = $("event-type").value.trim();
  const body = { data: $("publish-data").value };
  if (event) body.event = event;
  try {
    const response = await fetch(channelPath(name), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      result.textContent = await describeFailure(response);
      return;
    }
    const answer = await response.json();
    const ids = answer.ids || (answer.id ? [answer.id] : []);
    result.textContent = `Published to ${name}: id ${ids.join(", ")}`;
  } catch (error) {
    result.textContent = `Could not publish: ${error.message}`;
  }
}

async function closeChannel() {
  const result = $("publish-result");
  const name = channelInput.value.trim();
  try {
    const response = await fetch(channelPath(name), { method: "DELETE", headers: authHeaders() });
    result.textContent = response.ok
      ? `Closed ${name}`
      : await describeFailure(response);
  } catch (error) {
    result.textContent = `Could not close: ${error.message}`;
  }
}

$("subscribe-form").addEventListener("submit", (event) => {
  event.preventDefault();
  subscribe();
});
$("unsubscribe").addEventListener("click", () => {
  if (subscription) subscription.close();
});
$("publish-form").addEventListener("submit", (event) => {
  event.preventDefault();
  publish();
});
$("publish-data").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    publish();
  }
});
$("close-channel").addEventListener("click", closeChannel);
$("clear").addEventListener("click", () => {
  rows.replaceChildren();
  count = 0;
  $("count").textContent = "0";
});

// `/monitor?channel=NAME` subscribes straight away (links from the jobs page use it).
const params = new URLSearchParams(location.search);
if (params.get("channel")) {
  channelInput.value = params.get("channel");
  if (params.get("from") === "start") $("from-start").checked = true;
  subscribe();
}
