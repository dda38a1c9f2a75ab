// The chat page: streams replies from /v1/chat/completions and survives a reload.
//
// The conversation, and for a reply in flight its completion id and the id of the last
// event applied, are saved to sessionStorage after every event, in one write with the text
// they produced. A reload therefore resumes from exactly that event through
// GET /v1/chat/completions/{id}/stream with Last-Event-ID: nothing lost, nothing doubled.
//
// A server started with --api-key wants "Authorization: Bearer <key>" on every /v1 call;
// the key typed in the API key field is sent with each one and kept for the tab.

import { EventStreamError, fetchEventStream } from "./ssehub.js";
import { renderMarkdown } from "./markdown.js";

const STORE_KEY = "ssehub.chat.v1";
// Apart from the conversation, so that New chat keeps it.
const API_KEY_STORE = "ssehub.chat.api-key.v1";
const DEFAULT_MODEL = "ssehub-demo";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const modelSelect = $("model");
const statusLine = $("status");
const apiKeyInput = $("api-key");

const resumeUrl = (id) => `/v1/chat/completions/${encodeURIComponent(id)}/stream`;
const cancelUrl = (id) => `/v1/chat/completions/${encodeURIComponent(id)}/cancel`;

let state = load();
let views = [];
let active = null; // {index, controller} while a reply streams
let renderQueued = new Set();
// Set when the page goes away (reload, navigation): the stream it cuts must not be saved
// as stopped or failed, so that the next load resumes it.
let leaving = false;

function load() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch {
    // A corrupt entry is dropped rather than breaking the page.
  }
  return { model: DEFAULT_MODEL, messages: [], pending: null };
}

function save() {
  try {
    sessionStorage.setItem(STORE_KEY, JSON.stringify(state));
  } catch {
    // Storage full or disabled: the page works, a reload just cannot resume.
  }
}

function setStatus(text) {
  statusLine.textContent = text;
}

// ---- the API key -----------------------------------------------------------------------

function loadApiKey() {
  try {
    apiKeyInput.value = sessionStorage.getItem(API_KEY_STORE) || "";
  } catch {
    // Storage disabled: the key lasts as long as the page.
  }
}

function saveApiKey() {
  try {
    if (apiKeyInput.value) sessionStorage.setItem(API_KEY_STORE, apiKeyInput.value);
    else sessionStorage.removeItem(API_KEY_STORE);
  } catch {
    // As above.
  }
}

function authHeaders() {
  const key = apiKeyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The server's message for a failed call; for a 401, with what to do about it. */
function explain(status, message) {
  if (status !== 401) return message;
  apiKeyInput.setAttribute("aria-invalid", "true");
  return `${message} Enter this server's key in the API key field above.`;
}

function keyAccepted() {
  apiKeyInput.removeAttribute("aria-invalid");
}

// ---- rendering -------------------------------------------------------------------------

function messageView(message) {
  const article = document.createElement("article");
  article.className = `message ${message.role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = message.role === "user" ? "You" : message.model || "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant") content.dataset.testid = "reply";
  article.append(who, content);
  const view = { article, content, meta: null, error: null };
  if (message.role === "assistant") {
    view.meta = document.createElement("p");
    view.meta.className = "meta";
    view.meta.dataset.testid = "reply-meta";
    view.error = document.createElement("p");
    view.error.className = "error";
    view.error.dataset.testid = "reply-error";
    view.error.setAttribute("role", "alert");
    article.append(view.meta, view.error);
  }
  return view;
}

function describe(message) {
  const meta = message.meta || {};
  const parts = [];
  if (message.status === "stopped") parts.push("stopped");
  if (meta.ttftMs != null) parts.push(`first token ${meta.ttftMs} ms`);
  if (meta.resumed) parts.push(`resumed ${meta.resumed}×`);
  if (meta.usage) {
    const u = meta.usage;
    parts.push(`${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`);
    // Tokens per second of generation: from the first token on, when that time is known.
    const generating = (meta.durationMs || 0) - (meta.ttftMs || 0);
    if (generating > 0 && u.completion_tokens && !meta.resumed) {
      parts.push(`${((u.completion_tokens * 1000) / generating).toFixed(0)} tokens/s`);
    }
  }
  if (meta.durationMs != null) parts.push(`${(meta.durationMs / 1000).toFixed(1)} s`);
  return parts.join(" · ");
}

function renderMessage(index) {
  const message = state.messages[index];
  const view = views[index];
  if (!message || !view) return;
  if (message.role === "user") {
    view.content.textContent = message.content;
    return;
  }
  const streaming = message.status === "streaming";
  renderMarkdown(message.content, view.content);
  view.article.classList.toggle("streaming", streaming);
  view.article.dataset.status = message.status;
  // Assistive technology announces the reply once, when it is complete.
  view.content.setAttribute("aria-busy", String(streaming));
  view.meta.textContent = streaming ? "" : describe(message);
  view.error.textContent = message.error || "";
}

function renderAll() {
  const nearBottom = isNearBottom();
  views = state.messages.map(messageView);
  conversation.replaceChildren(...views.map((view) => view.article));
  if (!views.length) conversation.append(emptyNote);
  state.messages.forEach((_, index) => renderMessage(index));
  if (nearBottom) conversation.scrollTop = conversation.scrollHeight;
}

function queueRender(index) {
  if (renderQueued.has(index)) return;
  renderQueued.add(index);
  requestAnimationFrame(() => {
    renderQueued.delete(index);
    const nearBottom = isNearBottom();
    renderMessage(index);
    if (nearBottom) conversation.scrollTop = conversation.scrollHeight;
  });
}

function isNearBottom() {
  return conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 80;
}

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
  modelSelect.disabled = busy;
}

const emptyNote = $("empty");

// ---- streaming -------------------------------------------------------------------------

function apply(message, event) {
  const pending = state.pending;
  if (event.data === "[DONE]") return;
  let chunk;
  try {
    chunk = JSON.parse(event.data);
  } catch {
    return; // Not a chunk (a future event type): nothing to show.
  }
  if (chunk.error) {
    message.status = "error";
    message.error = chunk.error.message || String(chunk.error);
  }
  if (chunk.id && !pending.completionId) {
    pending.completionId = chunk.id;
    message.completionId = chunk.id;
  }
  for (const choice of chunk.choices || []) {
    if (choice.index !== 0 && choice.index !== undefined) continue;
    const text = choice.delta ? choice.delta.content : choice.text;
    if (text) {
      if (message.meta.ttftMs == null && !message.meta.resumed) {
        message.meta.ttftMs = Date.now() - pending.startedAt;
      }
      message.content += text;
    }
    if (choice.finish_reason) message.meta.finishReason = choice.finish_reason;
  }
  if (chunk.usage) message.meta.usage = chunk.usage;
}

function stream(index, request) {
  const message = state.messages[index];
  const controller = new AbortController();
  active = { index, controller };
  setBusy(true);
  fetchEventStream(request.url, {
    ...request,
    signal: controller.signal,
    until: (event) => event.data === "[DONE]" || message.status === "error",
    resume: () => {
      if (!state.pending || !state.pending.completionId) {
        throw new EventStreamError("The connection was lost before the reply started.");
      }
      return { url: resumeUrl(state.pending.completionId), headers: authHeaders() };
    },
    onEvent: (event) => {
      apply(message, event);
      // The text and the id it was built up to are saved together, in one write.
      state.pending.lastEventId = event.id;
      save();
      queueRender(index);
    },
    onReconnect: ({ delay }) => setStatus(`Connection lost; resuming in ${Math.round(delay)} ms…`),
    onOpen: (response) => {
      // The gateway names the completion in a header, so Stop and a reload work even
      // before the first chunk has arrived.
      keyAccepted();
      const id = response.headers.get("ssehub-completion-id");
      if (id && state.pending && !state.pending.completionId) {
        state.pending.completionId = id;
        message.completionId = id;
        save();
      }
      setStatus("");
    },
    maxRetries: 5,
  })
    .then((result) => {
      if (leaving) return;
      if (result.outcome === "aborted") {
        message.status = "stopped";
      } else if (message.status === "streaming") {
        message.status = "done";
      }
    })
    .catch((error) => {
      if (leaving) return;
      message.status = "error";
      message.error = explain(error.status, error.message || String(error));
    })
    .finally(() => {
      if (leaving) return;
      if (state.pending) message.meta.durationMs = Date.now() - state.pending.startedAt;
      state.pending = null;
      active = null;
      save();
      renderMessage(index);
      setBusy(false);
      setStatus("");
    });
}

function send() {
  const text = prompt.value.trim();
  if (!text || active) return;
  prompt.value = "";
  autosize();
  const history = state.messages
    .filter((m) => m.content && (m.role === "user" || m.status !== "error"))
    .map((m) => ({ role: m.role, content: m.content }));
  const model = modelSelect.value || DEFAULT_MODEL;
  state.model = model;
  state.messages.push({ role: "user", content: text });
  state.messages.push({ role: "assistant", model, content: "", status: "streaming", meta: {} });
  const index = state.messages.length - 1;
  state.pending = { index, completionId: null, lastEventId: "", startedAt: Date.now() };
  save();
  renderAll();
  conversation.scrollTop = conversation.scrollHeight;
  stream(index, {
    url: "/v1/chat/completions",
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({
      model,
      messages: [...history, { role: "user", content: text }],
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
}

function stop() {
  if (!active) return;
  const id = state.pending && state.pending.completionId;
  // Cancel on the server too: aborting alone would leave it generating for the detach grace.
  if (id) {
    fetch(cancelUrl(id), { method: "POST", keepalive: true, headers: authHeaders() }).catch(
      () => {},
    );
  }
  active.controller.abort();
}

function resumePending() {
  const pending = state.pending;
  const message = pending && state.messages[pending.index];
  if (!message || message.status !== "streaming") {
    state.pending = null;
    return;
  }
  if (!pending.completionId) {
    message.status = "error";
    message.error = "The page was reloaded before the reply started; send the message again.";
    state.pending = null;
    save();
    return;
  }
  message.meta.resumed = (message.meta.resumed || 0) + 1;
  stream(pending.index, {
    url: resumeUrl(pending.completionId),
    method: "GET",
    headers: authHeaders(),
    lastEventId: pending.lastEventId,
  });
}

// ---- models ----------------------------------------------------------------------------

let modelsNotice = "";

async function loadModels() {
  try {
    const response = await fetch("/v1/models", {
      headers: { Accept: "application/json", ...authHeaders() },
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = body.error && body.error.message ? `: ${body.error.message}` : "";
      modelsNotice = explain(
        response.status,
        `Could not list the models (HTTP ${response.status}${detail}); using ${DEFAULT_MODEL}.`,
      );
      setStatus(modelsNotice);
      return;
    }
    keyAccepted();
    // The notice of an earlier failed attempt goes; any other status line stays.
    if (modelsNotice && statusLine.textContent === modelsNotice) setStatus("");
    modelsNotice = "";
    const ids = (body.data || []).map((m) => m.id).filter(Boolean);
    if (!ids.length) return;
    modelSelect.replaceChildren(
      ...ids.map((id) => {
        const option = document.createElement("option");
        option.value = id;
        option.textContent = id;
        return option;
      }),
    );
    modelSelect.value = ids.includes(state.model) ? state.model : ids[0];
    prompt.placeholder = `Message ${modelSelect.value}`;
  } catch (error) {
    modelsNotice = `Could not list the models (${error.message}); using ${DEFAULT_MODEL}.`;
    setStatus(modelsNotice);
  }
}

// ---- wiring ----------------------------------------------------------------------------

function autosize() {
  prompt.style.height = "auto";
  prompt.style.height = `${Math.min(prompt.scrollHeight, 192)}px`;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
prompt.addEventListener("input", autosize);
stopButton.addEventListener("click", stop);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && active) stop();
});
modelSelect.addEventListener("change", () => {
  state.model = modelSelect.value;
  prompt.placeholder = `Message ${modelSelect.value}`;
  save();
});
apiKeyInput.addEventListener("input", () => {
  keyAccepted(); // the mark was for the key as it was
  saveApiKey();
});
// A key entered (or changed) is tried at once: the models it unlocks are listed.
apiKeyInput.addEventListener("change", loadModels);
$("new-chat").addEventListener("click", () => {
  stop();
  state = { model: state.model, messages: [], pending: null };
  save();
  renderAll();
  prompt.focus();
});

addEventListener("pagehide", () => {
  leaving = true;
});
addEventListener("pageshow", (event) => {
  // Back from the back/forward cache with a stream cut off: start over from storage.
  if (event.persisted && leaving) location.reload();
});

loadApiKey();
renderAll();
loadModels();
resumePending();
prompt.focus();
