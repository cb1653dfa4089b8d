// The gemma-sessions page: chat, sessions (list, fork, export, import, delete), what the cache did, the server.
// It talks to the server's public API only, with the tab's API key (sessionStorage) when the server asks for one.
// Model and user text is untrusted: it reaches the DOM through renderMarkdown / textContent only.

import { fmt, niceMax, sparkline, turnChart } from "./chart.js";
import { renderMarkdown } from "./markdown.js";

const KEY_STORE = "gemma-sessions.api-key";
const SAMPLING = [ // [metadata key, input id, request field, parse]
  ["temperature", "set-temperature", "temperature", parseFloat],
  ["top_p", "set-top-p", "top_p", parseFloat],
  ["max_output_tokens", "set-max-tokens", "max_output_tokens", (v) => parseInt(v, 10)],
  ["seed", "set-seed", "seed", (v) => parseInt(v, 10)],
];
const $ = (id) => document.getElementById(id);
// Sessions a page of the list holds: 100 (the route's most), or `?page_size=N` in the page's URL (1..100; tests use it
// to reach a second page with a handful of sessions).
const PAGE_SIZE = Math.min(100, Math.max(1,
  parseInt(new URLSearchParams(location.search).get("page_size"), 10) || 100));

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  needsKey: false,
  sessions: [], // the pages loaded so far, newest created first (GET /v1/sessions?order=desc)
  lastId: null, // the cursor of the next page: the last loaded page's last_id
  hasMore: false,
  loadingMore: false,
  listGen: 0, // bumped by each reload of the list: a page fetched for an older list is not appended to this one
  current: null, // GET /v1/sessions/{id} of the open session
  turns: [],
  stream: null, // the reply being streamed: {controller, bubble, text, deltas, stopped}
  query: "",
  sort: "used",
  statsTimer: null,
  lastStats: null,
  tput: [],
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ------------------------------------------------------------------------------------------------ API

async function api(path, { method = "GET", body, raw, signal } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let payload;
  if (raw !== undefined) { payload = raw; headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { payload = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, { method, headers, body: payload, signal });
  if (!res.ok) {
    const message = await errorMessage(res);
    if (res.status === 401) {
      askForKey(state.key ? `The server refused this key (${message}).` : "");
    }
    throw new ApiError(res.status, message);
  }
  return res;
}

async function getJSON(path, opts) {
  return (await api(path, opts)).json();
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return body?.error?.message || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

/** Server-sent events of a streamed response, as parsed JSON objects. */
async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (!data.length) continue;
      if (data.join("\n") === "[DONE]") return;
      yield JSON.parse(data.join("\n"));
    }
  }
}

// ------------------------------------------------------------------------------------------------ notices

let noticeTimer = 0;

function notify(message, kind = "error") {
  const box = $("notice");
  box.className = `notice ${kind}`;
  $("notice-text").textContent = message;
  box.hidden = false;
  clearTimeout(noticeTimer); // good news goes away by itself; an error stays until dismissed
  if (kind === "ok") noticeTimer = setTimeout(() => { box.hidden = true; }, 8000);
}

function announce(message) {
  $("status").textContent = message;
}

function fail(err, what) {
  if (err instanceof ApiError && err.status === 401) return; // the key dialog says it
  notify(`${what}: ${err.message}`);
}

// ------------------------------------------------------------------------------------------------ API key

function askForKey(error) {
  state.needsKey = true;
  $("key-button").hidden = false;
  $("key-error").textContent = error || "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function submitKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  const res = await fetch("/v1/models", { headers: { Authorization: `Bearer ${key}` } });
  if (!res.ok) {
    $("key-error").textContent = `The server refused this key (${await errorMessage(res)}).`;
    $("key-input").select();
    return;
  }
  state.key = key;
  sessionStorage.setItem(KEY_STORE, key);
  $("key-input").value = "";
  $("key-error").textContent = "";
  $("key-dialog").close();
  closeSession();
  state.sessions = []; // another key's list: start again from its first page
  state.hasMore = false;
  renderSessionList();
  await start();
}

// ------------------------------------------------------------------------------------------------ sessions

function titleOf(s) {
  return s.metadata?.title || `Untitled ${s.id.slice(0, 6)}`;
}

function ago(seconds) {
  const d = Date.now() / 1000 - seconds;
  if (d < 60) return "just now";
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

function sessionPage(after) {
  const cursor = after ? `&after=${encodeURIComponent(after)}` : "";
  return getJSON(`/v1/sessions?limit=${PAGE_SIZE}&order=desc${cursor}`);
}

/** Reload the list from its first page, as many sessions as were loaded (after a turn, a rename, a new or deleted
 * session: the older pages a user opened stay open; sorted here by use, date or title). */
async function loadSessions() {
  const key = state.key;
  const gen = ++state.listGen;
  const want = Math.max(state.sessions.length, 1);
  const sessions = [];
  let after = null;
  let more = true;
  while (more && sessions.length < want) {
    const page = await sessionPage(after);
    // fetched under the key before a change, or for a list reloaded since: not this list to show
    if (key !== state.key || gen !== state.listGen) return;
    sessions.push(...page.data);
    after = page.last_id ?? after;
    more = page.has_more && page.data.length > 0;
  }
  state.sessions = sessions;
  state.lastId = after;
  state.hasMore = more;
  renderSessionList();
}

/** The "Load more" button: append the page after the last loaded session. */
async function loadMoreSessions() {
  const key = state.key;
  const gen = state.listGen;
  const after = state.lastId;
  if (!state.hasMore || !after || state.loadingMore) return;
  // one page at a time: a second press meanwhile does nothing (not `disabled`: that would take the focus away)
  state.loadingMore = true;
  $("load-more").setAttribute("aria-busy", "true");
  let page;
  try {
    page = await sessionPage(after);
  } catch (err) {
    // the cursor's session was deleted meanwhile (400: an unknown cursor): reload the list instead
    if (err instanceof ApiError && err.status === 400 && key === state.key) return loadSessions();
    throw err;
  } finally {
    state.loadingMore = false;
    $("load-more").removeAttribute("aria-busy");
  }
  // fetched under the key before a change, or after a reload replaced the list: not this list's next page
  if (key !== state.key || gen !== state.listGen || after !== state.lastId) return;
  const known = new Set(state.sessions.map((s) => s.id));
  const added = page.data.filter((s) => !known.has(s.id));
  state.sessions.push(...added);
  state.lastId = page.last_id ?? after;
  state.hasMore = page.has_more && page.data.length > 0;
  renderSessionList();
  announce(`${added.length} more ${added.length === 1 ? "conversation" : "conversations"} loaded`);
  // the button is gone after the last page: the focus goes to the first session loaded (or the search box, where
  // the search hides it), not to the page's body
  if (!state.hasMore) {
    const first = added.length && document.querySelector(`.session-item[data-id="${CSS.escape(added[0].id)}"]`);
    (first || $("session-search")).focus();
  }
}

function sortedSessions() {
  const q = state.query.trim().toLowerCase();
  const list = state.sessions.filter((s) => !q || titleOf(s).toLowerCase().includes(q) || s.id.includes(q));
  const by = {
    used: (a, b) => (b.last_used_at ?? b.created_at) - (a.last_used_at ?? a.created_at),
    created: (a, b) => b.created_at - a.created_at,
    title: (a, b) => titleOf(a).localeCompare(titleOf(b)),
  }[state.sort];
  return list.sort(by);
}

function renderSessionList() {
  const ul = $("session-list");
  const items = sortedSessions().map((s) => {
    const li = document.createElement("li");
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "session-item";
    btn.dataset.id = s.id;
    if (state.current?.id === s.id) btn.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.className = "session-name";
    name.textContent = titleOf(s);
    const meta = document.createElement("span");
    meta.className = "session-meta";
    const turns = s.stats?.turns ?? 0;
    meta.textContent = `${turns} ${turns === 1 ? "turn" : "turns"} · ${ago(s.last_used_at ?? s.created_at)}`;
    btn.append(name, meta);
    const kind = s.metadata?.imported_from ? "imported" : s.metadata?.forked_from ? "fork" : "";
    if (kind) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = kind;
      btn.append(tag);
    }
    btn.addEventListener("click", () => openSession(s.id).catch((e) => fail(e, "Could not open it")));
    li.append(btn);
    return li;
  });
  ul.replaceChildren(...items);
  $("load-more").hidden = !state.hasMore; // search and sort see the loaded sessions; more come from the server
  $("session-empty").hidden = state.sessions.length > 0;
  $("session-empty").textContent = state.sessions.length ? "" : "No conversations yet.";
  if (state.sessions.length && !items.length) {
    $("session-empty").hidden = false;
    $("session-empty").textContent = "No conversation matches.";
  }
}

async function openSession(id, { focus = true } = {}) {
  const key = state.key;
  const s = await getJSON(`/v1/sessions/${encodeURIComponent(id)}`);
  if (key !== state.key) return; // the key changed meanwhile: not this key's session to open
  state.current = s;
  state.turns = [];
  renderChat();
  renderDetails();
  renderSessionList();
  $("details-panel").scrollTop = 0;
  setDrawer(null);
  loadTurns().catch((e) => fail(e, "Could not read the turns"));
  if (focus) $("composer-input").focus();
}

function closeSession() {
  state.current = null;
  state.turns = [];
  renderChat();
  renderDetails();
}

async function refreshCurrent() {
  if (!state.current) return;
  const id = state.current.id;
  const [s] = await Promise.all([getJSON(`/v1/sessions/${id}`), loadTurns()]);
  if (state.current?.id !== id) return;
  state.current = s;
  renderChat();
  renderDetails();
  await loadSessions();
}

async function loadTurns() {
  const id = state.current?.id;
  if (!id) return;
  const { data } = await getJSON(`/v1/sessions/${id}/turns`);
  if (state.current?.id !== id) return;
  state.turns = data;
  renderTurns();
}

async function createSession(event) {
  event.preventDefault();
  const title = $("new-name").value.trim();
  const system = $("new-system").value;
  const body = { metadata: title ? { title } : {}, items: [] };
  if (system.trim()) body.items.push({ type: "message", role: "system", content: system });
  try {
    const conv = await getJSON("/v1/conversations", { method: "POST", body });
    $("new-dialog").close();
    $("new-form").reset();
    await loadSessions();
    await openSession(conv.id.slice("conv_".length));
    announce("Conversation created");
  } catch (err) {
    $("new-dialog").close();
    fail(err, "Could not create the conversation");
  }
}

async function setMetadata(sessionId, metadata) {
  await getJSON(`/v1/conversations/conv_${sessionId}`, { method: "POST", body: { metadata } });
}

async function forkAt(messages, turn) {
  const s = state.current;
  if (!s) return;
  const query = messages === null ? "" : `?messages=${messages}`;
  try {
    const child = await getJSON(`/v1/sessions/${s.id}/fork${query}`, { method: "POST" });
    const where = turn ? `fork at turn ${turn}` : "fork";
    await setMetadata(child.id, { title: `${titleOf(s)} (${where})`.slice(0, 200) });
    await loadSessions();
    await openSession(child.id);
    announce(`Forked: ${where}`);
  } catch (err) {
    fail(err, "Could not fork");
  }
}

async function exportSession() {
  const s = state.current;
  if (!s) return;
  try {
    const res = await api(`/v1/sessions/${s.id}/export`);
    const blob = await res.blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${titleOf(s).replace(/[^\w.-]+/g, "_").slice(0, 60)}.gsession`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    notify(`Exported “${titleOf(s)}” (${fmt(blob.size)} bytes).`, "ok");
  } catch (err) {
    fail(err, "Could not export");
  }
}

async function importFile(file) {
  if (!file) return;
  const zone = $("drop-zone");
  zone.classList.add("busy");
  try {
    const s = await getJSON("/v1/sessions/import", { method: "POST", raw: await file.arrayBuffer() });
    await setMetadata(s.id, { imported_from: file.name.slice(0, 200) }).catch(() => {});
    await loadSessions();
    await openSession(s.id);
    notify(`Imported “${titleOf(s)}” from ${file.name}.`, "ok");
  } catch (err) {
    fail(err, `The server refused ${file.name}`);
  } finally {
    zone.classList.remove("busy");
    $("import-file").value = "";
  }
}

function confirmDelete() {
  const s = state.current;
  if (!s) return;
  $("confirm-text").textContent = `“${titleOf(s)}”, its history and its KV cache will be removed from the server. `
    + "This cannot be undone.";
  $("confirm-dialog").showModal();
}

async function deleteCurrent() {
  const s = state.current;
  if (!s) return;
  try {
    await api(`/v1/conversations/conv_${s.id}`, { method: "DELETE" });
    closeSession();
    await loadSessions();
    notify(`Deleted “${titleOf(s)}”.`, "ok");
  } catch (err) {
    fail(err, "Could not delete");
  }
}

async function saveSettings(event) {
  event.preventDefault();
  const s = state.current;
  if (!s) return;
  const metadata = { title: $("set-title").value.trim() };
  for (const [key, id] of SAMPLING) metadata[key] = $(id).value.trim();
  try {
    await setMetadata(s.id, metadata);
    $("settings-saved").textContent = "Saved";
    setTimeout(() => { $("settings-saved").textContent = ""; }, 2500);
    await refreshCurrent();
  } catch (err) {
    fail(err, "Could not save");
  }
}

function samplingOf(s) {
  const out = {};
  for (const [key, , field, parse] of SAMPLING) {
    const v = parse(s.metadata?.[key] ?? "");
    if (Number.isFinite(v)) out[field] = v;
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ chat

function messageNode(m, index, turn) {
  const article = document.createElement("article");
  const role = m.role === "model" ? "assistant" : "user";
  article.className = `msg ${role}`;
  article.dataset.role = role;
  if (m.id) article.dataset.id = m.id;
  if (index !== null) article.dataset.index = `${index}`;
  const head = document.createElement("div");
  head.className = "msg-head";
  const who = document.createElement("span");
  who.className = "msg-who";
  who.textContent = role === "assistant" ? "Model" : "You";
  head.append(who);
  if (role === "assistant" && index !== null) {
    const fork = document.createElement("button");
    fork.type = "button";
    fork.className = "btn tiny ghost fork-here";
    fork.textContent = "Fork here";
    const which = document.createElement("span");
    which.className = "sr-only";
    which.textContent = ` at turn ${turn}`;
    fork.append(which);
    fork.dataset.turn = `${turn}`;
    fork.addEventListener("click", () => forkAt(index + 1, turn));
    head.append(fork);
  }
  const body = document.createElement("div");
  body.className = "msg-body";
  body.append(renderMarkdown(m.text));
  article.append(head, body);
  return article;
}

function renderChat() {
  const s = state.current;
  const box = $("messages");
  const has = Boolean(s);
  $("chat-title").textContent = has ? titleOf(s) : "No conversation selected";
  for (const id of ["fork-button", "export-button", "delete-button", "send-button"]) $(id).disabled = !has;
  $("composer-input").disabled = !has;
  if (!has) {
    box.replaceChildren($("empty-chat") ?? emptyChat());
    return;
  }
  let turn = 0;
  const nodes = s.messages.map((m, i) => messageNode(m, i, m.role === "model" ? ++turn : turn));
  if (!nodes.length) {
    const p = document.createElement("p");
    p.className = "muted center";
    p.textContent = s.system ? "System prompt set. Say something to start." : "Say something to start.";
    nodes.push(p);
  }
  box.replaceChildren(...nodes);
  box.scrollTop = box.scrollHeight;
}

function emptyChat() {
  const div = document.createElement("div");
  div.id = "empty-chat";
  div.className = "empty-chat";
  const p = document.createElement("p");
  p.className = "empty-title";
  p.textContent = "Pick a conversation or start a new one.";
  div.append(p);
  return div;
}

function setStreaming(on) {
  $("send-button").hidden = on;
  $("stop-button").hidden = !on;
  $("composer").classList.toggle("streaming", on);
}

async function send() {
  const input = $("composer-input");
  const text = input.value;
  const s = state.current;
  if (!s || state.stream || !text.trim()) return;
  input.value = "";
  autosize();
  const box = $("messages");
  box.querySelector(".center")?.remove();
  box.append(messageNode({ role: "user", text }, null, 0));
  const bubble = messageNode({ role: "model", text: "" }, null, 0);
  bubble.classList.add("pending");
  bubble.dataset.deltas = "0";
  box.append(bubble);
  box.scrollTop = box.scrollHeight;
  const stream = { controller: new AbortController(), bubble, text: "", deltas: 0, stopped: false, frame: 0 };
  state.stream = stream;
  setStreaming(true);
  let error = null;
  let usage = null;
  try {
    const body = { conversation: `conv_${s.id}`, input: text, stream: true, ...samplingOf(s) };
    const res = await api("/v1/responses", { method: "POST", body, signal: stream.controller.signal });
    for await (const ev of sseEvents(res)) {
      if (ev.type === "response.output_text.delta") {
        stream.text += ev.delta;
        stream.deltas += 1;
        scheduleRender(stream);
      } else if (ev.type === "response.completed" || ev.type === "response.incomplete") {
        usage = ev.response.usage;
      } else if (ev.type === "response.failed") {
        error = ev.response.error?.message || "the generation failed";
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stream.stopped = true;
    else error = err.message;
  }
  state.stream = null;
  setStreaming(false);
  renderBubble(stream);
  bubble.classList.remove("pending");
  if (stream.stopped || error) {
    bubble.classList.add(stream.stopped ? "stopped" : "failed");
    const note = document.createElement("p");
    note.className = "msg-note";
    note.textContent = stream.stopped ? "Stopped. This turn was not kept in the session." : `Failed: ${error}`;
    bubble.append(note);
    if (!input.value) input.value = text; // to edit and send again
    announce(stream.stopped ? "Reply stopped" : `Reply failed: ${error}`);
    if (error) notify(`The reply failed: ${error}`);
    return;
  }
  const firstTurn = !s.metadata?.title && !s.messages.some((m) => m.role === "model");
  if (firstTurn) await setMetadata(s.id, { title: text.trim().replace(/\s+/g, " ").slice(0, 60) }).catch(() => {});
  await refreshCurrent().catch((e) => fail(e, "Could not refresh"));
  if (usage) {
    announce(`Reply finished: ${usage.output_tokens} tokens, ${usage.input_tokens_details?.cached_tokens ?? 0} `
             + "prompt tokens from the cache");
  }
}

function scheduleRender(stream) {
  if (stream.frame) return;
  stream.frame = requestAnimationFrame(() => { stream.frame = 0; renderBubble(stream); });
}

function renderBubble(stream) {
  const body = stream.bubble.querySelector(".msg-body");
  body.replaceChildren(renderMarkdown(stream.text));
  stream.bubble.dataset.deltas = `${stream.deltas}`;
  const box = $("messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

function stop() {
  if (state.stream) state.stream.controller.abort();
}

function autosize() {
  const input = $("composer-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight + 2, 220)}px`;
}

// ------------------------------------------------------------------------------------------------ details

function renderDetails() {
  const s = state.current;
  $("details").hidden = !s;
  $("details-empty").hidden = Boolean(s);
  if (!s) return;
  $("set-title").value = s.metadata?.title ?? "";
  $("set-system").value = s.system ?? "";
  $("set-system").placeholder = s.system ? "" : "(none)";
  for (const [key, id] of SAMPLING) $(id).value = s.metadata?.[key] ?? "";
  const st = s.stats || {};
  setStats($("session-stats"), [
    ["Replies", st.turns ?? 0, "turns"],
    ["Tokens in history", fmt(st.tokens ?? 0), "tokens"],
    ["Cache hit rate", `${Math.round((st.cache_hit_rate ?? 0) * 100)}%`, "hit-rate"],
    ["KV held", `${fmt(st.kv_tokens_held ?? 0)} tokens`, "kv-held"],
    ["Forked from", s.metadata?.forked_from ? s.metadata.forked_from.slice(0, 8) : "—", "forked-from"],
    ["Created", new Date(s.created_at * 1000).toLocaleString(), "created"],
  ]);
}

function renderTurns() {
  $("turn-chart").replaceChildren(turnChart(state.turns));
  const rows = state.turns.map((t) => {
    const tr = document.createElement("tr");
    tr.dataset.turn = `${t.turn}`;
    const cells = [t.turn, t.cached_tokens, t.prefilled_tokens, t.generated_tokens,
                   `${(t.ttft_s * 1000).toFixed(0)} ms`, `${t.decode_tokens_per_s.toFixed(0)}/s`];
    const keys = ["turn", "cached", "prefilled", "generated", "ttft", "decode"];
    cells.forEach((v, i) => {
      const td = document.createElement(i ? "td" : "th");
      if (!i) td.scope = "row";
      td.dataset.key = keys[i];
      td.textContent = `${v}`;
      tr.append(td);
    });
    return tr;
  });
  $("turn-table").tBodies[0].replaceChildren(...rows);
}

function setStats(dl, entries) {
  const nodes = [];
  for (const [label, value, key] of entries) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = `${value}`;
    dd.dataset.stat = key;
    div.append(dt, dd);
    nodes.push(div);
  }
  dl.replaceChildren(...nodes);
}

// ------------------------------------------------------------------------------------------------ server view

function showView(view) {
  const server = view === "server";
  $("chat-view").hidden = server;
  $("server-view").hidden = !server;
  document.body.classList.toggle("view-chat", !server);
  document.body.classList.toggle("view-server", server);
  $("tab-chat").setAttribute("aria-pressed", `${!server}`);
  $("tab-server").setAttribute("aria-pressed", `${server}`);
  clearInterval(state.statsTimer);
  state.statsTimer = null;
  if (server) {
    pollStats();
    state.statsTimer = setInterval(pollStats, 1000);
  }
}

async function pollStats() {
  let st;
  try {
    st = await getJSON("/v1/stats");
  } catch (err) {
    fail(err, "Could not read the server's state");
    return;
  }
  const last = state.lastStats;
  const rate = last ? Math.max(0, (st.tokens.generated_total - last.tokens.generated_total)
                                  / Math.max(st.time - last.time, 1e-3)) : 0;
  state.lastStats = st;
  state.tput = [...state.tput, rate].slice(-60);
  renderStats(st, rate);
}

function renderStats(st, rate) {
  const kv = st.kv;
  const used = kv.blocks_total ? kv.blocks_used / kv.blocks_total : 0;
  const meter = $("kv-meter");
  const fill = document.createElement("div");
  fill.className = "meter-fill";
  fill.style.width = `${(used * 100).toFixed(1)}%`;
  meter.replaceChildren(fill);
  meter.setAttribute("aria-label", `KV pool ${(used * 100).toFixed(1)}% in use`);
  const unit = kv.kind === "paged" ? "pages" : "slots";
  setStats($("kv-stats"), [
    ["In use", `${kv.blocks_used} / ${kv.blocks_total} ${unit}`, "kv-used"],
    ["Memory", `${fmt(kv.bytes_used / 2 ** 20)} / ${fmt(kv.bytes_total / 2 ** 20)} MiB`, "kv-bytes"],
    ["In the prefix cache", `${kv.blocks_cached} ${unit}`, "kv-cached"],
    ["Prefix hit rate", `${(kv.prefix_hit_rate * 100).toFixed(1)}%`, "hit-rate"],
  ]);
  setStats($("sessions-stats"), [
    ["Loaded", st.sessions.loaded, "loaded"],
    ["Busy", st.sessions.busy, "busy"],
    ["Parked (KV in memory)", st.sessions.parked, "parked"],
    ["Spilled under pressure", st.sessions.spilled_total, "spilled"],
  ]);
  setStats($("queue-stats"), [
    ["Running", st.requests.running, "running"],
    ["Waiting", `${st.requests.waiting} / ${st.requests.max_waiting}`, "waiting"],
    ["Requests", st.requests.total, "requests"],
    ["Cancelled", st.requests.cancelled, "cancelled"],
  ]);
  $("tput-now").textContent = rate.toFixed(1);
  $("tput-chart").replaceChildren(sparkline(state.tput, "Generated tokens per second, last minute"));
  $("tput-scale").textContent = `Last ${state.tput.length} s; the top of the chart is `
    + `${fmt(niceMax(Math.max(1, ...state.tput)))} tokens/s.`;
  setStats($("tput-stats"), [
    ["Generated", fmt(st.tokens.generated_total), "generated"],
    ["Prefilled", fmt(st.tokens.prefilled_total), "prefilled"],
    ["Average since start", `${st.tokens.generated_per_s_avg.toFixed(1)} tok/s`, "avg"],
    ["Store writes waiting", st.store ? st.store.pending_snapshots : "no store", "store"],
  ]);
  const now = new Date().toLocaleTimeString();
  $("server-updated").textContent = `${st.model} · up ${fmt(st.uptime_s)} s · updated ${now}`;
}

// ------------------------------------------------------------------------------------------------ layout

function setDrawer(which) {
  document.body.classList.toggle("sessions-open", which === "sessions");
  document.body.classList.toggle("details-open", which === "details");
  $("toggle-sessions").setAttribute("aria-expanded", `${which === "sessions"}`);
  $("toggle-details").setAttribute("aria-expanded", `${which === "details"}`);
}

function toggleDrawer(which) {
  const open = document.body.classList.contains(`${which}-open`);
  setDrawer(open ? null : which);
  if (!open) showView("chat");
}

function wire() {
  $("toggle-sessions").addEventListener("click", () => toggleDrawer("sessions"));
  document.querySelector(".skip-link").addEventListener("click", (e) => {
    e.preventDefault();
    showView("chat");
    $("composer-input").focus();
  });
  $("toggle-details").addEventListener("click", () => toggleDrawer("details"));
  $("tab-chat").addEventListener("click", () => showView("chat"));
  $("tab-server").addEventListener("click", () => { setDrawer(null); showView("server"); });
  $("key-button").addEventListener("click", () => askForKey(""));
  $("key-form").addEventListener("submit", (e) => submitKey(e).catch((err) => {
    $("key-error").textContent = err.message;
  }));
  $("notice-close").addEventListener("click", () => { $("notice").hidden = true; });
  $("new-session").addEventListener("click", () => { $("new-dialog").showModal(); $("new-name").focus(); });
  $("new-cancel").addEventListener("click", () => $("new-dialog").close());
  $("new-form").addEventListener("submit", createSession);
  $("session-search").addEventListener("input", (e) => { state.query = e.target.value; renderSessionList(); });
  $("session-sort").addEventListener("change", (e) => { state.sort = e.target.value; renderSessionList(); });
  $("load-more").addEventListener("click", () => loadMoreSessions().catch((e) => fail(e, "Could not load more")));
  $("fork-button").addEventListener("click", () => forkAt(null, 0));
  $("export-button").addEventListener("click", exportSession);
  $("delete-button").addEventListener("click", confirmDelete);
  $("confirm-dialog").addEventListener("close", () => {
    if ($("confirm-dialog").returnValue === "delete") deleteCurrent();
    $("confirm-dialog").returnValue = "";
  });
  $("settings-form").addEventListener("submit", saveSettings);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("stop-button").addEventListener("click", stop);
  const input = $("composer-input");
  input.addEventListener("input", autosize);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (state.stream) { e.preventDefault(); stop(); }
    else if (document.body.classList.contains("sessions-open") || document.body.classList.contains("details-open")) {
      setDrawer(null);
    }
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    importFile(e.dataTransfer?.files?.[0]);
  });
  $("import-file").addEventListener("change", (e) => importFile(e.target.files[0]));
}

async function start() {
  try {
    const models = await getJSON("/v1/models");
    $("key-button").hidden = !state.key; // a key works here: it can be changed for this tab
    $("model-name").textContent = models.data[0]?.id ?? "";
    await loadSessions();
    document.body.dataset.ready = "true";
  } catch (err) {
    fail(err, "Could not reach the server");
  }
}

wire();
start();
