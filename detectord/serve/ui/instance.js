// SPDX-License-Identifier: Apache-2.0
// One instance's page: its summary, the score over time with the threshold and alert spans, its
// recent alerts, every feature of the current window against its own baseline and the raw values,
// all from ../api/v1/instances/KEY (KEY is this page's last path segment), refreshed.
"use strict";

const REFRESH_MS = 5000;
const KEY = location.pathname.split("/").filter(Boolean).pop() || "";

async function load() {
  try {
    const body = await getJSON(`../api/v1/instances/${KEY}`);
    showBanner(null);
    render(body.data);
  } catch (err) {
    showBanner(err);
  }
}

function render(d) {
  const latest = d.scores.length ? d.scores[d.scores.length - 1][0] : d.step;
  const name = Object.values(d.labels).join(" · ");
  document.title = `detectord — ${name}`;
  document.getElementById("instance-title").textContent = name;
  document.getElementById("updated").textContent = latest ? `latest step ${fmtClock(latest, true)} UTC` : "";
  renderSummary(d, latest);
  document.getElementById("score-plot-wrap").replaceChildren(scorePlot(d, latest));
  renderTopFeatures(d.top_features);
  renderAlerts(d.alerts, latest);
  renderWindow(d.window);
}

function renderSummary(d, latest) {
  document.getElementById("labels").replaceChildren(...labelNodes(d.labels));
  const score = el("span", { class: d.score > 1 ? "anomalous" : "", text: fmtScore(d.score) });
  const alert = el("span", { class: `alert-${d.alert}`, text: alertText(d.alert, d.alert_since, latest) });
  const rows = [
    ["State", el("span", { class: `state-${d.state}`, text: d.state })],
    ["Score", score],
    ["Alert", alert],
    ["Looks like", d.looks_like || "—"],
    ["Threshold (raw)", fmtValue(d.threshold)],
    ["Step", fmtDuration(d.step_seconds * 1000)],
  ];
  document.querySelector("#summary dl").replaceChildren(
    ...rows.flatMap(([k, v]) => [el("dt", { text: k }), v instanceof Node ? el("dd", {}, v) : el("dd", { text: v })])
  );
}

// ---- the score over time -------------------------------------------------------------------

const TICK_STEPS_S = [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

function scorePlot(d, latest) {
  const W = 960, H = 240, L = 44, R = 12, T = 10, B = 34;
  const root = svg("svg", {
    id: "score-plot",
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-label": "Score over time, threshold at 1.0, alert spans shaded",
  });
  const pts = d.scores.filter(([, s]) => Number.isFinite(s));
  if (pts.length === 0) {
    root.append(svg("text", { x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle", text: "No scores yet: the window is warming." }));
    return root;
  }
  const stepMs = d.step_seconds * 1000;
  let t0 = pts[0][0];
  let t1 = Math.max(latest || 0, pts[pts.length - 1][0]);
  if (t1 - t0 < stepMs) t0 = t1 - stepMs;
  const yMax = niceCeil(Math.max(2, ...pts.map(([, s]) => s)) * 1.05);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (s) => T + (1 - Math.min(Math.max(s, 0), yMax) / yMax) * (H - T - B);

  const spans = svg("g", { class: "alert-spans" });
  for (const a of d.alerts) {
    const start = Math.max(a.starts_at, t0);
    const end = Math.min(a.ends_at ?? t1, t1);
    if (end < t0 || start > t1) continue;
    const width = Math.max(x(end) - x(start), 2);
    spans.append(
      svg(
        "rect",
        { class: `alert-span ${a.state}`, x: x(start).toFixed(1), y: T, width: width.toFixed(1), height: H - T - B },
        svg("title", { text: `${a.state} ${fmtClock(a.starts_at, true)}–${a.ends_at ? fmtClock(a.ends_at, true) : "now"} UTC` })
      )
    );
  }
  root.append(spans);

  const axes = svg("g", { class: "axes" });
  const yStep = yMax <= 4 ? 0.5 : yMax <= 10 ? 1 : niceCeil(yMax / 8);
  for (let v = 0; v <= yMax + 1e-9; v += yStep) {
    axes.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    axes.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", text: +v.toFixed(2) }));
  }
  const span = (t1 - t0) / 1000;
  const tickS = TICK_STEPS_S.find((s) => span / s <= 8) || 86400;
  const tickMs = tickS * 1000;
  for (let t = Math.ceil(t0 / tickMs) * tickMs; t <= t1; t += tickMs) {
    axes.append(svg("line", { class: "tick", x1: x(t), x2: x(t), y1: H - B, y2: H - B + 5 }));
    axes.append(svg("text", { x: x(t), y: H - B + 18, "text-anchor": "middle", text: fmtClock(t, tickS < 60) }));
  }
  axes.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  axes.append(svg("text", { class: "axis-title", x: W - R, y: H - 2, "text-anchor": "end", text: "time of day (UTC)" }));
  root.append(axes);

  root.append(svg("line", { class: "threshold", x1: L, x2: W - R, y1: y(1), y2: y(1) }));
  // Break the line where steps are missing (the instance was down or restarted its window).
  let path = "";
  let prev = null;
  for (const [t, s] of pts) {
    path += `${prev !== null && t - prev <= 2 * stepMs ? "L" : "M"}${x(t).toFixed(1)},${y(s).toFixed(1)}`;
    prev = t;
  }
  root.append(svg("path", { class: "score-line", d: path }));
  const [lt, ls] = pts[pts.length - 1];
  root.append(svg("circle", { class: ls > 1 ? "last anomalous" : "last", cx: x(lt), cy: y(ls), r: 3 }));
  return root;
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((n) => n >= v - 1e-9);
}

// ---- top features and alerts ---------------------------------------------------------------

function renderTopFeatures(top) {
  const list = document.getElementById("top-features");
  if (top.length === 0) {
    list.replaceChildren(el("li", { class: "muted", text: "None yet (warming, or no score)." }));
    return;
  }
  list.replaceChildren(
    ...top.map((f) =>
      el(
        "li",
        { "data-feature": f.name },
        el("span", { class: "feature-name", text: f.name }),
        " ",
        el("span", { class: f.deviation >= 0 ? "sigma up" : "sigma down", text: fmtSigma(f.deviation) }),
        el("span", { class: "muted", text: ` latest ${fmtValue(f.value)}` })
      )
    )
  );
}

function renderAlerts(alerts, latest) {
  const list = document.getElementById("alerts");
  if (alerts.length === 0) {
    list.replaceChildren(el("li", { class: "muted", text: "No recent alerts." }));
    return;
  }
  list.replaceChildren(
    ...alerts
      .slice()
      .reverse()
      .map((a) => {
        const end = a.ends_at ?? latest;
        const when = `${fmtDateTime(a.starts_at)} – ${a.ends_at ? `${fmtClock(a.ends_at, true)} UTC` : "now"} (${fmtDuration(end - a.starts_at)})`;
        return el(
          "li",
          { class: `alert-item alert-${a.state}`, "data-state": a.state },
          el(
            "div",
            { class: "alert-head" },
            el("span", { class: "badge", text: a.state }),
            el("span", { class: "muted", text: ` ${when}` }),
            a.looks_like ? el("span", { class: "looks-like", text: ` looks like ${a.looks_like}` }) : null
          ),
          el("div", { class: "summary", text: a.summary }),
          el("p", { class: "description", text: a.description })
        );
      })
  );
}

// ---- the window against the baseline -------------------------------------------------------

function renderWindow(w) {
  const box = document.getElementById("features");
  const table = document.getElementById("raw-values");
  if (!w) {
    box.replaceChildren(el("p", { class: "muted", text: "No window yet: the instance is warming or down." }));
    table.replaceChildren();
    return;
  }
  const top = new Set(w.top);
  const index = new Map(w.features.map((f, i) => [f, i]));
  const order = [...w.top.filter((f) => index.has(f)), ...w.features.filter((f) => !top.has(f))];
  box.replaceChildren(...order.map((f) => featureChart(w, index.get(f), top.has(f))));
  renderRaw(table, w, top);
}

function featureChart(w, i, isTop) {
  const W = 240, H = 72, P = 3;
  const values = w.values[i];
  const all = [...values, w.median[i], w.low[i], w.high[i]].filter((v) => Number.isFinite(v));
  let lo = Math.min(...all);
  let hi = Math.max(...all);
  if (!(hi > lo)) {
    lo -= 1;
    hi += 1;
  }
  const pad = (hi - lo) * 0.06;
  lo -= pad;
  hi += pad;
  const x = (j) => P + (values.length > 1 ? (j / (values.length - 1)) * (W - 2 * P) : (W - 2 * P) / 2);
  const y = (v) => P + (1 - (v - lo) / (hi - lo)) * (H - 2 * P);
  const name = w.features[i];
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${name} over the window` });
  if (Number.isFinite(w.low[i]) && Number.isFinite(w.high[i])) {
    const top = y(w.high[i]);
    chart.append(svg("rect", { class: "band", x: P, y: top, width: W - 2 * P, height: Math.max(y(w.low[i]) - top, 1) }));
  }
  if (Number.isFinite(w.median[i])) {
    chart.append(svg("line", { class: "median", x1: P, x2: W - P, y1: y(w.median[i]), y2: y(w.median[i]) }));
  }
  const pts = values.map((v, j) => (Number.isFinite(v) ? `${x(j).toFixed(1)},${y(v).toFixed(1)}` : null)).filter(Boolean);
  chart.append(svg("polyline", { class: "values", points: pts.join(" ") }));
  chart.append(svg("text", { class: "range", x: W - P, y: 11, "text-anchor": "end", text: fmtValue(hi - pad) }));
  chart.append(svg("text", { class: "range", x: W - P, y: H - 4, "text-anchor": "end", text: fmtValue(lo + pad) }));
  const dev = w.deviation[i];
  return el(
    "figure",
    { class: isTop ? "feature top" : "feature", "data-feature": name },
    el(
      "figcaption",
      {},
      el("span", { class: "feature-name", text: name }),
      " ",
      el("span", { class: dev >= 0 ? "sigma up" : "sigma down", text: fmtSigma(dev) }),
      el("br"),
      el("span", { class: "muted", text: `latest ${fmtValue(values[values.length - 1])}, median ${fmtValue(w.median[i])}` })
    ),
    chart
  );
}

// Rows are features (as in the charts above), columns the window's steps, newest last.
function renderRaw(table, w, top) {
  const head = el(
    "tr",
    {},
    el("th", { scope: "col", text: "Feature" }),
    el("th", { scope: "col", class: "num", text: "Median" }),
    ...w.timestamps.map((t) => el("th", { scope: "col", class: "num", title: fmtDateTime(t), text: fmtClock(t, true) }))
  );
  const rows = w.features.map((f, i) =>
    el(
      "tr",
      { class: top.has(f) ? "top" : "", "data-feature": f },
      el("th", { scope: "row", text: f }),
      el("td", { class: "num muted", text: fmtValue(w.median[i]) }),
      ...w.values[i].map((v) => {
        const out = Number.isFinite(v) && (v < w.low[i] || v > w.high[i]);
        return el("td", { class: out ? "num out" : "num", title: String(v), text: fmtValue(v) });
      })
    )
  );
  const first = table.childElementCount === 0;
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  // Newest steps are on the right: show them first.
  if (first) table.parentElement.scrollLeft = table.parentElement.scrollWidth;
}

refreshEvery(REFRESH_MS, load);
