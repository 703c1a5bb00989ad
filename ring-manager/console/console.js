// The ring manager's console: renders /api/state, then follows /api/events; actions (drain,
// undrain, disconnect a user) go to /api/actions with the operator token in its own header (kept in this page's
// memory only), after the operator types the target to confirm. Every string from the server
// goes into the page as text, never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const CENTER = 200;
const RADIUS = 140;
const WIDTH = 44;
const PALETTE = [
  "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
  "#b07aa1", "#ff9da7", "#9c755f", "#86bcb6", "#d37295", "#8cd17d",
];

// Colors stay with a node across updates: first come, first served, by id order.
const colors = new Map();
function colorOf(id) {
  if (id === null || id === undefined) return "#d0d4da";
  if (!colors.has(id)) colors.set(id, PALETTE[colors.size % PALETTE.length]);
  return colors.get(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function point(slot, count) {
  const angle = (slot / count) * 2 * Math.PI - Math.PI / 2;
  return [CENTER + RADIUS * Math.cos(angle), CENTER + RADIUS * Math.sin(angle)];
}

function fmtAge(ms) {
  if (ms < 1000) return ms + " ms";
  if (ms < 120000) return (ms / 1000).toFixed(1) + " s";
  return Math.round(ms / 60000) + " min";
}

function fmtTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function renderRing(state) {
  const ring = document.getElementById("ring");
  ring.replaceChildren();
  const count = state.slot_count;
  ring.append(svg("circle", { cx: CENTER, cy: CENTER, r: RADIUS, fill: "none", stroke: "#eef0f3", "stroke-width": WIDTH }));
  for (const arc of state.arcs) {
    const color = colorOf(arc.node);
    const title = svg("title", {});
    title.textContent = `slots ${arc.start}–${arc.start + arc.len - 1}: ${arc.node ?? "no owner"}`;
    let shape;
    if (arc.len >= count) {
      shape = svg("circle", { cx: CENTER, cy: CENTER, r: RADIUS, fill: "none", stroke: color, "stroke-width": WIDTH });
    } else {
      const [x0, y0] = point(arc.start, count);
      const [x1, y1] = point(arc.start + arc.len, count);
      const large = arc.len > count / 2 ? 1 : 0;
      shape = svg("path", {
        d: `M ${x0.toFixed(2)} ${y0.toFixed(2)} A ${RADIUS} ${RADIUS} 0 ${large} 1 ${x1.toFixed(2)} ${y1.toFixed(2)}`,
        fill: "none", stroke: color, "stroke-width": WIDTH,
      });
    }
    shape.setAttribute("class", "arc");
    shape.setAttribute("data-node", arc.node ?? "");
    shape.append(title);
    ring.append(shape);
  }
  // Slot numbers at the quarters, outside the ring.
  for (let q = 0; q < 4; q++) {
    const slot = (q * count) / 4;
    const angle = (q / 4) * 2 * Math.PI - Math.PI / 2;
    const r = RADIUS + WIDTH / 2 + 12;
    const tick = svg("text", {
      x: (CENTER + r * Math.cos(angle)).toFixed(1),
      y: (CENTER + r * Math.sin(angle) + 4).toFixed(1),
      "text-anchor": "middle", class: "tick",
    });
    tick.textContent = String(slot);
    ring.append(tick);
  }
  const label = svg("text", { x: CENTER, y: CENTER - 6, "text-anchor": "middle", class: "ring-epoch" });
  label.textContent = "epoch " + state.epoch;
  const sub = svg("text", { x: CENTER, y: CENTER + 18, "text-anchor": "middle", class: "ring-sub" });
  const owners = new Set(state.arcs.filter((a) => a.node !== null).map((a) => a.node));
  const copies = state.replication_factor > 1 ? ` · ${state.replication_factor} copies` : "";
  sub.textContent = `${count} slots · ${owners.size} owner${owners.size === 1 ? "" : "s"}${copies}`;
  ring.append(label, sub);
}

// Slots a node follows, and how many of those it last reported as still being filled (marked
// stale when it counted them in an older epoch than the ring's).
function followed(state, node) {
  const count = node.followed ?? 0;
  if (!node.catching_up) return String(count);
  const stale = (node.catching_up_epoch ?? 0) < state.epoch ? ", stale" : "";
  return `${count} (${node.catching_up} catching up${stale})`;
}

function renderNodes(state) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const node of state.nodes) {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = node.slots > 0 ? colorOf(node.id) : "transparent";
    const share = state.slot_count ? ((100 * node.slots) / state.slot_count).toFixed(1) + "%" : "";
    const heartbeat = node.state === "down" ? "lost " + fmtAge(node.heartbeat_ms) + " ago" : fmtAge(node.heartbeat_ms) + " ago";
    const row = el("tr", { "data-node": node.id, "data-state": node.state, class: "state-" + node.state },
      el("td", {}, swatch, el("span", { class: "node-id" }, node.id)),
      el("td", {}, el("span", { class: "badge " + node.state }, node.state)),
      el("td", { class: "mono" }, node.addr),
      el("td", { class: "num slots" }, node.slots),
      el("td", { class: "num" }, share),
      el("td", { class: "num followed" }, followed(state, node)),
      el("td", { class: "num" }, heartbeat),
      el("td", { class: "num" }, node.pid || ""),
      el("td", {}, ...nodeActions(node)));
    body.append(row);
  }
}

function renderRegions(state) {
  const body = document.querySelector("#regions tbody");
  body.replaceChildren();
  document.getElementById("no-regions").hidden = state.regions.length > 0 || state.role === "follower";
  for (const region of state.regions) {
    const gateways = el("ul", { class: "gateways" });
    for (const g of region.gateways) {
      gateways.append(el("li", { class: g.stale ? "stale" : "" },
        el("span", { class: "mono" }, g.id), ` ${g.connections} conn · ${g.url} · seen ${fmtAge(g.last_seen_ms)} ago${g.stale ? " (stale)" : ""}`));
    }
    const drain = region.draining ? `draining ${region.rate}/s` : "serving";
    body.append(el("tr", { "data-region": region.region, "data-draining": String(region.draining) },
      el("td", {}, region.region),
      el("td", {}, el("span", { class: "badge " + (region.draining ? "draining" : "active") }, drain)),
      el("td", { class: "num" }, region.connections),
      el("td", {}, gateways),
      el("td", {}, region.nearest.join(", ")),
      el("td", {}, region.draining
        ? actionButton("undrain_region", region.region, "undrain")
        : actionButton("drain_region", region.region, "drain"))));
  }
}

// The buttons of a node's row: drain an active node; undrain one drained (a standby again, or
// still draining: the ring manager then says it is not a standby yet).
function nodeActions(node) {
  if (node.state === "active") return [actionButton("drain_node", node.id, "drain")];
  if (node.state === "standby" || node.state === "draining") return [actionButton("undrain_node", node.id, "undrain")];
  return [];
}

function actionButton(action, target, label) {
  return el("button", { type: "button", class: "action", "data-action": action, "data-target": target }, label);
}

const ACTION_TEXT = {
  drain_node: "Drain node", undrain_node: "Undrain node (make it active again)",
  drain_region: "Drain region", undrain_region: "Undrain region",
  disconnect_user: "Close every connection of user",
};

function renderActions(state) {
  const list = document.getElementById("actions");
  list.replaceChildren();
  const actions = state.actions || [];
  if (actions.length === 0) {
    list.append(el("li", { class: "muted" }, "No action taken from this console yet."));
    return;
  }
  for (const a of actions) {
    list.append(el("li", { "data-action": a.action, "data-ok": String(a.ok) },
      el("div", {}, el("b", {}, `${a.action} ${a.target}`),
        el("span", { class: "muted" }, ` ${fmtTime(a.at_ms)} · by ${a.operator}${a.epoch ? " · epoch " + a.epoch : ""}`)),
      el("div", { class: a.ok ? "cause" : "cause refused" }, a.outcome)));
  }
}

// One action at a time: the dialog asks the operator to type the target, then it is posted.
let pending = null;
let operatorToken = "";
document.getElementById("operator-token").addEventListener("input", (e) => { operatorToken = e.target.value; });
document.getElementById("operator").addEventListener("submit", (e) => e.preventDefault());

function ask(request) {
  pending = request;
  document.getElementById("confirm-what").textContent = `${ACTION_TEXT[pending.action] || pending.action} ${pending.target}?`;
  document.getElementById("confirm-target").textContent = pending.target;
  const input = document.getElementById("confirm-input");
  input.value = "";
  document.getElementById("confirm-ok").disabled = true;
  document.getElementById("confirm").showModal();
  input.focus();
}

document.addEventListener("click", (e) => {
  const button = e.target.closest("button.action[data-action]");
  if (!button) return;
  ask({ action: button.dataset.action, target: button.dataset.target });
});

document.getElementById("disconnect").addEventListener("submit", (e) => {
  e.preventDefault();
  const user = document.getElementById("disconnect-user").value.trim();
  if (!user) return;
  const team = document.getElementById("disconnect-team").value.trim();
  ask({
    action: "disconnect_user",
    target: user,
    team,
    reason: document.getElementById("disconnect-reason").value,
    reconnect: !document.getElementById("disconnect-no-reconnect").checked,
  });
  if (team) document.getElementById("confirm-what").textContent += ` (team ${team} only)`;
});
document.getElementById("confirm-input").addEventListener("input", (e) => {
  document.getElementById("confirm-ok").disabled = !pending || e.target.value !== pending.target;
});
document.getElementById("confirm-cancel").addEventListener("click", () => {
  pending = null;
  document.getElementById("confirm").close();
});
document.getElementById("confirm-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const confirmed = document.getElementById("confirm-input").value;
  document.getElementById("confirm").close();
  if (!pending) return;
  const request = { ...pending, confirm: confirmed };
  pending = null;
  const status = document.getElementById("action-status");
  status.textContent = `${request.action} ${request.target}…`;
  fetch("api/actions", {
    method: "POST",
    cache: "no-store",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Channelmesh-Operator-Token": operatorToken },
    body: JSON.stringify(request),
  })
    .then((r) => r.json().catch(() => ({ ok: false, error: "HTTP " + r.status })))
    .then((answer) => {
      status.textContent = answer.ok ? `done: ${answer.outcome}` : `refused: ${answer.error}`;
    })
    .catch((err) => { status.textContent = "failed: " + err.message; });
});

function renderEpochs(state) {
  const list = document.getElementById("epochs");
  list.replaceChildren();
  if (state.epochs.length === 0) {
    list.append(el("li", { class: "muted" }, "No epoch published by this ring manager yet."));
    return;
  }
  for (const e of state.epochs) {
    const moves = el("ul", { class: "moves" });
    for (const m of e.moves) {
      moves.append(el("li", {}, `${m.from ?? "(none)"} → ${m.to ?? "(none)"}: ${m.slots} slots`));
    }
    list.append(el("li", { "data-epoch": e.epoch },
      el("div", {}, el("b", {}, "epoch " + e.epoch), el("span", { class: "muted" }, " " + fmtTime(e.at_ms) + " · " + e.moved + " slots moved")),
      el("div", { class: "cause" }, e.cause),
      moves));
  }
}

function render(state) {
  document.getElementById("epoch").textContent = state.epoch;
  document.getElementById("role").textContent = state.role + (state.ready ? "" : " (not ready)");
  document.getElementById("slot-count").textContent = `(${state.slot_count} slots)`;
  document.getElementById("updated").textContent = fmtTime(state.at_ms);
  document.getElementById("follower-note").hidden = state.role !== "follower";
  for (const n of state.nodes) colorOf(n.id);
  renderRing(state);
  renderNodes(state);
  renderRegions(state);
  renderEpochs(state);
  renderActions(state);
  document.body.dataset.epoch = state.epoch;
}

function setLive(kind, text) {
  const live = document.getElementById("live");
  live.className = "live " + kind;
  live.textContent = text;
}

// Views are only filters on what is shown.
for (const tab of document.querySelectorAll("#views button")) {
  tab.addEventListener("click", () => {
    document.getElementById("main").dataset.view = tab.dataset.view;
    for (const t of document.querySelectorAll("#views button")) {
      t.setAttribute("aria-selected", String(t === tab));
    }
  });
}

// The page comes with a snapshot inlined by the server; fetch one only if it did not.
function initialState() {
  try {
    const state = JSON.parse(document.getElementById("initial-state").textContent);
    if (state && Array.isArray(state.nodes)) return Promise.resolve(state);
  } catch (_) {
    // Fall through to the API.
  }
  return fetch("api/state", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status))));
}

initialState()
  .then(render)
  .catch((e) => setLive("down", "cannot load: " + e.message));

// Live updates start a moment after the page has loaded. An open event stream keeps a
// headless browser's virtual clock from running, so tools that capture the page
// (--virtual-time-budget, --screenshot) get the inlined snapshot instead of waiting forever.
const LIVE_DELAY_MS = 1000;
function follow() {
  // EventSource reconnects on its own after an error.
  const events = new EventSource("api/events");
  events.addEventListener("open", () => setLive("up", "live"));
  events.addEventListener("error", () => setLive("down", "reconnecting"));
  events.addEventListener("state", (e) => {
    setLive("up", "live");
    try {
      render(JSON.parse(e.data));
    } catch (err) {
      setLive("down", "bad update: " + err.message);
    }
  });
}
window.addEventListener("load", () => setTimeout(follow, LIVE_DELAY_MS));
