// SPDX-License-Identifier: Apache-2.0
// What both pages share: fetching detectord's JSON API, building DOM and SVG nodes from data
// (always as text, never as markup: labels come from the network), number and time formatting,
// the error banner and a refresh loop that pauses while the tab is hidden.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// GET `url` and return its `{"status": "success"}` body; throws ApiError otherwise.
async function getJSON(url) {
  let resp;
  try {
    resp = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, `cannot reach detectord (${err.message})`);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (err) {
    body = null;
  }
  if (!resp.ok || !body || body.status !== "success") {
    const reason = body && body.error ? body.error : resp.statusText || "bad answer";
    throw new ApiError(resp.status, reason);
  }
  return body;
}

// An element with attributes (`text` sets textContent, `class` the class) and children
// (nodes, or strings added as text).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else node.setAttribute(name, String(value));
  }
}

// ---- formatting ----------------------------------------------------------------------------

function fmtScore(x) {
  return x === null || x === undefined || !Number.isFinite(x) ? "—" : x.toFixed(2);
}

// A raw value in a few significant digits, with k/M/G for large ones.
function fmtValue(x) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "—";
  const a = Math.abs(x);
  if (a === 0) return "0";
  for (const [div, unit] of [[1e9, "G"], [1e6, "M"], [1e4, "k"]]) {
    if (a >= div) return `${+(x / div).toPrecision(3)}${unit}`;
  }
  if (a < 1e-3) return x.toExponential(1);
  return String(+x.toPrecision(3));
}

function fmtSigma(x) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "—";
  return `${x >= 0 ? "+" : "−"}${Math.abs(x).toFixed(1)}σ`;
}

function fmtCount(n) {
  return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US");
}

function fmtDuration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 10 && s % 60) return `${m}m ${s % 60}s`;
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h${m % 60 ? ` ${m % 60}m` : ""}`;
  return `${Math.floor(h / 24)}d`;
}

// Time of day in UTC: "14:05" or, with seconds, "14:05:30".
function fmtClock(ms, seconds = false) {
  const iso = new Date(ms).toISOString();
  return iso.slice(11, seconds ? 19 : 16);
}

function fmtDateTime(ms) {
  return ms === null || ms === undefined ? "—" : `${new Date(ms).toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

// "job=coredns instance=10.0.0.1:9153"
function labelText(labels) {
  return Object.entries(labels)
    .map(([k, v]) => `${k}=${v}`)
    .join(" ");
}

function labelNodes(labels) {
  return Object.entries(labels).map(([k, v]) =>
    el("span", { class: "label" }, el("span", { class: "label-name", text: k }), el("span", { class: "label-value", text: v }))
  );
}

// "firing for 4m" from an alert state and when it began; `now` is data time (latest step).
function alertText(state, since, now) {
  if (!state || state === "inactive") return "inactive";
  return since && now ? `${state} for ${fmtDuration(now - since)}` : state;
}

// ---- sparklines ----------------------------------------------------------------------------

// A small SVG line of `values` (oldest first) with the threshold at 1.0 as a dashed line.
function sparkline(values, width = 120, height = 24) {
  const root = svg("svg", { class: "sparkline", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  const finite = values.filter((v) => Number.isFinite(v));
  const top = Math.max(1.5, ...finite) * 1.05;
  const y = (v) => (height - 1 - (Math.min(Math.max(v, 0), top) / top) * (height - 2)).toFixed(1);
  root.append(svg("line", { class: "threshold", x1: 0, x2: width, y1: y(1), y2: y(1) }));
  if (finite.length > 0) {
    const dx = values.length > 1 ? width / (values.length - 1) : 0;
    const pts = values.map((v, i) => (Number.isFinite(v) ? `${(i * dx).toFixed(1)},${y(v)}` : null)).filter(Boolean);
    const last = values[values.length - 1];
    root.append(svg("polyline", { class: last > 1 ? "line anomalous" : "line", points: pts.join(" ") }));
    root.append(svg("title", { text: `last ${values.length} scores, max ${fmtScore(Math.max(...finite))}` }));
  }
  return root;
}

// ---- the banner and the refresh loop -------------------------------------------------------

function showBanner(err) {
  const banner = document.getElementById("banner");
  if (!err) {
    banner.hidden = true;
    banner.textContent = "";
    return;
  }
  let msg;
  if (err.status === 503) msg = "detectord is not ready yet (starting, or loading its model); retrying…";
  else if (err.status === 404) msg = `Not found: ${err.message}.`;
  else if (err.status === 0) msg = `${err.message[0].toUpperCase()}${err.message.slice(1)}; retrying…`;
  else msg = `detectord's API failed${err.status ? ` (HTTP ${err.status})` : ""}: ${err.message}; retrying…`;
  banner.textContent = msg;
  banner.className = err.status === 503 ? "banner warn" : "banner error";
  banner.hidden = false;
}

// Calls `load()` now and then every `intervalMs` after each load ends, never two at once; not
// while the tab is hidden (and at once when it shows again). Returns a function that loads now.
function refreshEvery(intervalMs, load) {
  let timer = null;
  let running = false;
  let again = false;
  async function tick() {
    clearTimeout(timer);
    timer = null;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await load();
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      tick();
    } else if (!document.hidden) {
      timer = setTimeout(tick, intervalMs);
    }
  }
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(timer);
    else tick();
  });
  tick();
  return tick;
}
