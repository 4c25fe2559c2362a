// The daemon's page: a piano roll of the 8-bar buffer and every command, over one WebSocket.
// The server sends {type: "hello"}, then {type: "state", state} on every change (and a few
// times a bar while playing); commands go out as MQTT's JSON payloads, each with an id, and
// come back as {type: "result"} or {type: "error"}. No build step, no libraries.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TOKEN = params.get("token");

// Geometry of the roll in CSS pixels, from the SVG's box (no stretched text on a phone).
const GUTTER = 26, HEAD = 16;
let STEP_W = 10, ROW_H = 9;
let T = { pitch_min: 55, pitch_max: 84, rest: 30, hold: 31, steps_per_bar: 16, bars: 8 };
let limits = { max_delta: 2, max_target_bars: 4, interp_steps: 8 };

const clsm = window.clsm = {
  state: null, received: 0, notes: [], playheadStep: null, connected: false,
  log: [], sent: 0,
};

// ----- connection ------------------------------------------------------------------------
let ws = null, backoff = 500, nextId = 1;
const inflight = {}, pending = {}; // per action: id in flight / latest value waiting

function setConn(state, text) {
  const el = $("conn");
  el.dataset.state = state;
  el.textContent = text;
  clsm.connected = state === "connected";
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const q = TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "";
  setConn("connecting", "connecting…");
  ws = new WebSocket(`${proto}://${location.host}/ws${q}`);
  let refused = null;
  ws.onopen = () => { backoff = 500; setConn("connected", "connected"); };
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { note("error", "unreadable message from the daemon"); return; }
    if (msg.type === "error" && msg.fatal) refused = msg.error;
    onMessage(msg);
  };
  ws.onclose = (ev) => {
    for (const k of Object.keys(inflight)) delete inflight[k];
    if (ev.code === 4403) {
      setConn("refused", "refused: " + (refused || ev.reason || "token"));
      return; // a wrong token does not get better by retrying
    }
    const s = (backoff / 1000).toFixed(1);
    setConn("lost", `connection lost, reconnecting in ${s} s`);
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 5000);
  };
}

function send(cmd, coalesce) {
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    note("error", `${cmd.action}: not connected`);
    return;
  }
  const key = coalesce ? cmd.action : null;
  if (key && inflight[key]) { pending[key] = cmd; return; } // only the latest value waits
  cmd.id = "w" + nextId++;
  if (key) inflight[key] = cmd.id;
  ws.send(JSON.stringify(cmd));
  clsm.sent++;
}

function settle(msg) {
  for (const key of Object.keys(inflight)) {
    if (inflight[key] === msg.id) {
      delete inflight[key];
      if (pending[key]) { const next = pending[key]; delete pending[key]; send(next, true); }
    }
  }
}

function onMessage(msg) {
  if (msg.type === "hello") {
    T = msg.tokens; limits = msg.limits;
    $("delta").max = limits.max_delta;
    [$("bpm").min, $("bpm").max] = limits.bpm; // the validator's tempo rule (daemon/rules.py)
    $("seed").max = limits.max_seed;
    fillSelect($("first_bar"), 1, T.bars);
    fillSelect($("bars"), 1, limits.max_target_bars);
  } else if (msg.type === "state") {
    clsm.state = msg.state; clsm.received = performance.now();
    render(msg.state);
  } else if (msg.type === "result") {
    settle(msg);
    note("result", describe(msg));
  } else if (msg.type === "error") {
    settle(msg);
    for (const k of Object.keys(touched)) delete touched[k]; // the state has the real values
    note("error", (msg.action ? msg.action + ": " : "") + msg.error);
  }
}

function describe(r) {
  if (r.tokens) return `${r.action} bars ${r.first_bar}-${r.last_bar}: ${r.latency_ms} ms${r.ready ? " (ready)" : ""}`;
  if (r.superseded) return `${r.action}: superseded by a newer one`;
  return `${r.action}: ok`;
}

function note(kind, text) {
  clsm.log.push({ kind, text });
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  const log = $("log");
  log.prepend(li);
  while (log.children.length > 30) log.lastChild.remove();
}

// ----- the roll ----------------------------------------------------------------------------
function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// tokens -> notes {pitch, start, len, owner}; a note held into a bar of another owner is
// split at the line (the scheduler starts the held pitch there).
function notesOf(tokens, owners) {
  const out = [];
  let cur = null;
  const spb = T.steps_per_bar;
  tokens.forEach((t, step) => {
    const owner = owners[Math.floor(step / spb)];
    if (t === T.hold && cur && step % spb === 0 && owner !== cur.owner) {
      cur = { pitch: cur.pitch, start: step, len: 1, owner, tied: true };
      out.push(cur);
    } else if (t === T.hold && cur) {
      cur.len++;
    } else if (t < T.rest) {
      cur = { pitch: T.pitch_min + t, start: step, len: 1, owner, tied: false };
      out.push(cur);
    } else {
      cur = null;
    }
  });
  return out;
}

function targetBars(s) {
  const first = s.target.first_bar, last = first + s.target.bars - 1;
  return { first, last };
}

function render(s) {
  const svg = $("roll");
  const nSteps = T.bars * T.steps_per_bar, nRows = T.pitch_max - T.pitch_min + 1;
  const W = Math.max(300, svg.clientWidth), H = Math.max(180, svg.clientHeight);
  STEP_W = (W - GUTTER) / nSteps; ROW_H = (H - HEAD) / nRows;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const y = (p) => HEAD + (T.pitch_max - p) * ROW_H;
  const x = (step) => GUTTER + step * STEP_W;
  for (let p = T.pitch_min; p <= T.pitch_max; p++) {
    const pc = p % 12, black = [1, 3, 6, 8, 10].includes(pc);
    el("rect", { class: "row-bg" + (black ? " black" : "") + (pc === 0 ? " c" : ""),
      x: GUTTER, y: y(p), width: nSteps * STEP_W, height: ROW_H }, svg);
    if (pc === 0) el("text", { class: "pitch-label", x: 2, y: y(p) + ROW_H - 1 }, svg).textContent = `C${p / 12 - 1}`;
  }
  const tb = targetBars(s), wide = STEP_W * T.steps_per_bar > 64;
  for (let b = 1; b <= T.bars; b++) {
    const inT = b >= tb.first && b <= tb.last;
    // the paper's Fig. 1: left context | target | right context
    const role = inT ? "target" : b < tb.first ? "context-left" : "context-right";
    el("rect", { class: `bar-bg ${inT ? "target" : "ctx"}`, "data-bar": b, "data-role": role,
      x: x((b - 1) * T.steps_per_bar), y: HEAD, width: T.steps_per_bar * STEP_W, height: nRows * ROW_H }, svg);
    const label = el("text", { class: `bar-label ${inT ? "target" : "ctx"}`, "data-bar": b,
      x: x((b - 1) * T.steps_per_bar) + 3, y: HEAD - 4 }, svg);
    label.textContent = `${b}${inT ? (wide ? " target" : "T") : ""}` +
      `${s.owners[b - 1] === "coperformer" ? " ◆" : ""}`;
    label.addEventListener("click", () => send({ action: "target", first_bar: b }, false));
  }
  for (let step = 0; step <= nSteps; step++) {
    const cls = step % T.steps_per_bar === 0 ? "grid bar" : step % 4 === 0 ? "grid beat" : "grid";
    if (step % 4 === 0) el("line", { class: cls, x1: x(step), x2: x(step), y1: HEAD, y2: H }, svg);
  }
  clsm.notes = notesOf(s.tokens, s.owners);
  for (const n of clsm.notes) {
    el("rect", { class: `note ${n.owner}`, "data-pitch": n.pitch, "data-start": n.start,
      "data-len": n.len, "data-owner": n.owner, x: x(n.start) + 0.5, y: y(n.pitch) + 0.5,
      width: n.len * STEP_W - 1, height: ROW_H - 1 }, svg);
  }
  el("line", { id: "playhead", x1: 0, x2: 0, y1: HEAD, y2: H, visibility: "hidden" }, svg);
  renderInfo(s);
  renderControls(s);
  renderHistory(s);
}

function renderInfo(s) {
  $("status").textContent = `${s.transport} · ${s.bpm} bpm · bar ${s.bar} · ${s.mode}` +
    `${s.record ? " · rec" : ""} · α ${fmt(s.alpha)} · δ ${fmt(s.delta)}` +
    (s.dropped_plans ? ` · ${s.dropped_plans} dropped steps` : "");
  const e = s.engine || {};
  const lat = s.latency_ms == null ? "–" : `${s.latency_ms.toFixed(1)} ms`;
  $("perf").textContent = `last generation ${lat} · engine ${e.name || "?"} (${e.backend || "?"}` +
    `${e.decoding ? ", " + e.decoding : ""})`;
}

const fmt = (v) => (v == null ? "–" : Number(v).toFixed(2));
const touched = {}; // a control the player moved lately is not overwritten by the state

function setIfIdle(id, value) {
  const c = $(id);
  if (id in touched && performance.now() - touched[id] < 1500) return;
  if (c.type === "checkbox") c.checked = value; else c.value = value;
}

function renderControls(s) {
  setIfIdle("first_bar", s.target.first_bar);
  setIfIdle("bars", s.target.bars);
  setIfIdle("alpha", s.alpha);
  $("alpha_out").textContent = fmt(s.alpha);
  setIfIdle("delta", s.delta);
  $("delta_out").textContent = fmt(s.delta);
  setIfIdle("bpm", Math.round(s.bpm));
  setIfIdle("record", !!s.record);
  setIfIdle("seed", s.seed == null ? "" : s.seed);
  if (s.temperature != null) {
    setIfIdle("temperature", s.temperature);
    $("temperature_out").textContent = s.temperature === 0 ? "0 (argmax)" : fmt(s.temperature);
  }
  $("mode_loop").classList.toggle("on", s.mode === "loop");
  $("mode_follow").classList.toggle("on", s.mode === "follow");
  $("start").classList.toggle("on", s.transport === "playing");
  $("stop").classList.toggle("on", s.transport !== "playing");
}

function renderHistory(s) {
  const box = $("history");
  const cands = s.candidates || [];
  if (!cands.length) { box.innerHTML = "<em>none yet: regenerate</em>"; return; }
  box.replaceChildren();
  const current = s.history ? s.history.index + 1 : 0; // 0 = the bars before the first
  const mk = (n, text, title) => {
    const b = document.createElement("button");
    b.dataset.n = n; b.textContent = text; b.title = title;
    if (n === current) b.classList.add("current");
    b.addEventListener("click", () => send({ action: "select", index: n }, false));
    box.appendChild(b);
  };
  mk(0, "before", "the bars as they were before the first candidate");
  for (const c of cands) {
    const extra = c.kind === "interpolate" ? ` α${fmt(c.alpha)}` : c.kind === "vary" ? ` δ${fmt(c.delta)}` : "";
    mk(c.n, `${c.n} ${c.kind.slice(0, 5)}${extra}`, c.kind);
  }
}

// The playhead moves with the clock between state pushes (position + elapsed time x tempo).
function tick() {
  const s = clsm.state, ph = $("playhead");
  if (s && ph) {
    let pos = s.position;
    if (s.transport === "playing") pos += (performance.now() - clsm.received) / 1000 * s.bpm / 15;
    const n = T.bars * T.steps_per_bar;
    const step = s.mode === "follow" ? n - T.steps_per_bar + (pos % T.steps_per_bar) : pos % n;
    const x = GUTTER + step * STEP_W;
    ph.setAttribute("x1", x); ph.setAttribute("x2", x);
    ph.setAttribute("visibility", "visible");
    ph.dataset.step = Math.floor(step);
    clsm.playheadStep = step;
  }
  requestAnimationFrame(tick);
}

// ----- controls -----------------------------------------------------------------------------
function fillSelect(sel, lo, hi) {
  const v = sel.value;
  sel.replaceChildren();
  for (let i = lo; i <= hi; i++) {
    const o = document.createElement("option");
    o.value = i; o.textContent = i; sel.appendChild(o);
  }
  if (v) sel.value = v;
}

function wire() {
  fillSelect($("first_bar"), 1, T.bars);
  fillSelect($("bars"), 1, limits.max_target_bars);
  const mark = (id) => { touched[id] = performance.now(); };
  const click = (id, f) => $(id).addEventListener("click", f);
  $("first_bar").addEventListener("change", () => { mark("first_bar"); send({ action: "target", first_bar: +$("first_bar").value }, false); });
  $("bars").addEventListener("change", () => { mark("bars"); send({ action: "target", bars: +$("bars").value }, false); });
  click("regenerate", () => send({ action: "regenerate" }, false));
  click("undo", () => send({ action: "undo" }, false));
  click("clear", () => send({ action: "clear" }, false));
  click("step_down", () => send({ action: "step", direction: -1 }, false));
  click("step_up", () => send({ action: "step", direction: 1 }, false));
  click("start", () => send({ action: "transport", value: "start" }, false));
  click("stop", () => send({ action: "transport", value: "stop" }, false));
  click("panic", () => send({ action: "panic" }, false));
  click("mode_loop", () => send({ action: "mode", value: "loop" }, false));
  click("mode_follow", () => send({ action: "mode", value: "follow" }, false));
  $("record").addEventListener("change", () => { mark("record"); send({ action: "record", value: $("record").checked }, false); });
  const slider = (id, make) => $(id).addEventListener("input", () => {
    mark(id);
    $(id + "_out").textContent = fmt($(id).value);
    send(make(+$(id).value), true); // a sweep: one in flight, the latest value waits
  });
  slider("alpha", (v) => ({ action: "interpolate", alpha: v }));
  slider("delta", (v) => ({ action: "vary", delta: v }));
  slider("temperature", (v) => ({ action: "temperature", value: v }));
  $("seed").addEventListener("change", () => { // empty = a fresh roll every time
    mark("seed");
    const v = $("seed").value.trim();
    send({ action: "seed", value: v === "" ? null : Number(v) }, false);
  });
  $("bpm").addEventListener("change", () => { mark("bpm"); send({ action: "tempo", bpm: +$("bpm").value }, true); });
}

wire();
window.addEventListener("resize", () => { if (clsm.state) render(clsm.state); });
connect();
requestAnimationFrame(tick);
