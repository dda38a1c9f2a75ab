// The jobs page: start a demo job and fill its progress bar from the job's channel.

import { subscribeChannel } from "./ssehub.js";

const $ = (id) => document.getElementById(id);
const list = $("jobs");

/** The percentage an event reports, or null when it reports none. */
function progressOf(data) {
  let value = data;
  try {
    value = JSON.parse(data);
  } catch {
    // Plain text: a bare number is a percentage too.
  }
  if (value && typeof value === "object") {
    value = value.progress ?? value.percent ?? value.value;
  }
  const number = Number(value);
  return value === "" || value === null || Number.isNaN(number) ? null : number;
}

function jobView(id) {
  const item = document.createElement("li");
  item.className = "job panel";
  item.dataset.testid = "job";
  item.dataset.jobId = id;
  item.dataset.status = "running";
  const title = document.createElement("span");
  title.append("Job ");
  const code = document.createElement("code");
  code.textContent = id;
  title.append(code, " ");
  const watch = document.createElement("a");
  watch.href = `/monitor?channel=${encodeURIComponent(`jobs/${id}`)}&from=start`;
  watch.textContent = "events";
  title.append(watch);
  const percent = document.createElement("span");
  percent.className = "percent";
  percent.dataset.testid = "job-percent";
  percent.textContent = "0%";
  const bar = document.createElement("progress");
  bar.max = 100;
  bar.value = 0;
  bar.dataset.testid = "job-progress";
  bar.setAttribute("aria-label", `Progress of job ${id}`);
  const detail = document.createElement("p");
  detail.className = "detail";
  detail.dataset.testid = "job-detail";
  detail.textContent = "waiting for the first event…";
  item.append(title, percent, bar, detail);
  return { item, percent, bar, detail };
}

function watch(id, channel) {
  const view = jobView(id);
  list.prepend(view.item);
  let last = 0;
  const sub = subscribeChannel(channel || `jobs/${id}`, {
    // From the start of the log: events sent between the POST and this subscription count.
    fromStart: true,
    types: ["progress"],
  });
  sub.addEventListener("event", (e) => {
    const event = e.detail;
    if (event.type === "ssehub.gap") return;
    const value = progressOf(event.data);
    if (value !== null) {
      last = Math.max(0, Math.min(100, value));
      view.bar.value = last;
      view.percent.textContent = `${Math.round(last)}%`;
    }
    if (event.type !== "close") view.detail.textContent = `${event.type}: ${event.data}`;
  });
  sub.addEventListener("state", (e) => {
    if (e.detail.state === "reconnecting") view.detail.textContent = "connection lost; resuming…";
  });
  sub.addEventListener("close", () => {
    view.item.dataset.status = last >= 100 ? "done" : "closed";
    view.detail.textContent = last >= 100 ? "done: the channel was closed" : `closed at ${last}%`;
  });
  sub.addEventListener("error", (e) => {
    view.item.dataset.status = "failed";
    view.detail.textContent = e.detail.message;
  });
}

// A server started with --publish-token wants it for starting a job (not for watching).
function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function start() {
  const status = $("status");
  const tokenInput = $("token");
  status.textContent = "";
  try {
    const delay = Number($("delay").value);
    const response = await fetch("/demo/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(Number.isFinite(delay) ? { delay } : {}),
    });
    const body = await response.json().catch(() => ({}));
    if (response.status === 401) tokenInput.setAttribute("aria-invalid", "true");
    else tokenInput.removeAttribute("aria-invalid");
    if (!response.ok) {
      const error = body.error;
      const hint = response.status === 401 ? ". Enter this server's publish token." : "";
      throw new Error(
        `HTTP ${response.status}: ${typeof error === "string" ? error : (error && error.message) || ""}${hint}`,
      );
    }
    const id = body.id || body.job_id;
    watch(id, body.channel);
  } catch (error) {
    status.textContent = `Could not start a job: ${error.message}`;
  }
}

$("start").addEventListener("click", start);
$("token").addEventListener("input", () => $("token").removeAttribute("aria-invalid"));

// `/jobs?job=ID` watches a job that is already running (or finished: its latest state).
const existing = new URLSearchParams(location.search).get("job");
if (existing) watch(existing);
