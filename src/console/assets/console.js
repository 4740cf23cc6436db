// otnd's console: reads otnd's console API (JSON, and server-sent events for a send's progress)
// with the API key the user gives, kept in this tab's session storage and sent as a header only.
// The DOM is built with createElement and textContent alone: whatever otnd returns (a topic, a
// story, Facebook's words) is shown as text, never parsed as HTML.

const KEY_STORAGE = "otnd.console.apiKey";
const REFRESH_MS = 3000;
const DELIVERIES_PAGE = 50;

const state = {
  whoami: null,
  pageId: null,
  // send id -> { card, parts, send }
  cards: new Map(),
  // send id -> AbortController of its open progress stream
  streams: new Map(),
  deliveries: { sendId: null, token: "" },
  refreshTimer: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "className") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `otnd answered HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

async function api(path, method = "GET") {
  const response = await fetch(`/console/api${path}`, {
    method,
    headers: headers(),
    cache: "no-store",
    credentials: "omit",
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, body);
    if (response.status === 401) askForKey(error.message);
    throw error;
  }
  return body;
}

const enc = encodeURIComponent;

function status(message, isError = false) {
  const line = $("status");
  line.textContent = message;
  line.classList.toggle("error", isError);
}

function fail(error) {
  if (error && error.name === "AbortError") return;
  status(error && error.message ? error.message : String(error), true);
}

// ---- signing in ----

function askForKey(message = "") {
  stopEverything();
  $("main").hidden = true;
  $("login").hidden = false;
  $("role").hidden = true;
  $("forget-key").hidden = true;
  $("login-error").textContent = message;
  $("key").focus();
}

function useKey() {
  const key = $("key").value.trim();
  if (!key) {
    $("login-error").textContent = "Enter an API key.";
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key").value = "";
  start().catch(fail);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  askForKey("");
}

// ---- the page ----

async function start() {
  const whoami = await api("/whoami");
  state.whoami = whoami;
  if (whoami.keys_required && !whoami.role) {
    askForKey(apiKey() ? "That key is not one of otnd's." : "");
    return;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  const role = $("role");
  role.hidden = false;
  role.textContent = whoami.keys_required ? `role: ${whoami.role}` : "no API keys (loopback)";
  role.dataset.role = whoami.role || "open";
  $("forget-key").hidden = !whoami.keys_required;
  await loadPages();
  scheduleRefresh();
}

function canSteer() {
  return Boolean(state.whoami && state.whoami.can_steer);
}

async function loadPages() {
  const { pages } = await api("/pages?page_size=1000");
  const list = $("page-list");
  list.replaceChildren();
  $("no-pages").hidden = pages.length > 0;
  for (const page of pages) {
    const button = el("button", {
      type: "button",
      className: "page-link",
      dataset: { pageId: page.page_id },
      onclick: () => selectPage(page.page_id).catch(fail),
    }, el("span", { className: "page-name", text: page.name }),
       el("span", { className: "muted mono", text: `${page.page_id} · ${page.send_rate_per_second}/s` }));
    list.append(el("li", {}, button));
  }
  const wanted = pages.find((p) => p.page_id === state.pageId) || pages[0];
  if (wanted) await selectPage(wanted.page_id);
}

async function selectPage(pageId) {
  if (state.pageId !== pageId) {
    stopEverything();
    state.pageId = pageId;
    $("sends").replaceChildren();
    closeDeliveries();
  }
  for (const link of document.querySelectorAll(".page-link")) {
    link.classList.toggle("selected", link.dataset.pageId === pageId);
  }
  const current = document.querySelector(".page-link.selected .page-name");
  $("page-title").textContent = current ? current.textContent : pageId;
  await refreshPage();
}

async function refreshPage() {
  const pageId = state.pageId;
  if (!pageId) return;
  const [topics, stories, sends] = await Promise.all([
    api(`/pages/${enc(pageId)}/topics`),
    api(`/pages/${enc(pageId)}/stories?page_size=1000`),
    api(`/pages/${enc(pageId)}/sends?page_size=1000`),
  ]);
  if (pageId !== state.pageId) return;
  renderTopics(topics.topics);
  renderStories(stories.stories);
  renderSends(sends.sends);
  status(`Updated ${new Date().toLocaleTimeString()}`);
}

function scheduleRefresh() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(async () => {
    try {
      await refreshPage();
    } catch (error) {
      fail(error);
    }
    if (!$("main").hidden) scheduleRefresh();
  }, REFRESH_MS);
}

function stopEverything() {
  clearTimeout(state.refreshTimer);
  for (const controller of state.streams.values()) controller.abort();
  state.streams.clear();
  state.cards.clear();
  $("sends").replaceChildren();
}

// ---- topics and stories ----

function number(n) {
  return Number(n).toLocaleString("en-US");
}

function renderTopics(topics) {
  const body = $("topics").tBodies[0];
  body.replaceChildren();
  if (topics.length === 0) {
    body.append(el("tr", {}, el("td", { colspan: 9, className: "muted", text: "No opt-ins yet." })));
  }
  for (const t of topics) {
    body.append(el("tr", { className: "topic" },
      el("td", { className: "topic-name", text: t.topic }),
      el("td", { className: "num", text: number(t.active) }),
      el("td", { className: "num", text: number(t.reserved) }),
      el("td", { className: "num", text: number(t.used) }),
      el("td", { className: "num", text: number(t.expired) }),
      el("td", { className: "num", text: number(t.rejected) }),
      el("td", { className: "num", text: number(t.expiring_soon) }),
      el("td", { className: "num", text: number(t.recurring_active) }),
      el("td", { className: "num", text: number(t.stopped) })));
  }
}

function renderStories(stories) {
  const body = $("stories").tBodies[0];
  body.replaceChildren();
  if (stories.length === 0) {
    body.append(el("tr", {}, el("td", { colspan: 4, className: "muted", text: "No stories yet." })));
  }
  for (const s of stories) {
    let review = "not reviewed";
    let kind = "bad";
    if (s.reviewed) {
      review = `reviewed by ${s.reviewer_psid || "?"}`;
      kind = "good";
    } else if (s.changed_since_review) {
      review = "changed since review";
    }
    body.append(el("tr", { className: "story", dataset: { storyId: s.story_id } },
      el("td", { className: "topic-name", text: s.topic }),
      el("td", { className: "story-text", text: s.text }),
      el("td", {}, el("span", { className: `badge ${kind}`, text: review })),
      el("td", { text: s.state })));
  }
}

// ---- sends ----

const STEERING = {
  pause: { label: "Pause", allowed: ["queued", "running"] },
  resume: { label: "Resume", allowed: ["paused", "halted"] },
  cancel: { label: "Cancel", allowed: ["queued", "running", "paused", "halted"] },
};

function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds <= 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}

function renderSends(sends) {
  $("no-sends").hidden = sends.length > 0;
  const container = $("sends");
  // Newest first.
  for (const send of [...sends].reverse()) {
    let entry = state.cards.get(send.send_id);
    if (!entry) {
      entry = makeCard(send);
      state.cards.set(send.send_id, entry);
    }
    container.append(entry.card);
    // An open stream is fresher than the list.
    if (!state.streams.has(send.send_id)) updateSend(send);
    if (!send.progress.finished && !state.streams.has(send.send_id)) watch(send.send_id);
  }
}

function makeCard(send) {
  const parts = {
    state: el("span", { className: "state" }),
    percent: el("span", { className: "percent" }),
    bar: el("progress", { className: "bar", max: 1, value: 0 }),
    counts: el("div", { className: "counts" }),
    lastError: el("div", { className: "last-error" }),
    buttons: el("div", { className: "buttons" }),
  };
  const steer = {};
  if (canSteer()) {
    for (const [command, { label }] of Object.entries(STEERING)) {
      steer[command] = el("button", {
        type: "button",
        className: `steer ${command}`,
        onclick: () => steerSend(send.send_id, command),
      }, label);
      parts.buttons.append(steer[command]);
    }
  }
  parts.buttons.append(el("button", {
    type: "button",
    className: "quiet show-deliveries",
    onclick: () => openDeliveries(send.send_id).catch(fail),
  }, "Deliveries"));
  const card = el("article", { className: "send", dataset: { sendId: send.send_id } },
    el("div", { className: "send-head" },
      el("span", { className: "send-topic", text: send.topic }),
      el("span", { className: "mono muted send-id", text: send.send_id }),
      parts.state),
    el("div", { className: "bar-row" }, parts.bar, parts.percent),
    parts.counts,
    parts.lastError,
    parts.buttons);
  return { card, parts, steer, send };
}

function updateSend(send) {
  const entry = state.cards.get(send.send_id);
  if (!entry) return;
  entry.send = send;
  updateProgress(send.send_id, send.progress);
}

function updateProgress(sendId, p) {
  const entry = state.cards.get(sendId);
  if (!entry) return;
  const { parts, steer } = entry;
  const done = p.sent + p.failed + p.skipped + p.unknown;
  const fraction = p.total > 0 ? done / p.total : p.finished ? 1 : 0;
  const percent = Math.floor(fraction * 1000) / 10;
  parts.bar.max = Math.max(p.total, 1);
  parts.bar.value = p.total > 0 ? done : fraction;
  parts.percent.textContent = `${percent.toFixed(1)}%`;
  parts.state.textContent = p.state;
  parts.state.dataset.state = p.state;
  entry.card.dataset.state = p.state;
  const rate = p.state === "running" ? `${p.rate_per_second.toFixed(1)}/s` : "–";
  const eta = p.state === "running" ? duration(p.eta_seconds) : "–";
  parts.counts.replaceChildren(
    count("sent", p.sent), count("failed", p.failed), count("skipped", p.skipped),
    count("unknown", p.unknown), count("pending", p.pending + p.in_flight),
    count("total", p.total), label("rate", rate), label("ETA", eta));
  parts.lastError.textContent = p.last_error ? `Last error: ${p.last_error}` : "";
  for (const [command, button] of Object.entries(steer)) {
    button.hidden = !STEERING[command].allowed.includes(p.state);
  }
}

function count(name, value) {
  return label(name, number(value));
}

function label(name, value) {
  return el("span", { className: `count ${name.toLowerCase()}` },
    el("span", { className: "count-name", text: name }), el("span", { className: "count-value", text: value }));
}

async function steerSend(sendId, command) {
  try {
    const send = await api(`/sends/${enc(sendId)}/${command}`, "POST");
    updateSend(send);
    status(`Send ${sendId}: ${command} done, now ${send.state}.`);
    if (!send.progress.finished && !state.streams.has(sendId)) watch(sendId);
  } catch (error) {
    fail(error);
  }
}

// A send's progress as server-sent events, read with fetch so that the key travels in a header.
async function watch(sendId) {
  const controller = new AbortController();
  state.streams.set(sendId, controller);
  try {
    const response = await fetch(`/console/api/sends/${enc(sendId)}/events`, {
      headers: { ...headers(), Accept: "text/event-stream" },
      cache: "no-store",
      credentials: "omit",
      signal: controller.signal,
    });
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = null;
      }
      throw new ApiError(response.status, body);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatch(sendId, block);
      }
    }
  } catch (error) {
    fail(error);
  } finally {
    if (state.streams.get(sendId) === controller) state.streams.delete(sendId);
  }
}

function dispatch(sendId, block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (event === "progress" && data.length > 0) updateProgress(sendId, JSON.parse(data.join("\n")));
}

// ---- deliveries ----

async function openDeliveries(sendId) {
  state.deliveries = { sendId, token: "" };
  $("deliveries-panel").hidden = false;
  $("deliveries-send").textContent = sendId;
  $("deliveries").tBodies[0].replaceChildren();
  await moreDeliveries();
  $("deliveries-panel").scrollIntoView({ block: "nearest" });
}

function closeDeliveries() {
  state.deliveries = { sendId: null, token: "" };
  $("deliveries-panel").hidden = true;
}

async function moreDeliveries() {
  const { sendId, token } = state.deliveries;
  if (!sendId) return;
  const filter = $("delivery-state").value;
  const query = new URLSearchParams({ page_size: String(DELIVERIES_PAGE) });
  if (filter) query.set("state", filter);
  if (token) query.set("page_token", token);
  const page = await api(`/sends/${enc(sendId)}/deliveries?${query}`);
  if (state.deliveries.sendId !== sendId) return;
  const body = $("deliveries").tBodies[0];
  for (const d of page.deliveries) {
    body.append(el("tr", { className: "delivery", dataset: { state: d.state } },
      el("td", { className: "mono", text: d.delivery_id }),
      el("td", { className: "mono", text: d.psid }),
      el("td", { text: d.route }),
      el("td", {}, el("span", { className: "state", dataset: { state: d.state }, text: d.state })),
      el("td", { className: "num", text: d.attempts }),
      el("td", { className: "mono", text: d.message_id || "" }),
      el("td", { className: "num", text: d.error_code ?? "" }),
      el("td", { className: "num", text: d.error_subcode ?? "" }),
      el("td", { className: "reason", text: d.error_message || "" })));
  }
  if (page.deliveries.length === 0 && !token) {
    body.append(el("tr", {}, el("td", { colspan: 9, className: "muted", text: "None." })));
  }
  state.deliveries.token = page.next_page_token;
  $("deliveries-more").hidden = !page.next_page_token;
}

// ---- wiring ----

$("sign-in").addEventListener("click", useKey);
$("key").addEventListener("keydown", (event) => {
  if (event.key === "Enter") useKey();
});
$("forget-key").addEventListener("click", forgetKey);
$("deliveries-close").addEventListener("click", closeDeliveries);
$("deliveries-more").addEventListener("click", () => moreDeliveries().catch(fail));
$("delivery-state").addEventListener("change", () => {
  const { sendId } = state.deliveries;
  if (sendId) openDeliveries(sendId).catch(fail);
});

start().catch(fail);
