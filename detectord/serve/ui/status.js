// SPDX-License-Identifier: Apache-2.0
// The status page: the model and fleet blocks and one page of the instance table, sorted,
// filtered and paged by detectord (api/v1/instances), kept in the URL's query and refreshed.
"use strict";

const PAGE_SIZE = 100;
const SPARK_POINTS = 30;
const REFRESH_MS = 5000;
// The order a column sorts in when first clicked (the API's defaults).
const DEFAULT_ORDER = { score: "desc", alert: "desc", labels: "asc", since: "asc" };

const view = readQuery();
let generation = 0; // answers to an older view than the current one are dropped
let refresh = () => {};

function readQuery() {
  const q = new URLSearchParams(location.search);
  const sort = q.get("sort") in DEFAULT_ORDER ? q.get("sort") : "score";
  const order = q.get("order") === "asc" || q.get("order") === "desc" ? q.get("order") : DEFAULT_ORDER[sort];
  const offset = Math.max(0, parseInt(q.get("offset") || "0", 10) || 0);
  return { sort, order, filter: q.get("filter") || "", offset };
}

function writeQuery() {
  const q = new URLSearchParams();
  if (view.sort !== "score" || view.order !== "desc") q.set("sort", view.sort);
  if (view.order !== DEFAULT_ORDER[view.sort]) q.set("order", view.order);
  if (view.filter) q.set("filter", view.filter);
  if (view.offset) q.set("offset", String(view.offset));
  const search = q.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
}

function changeView(changes) {
  Object.assign(view, changes);
  generation += 1;
  writeQuery();
  refresh();
}

async function load() {
  const mine = generation;
  const q = new URLSearchParams({
    sort: view.sort,
    order: view.order,
    offset: String(view.offset),
    limit: String(PAGE_SIZE),
    spark: String(SPARK_POINTS),
  });
  if (view.filter) q.set("filter", view.filter);
  try {
    const [status, instances] = await Promise.all([getJSON("api/v1/status"), getJSON(`api/v1/instances?${q}`)]);
    if (mine !== generation) return;
    if (instances.total > 0 && view.offset >= instances.total) {
      // The fleet shrank under the page we were on: go to its last page.
      changeView({ offset: Math.floor((instances.total - 1) / PAGE_SIZE) * PAGE_SIZE });
      return;
    }
    showBanner(null);
    renderHeader(status.data);
    if (status.data.model) renderModel(status.data.model);
    if (status.data.fleet) renderFleet(status.data.fleet);
    renderTable(instances, status.data.latest_step ?? status.data.now);
  } catch (err) {
    if (mine === generation) showBanner(err);
  }
}

function renderHeader(st) {
  document.getElementById("version").textContent = `v${st.version} · ${st.phase}`;
  document.getElementById("updated").textContent =
    st.latest_step ? `latest step ${fmtClock(st.latest_step, true)} UTC` : "no step scored yet";
}

function facts(dl, rows) {
  dl.replaceChildren(
    ...rows.flatMap(([name, value, key]) => [
      el("dt", { text: name }),
      value instanceof Node ? el("dd", { "data-fact": key }, value) : el("dd", { "data-fact": key, text: value }),
    ])
  );
}

function renderModel(m) {
  const stepMs = m.step_seconds * 1000;
  facts(document.querySelector("#model dl"), [
    ["Name", m.name, "name"],
    ["Kind", m.kind, "kind"],
    ["Version", m.version, "version"],
    ["Trained", m.trained_at ? m.trained_at.replace("T", " ") : "—", "trained_at"],
    ["Window", `${m.window} steps (${fmtDuration(m.window * stepMs)})`, "window"],
    ["Step", fmtDuration(stepMs), "step"],
    ["Threshold", `${fmtValue(m.threshold)} (raw; score 1.0)`, "threshold"],
    ["Card", el("a", { href: m.card || "model/card", text: "model card" }), "card"],
  ]);
}

function renderFleet(f) {
  facts(
    document.querySelector("#fleet dl"),
    [
      ["Tracked", "tracked"],
      ["Scoring", "scoring"],
      ["Warming", "warming"],
      ["Down", "down"],
      ["Refused by the cap", "refused"],
      ["Pending", "pending"],
      ["Firing", "firing"],
    ].map(([name, key]) => [name, fmtCount(f[key]), key])
  );
  document.querySelector('#fleet [data-fact="firing"]').classList.toggle("firing", f.firing > 0);
}

function renderTable(body, now) {
  const rows = body.data.map((inst) => instanceRow(inst, now));
  document.querySelector("#instances tbody").replaceChildren(...rows);
  document.getElementById("empty").hidden = rows.length > 0;
  const first = rows.length ? body.offset + 1 : 0;
  document.querySelector("#pager .range").textContent =
    `${fmtCount(first)}–${fmtCount(body.offset + rows.length)} of ${fmtCount(body.total)}`;
  document.querySelector('#pager [data-page="prev"]').disabled = body.offset <= 0;
  document.querySelector('#pager [data-page="next"]').disabled = body.offset + rows.length >= body.total;
  for (const th of document.querySelectorAll("#instances th[data-sort]")) {
    if (th.dataset.sort === view.sort) th.setAttribute("aria-sort", view.order === "asc" ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

function instanceRow(inst, now) {
  const score = el("td", { class: "num score", text: fmtScore(inst.score) });
  if (inst.score > 1) score.classList.add("anomalous");
  const alert = el("td", { class: `alert alert-${inst.alert}` }, el("span", { class: "badge", text: inst.alert }));
  if (inst.alert !== "inactive" && inst.alert_since && now) alert.append(` for ${fmtDuration(now - inst.alert_since)}`);
  const since = el("td", { class: "since" });
  if (inst.alert_since) {
    since.textContent = `${fmtClock(inst.alert_since, true)} UTC`;
    since.title = fmtDateTime(inst.alert_since);
  }
  const top = el(
    "ul",
    { class: "top-features" },
    ...inst.top_features.map((f) =>
      el(
        "li",
        { title: `latest value ${fmtValue(f.value)}` },
        el("span", { class: "feature-name", text: f.name }),
        " ",
        el("span", { class: f.deviation >= 0 ? "sigma up" : "sigma down", text: fmtSigma(f.deviation) })
      )
    )
  );
  return el(
    "tr",
    { "data-key": inst.key, "data-alert": inst.alert, "data-state": inst.state },
    el("td", { class: "labels" }, el("a", { href: `instances/${inst.key}`, title: labelText(inst.labels) }, ...labelNodes(inst.labels))),
    el("td", { class: `state state-${inst.state}`, text: inst.state }),
    score,
    el("td", { class: "spark" }, sparkline(inst.sparkline)),
    alert,
    since,
    el("td", { class: "top" }, top),
    // The class the model finds nearest means little while the instance looks normal: shown faint.
    el("td", { class: inst.score > 1 || inst.alert !== "inactive" ? "looks-like" : "looks-like muted", text: inst.looks_like || "—" })
  );
}

function setup() {
  for (const th of document.querySelectorAll("#instances th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => {
      const sort = th.dataset.sort;
      const order = sort === view.sort ? (view.order === "asc" ? "desc" : "asc") : DEFAULT_ORDER[sort];
      changeView({ sort, order, offset: 0 });
    });
  }
  document.querySelector('#pager [data-page="prev"]').addEventListener("click", () =>
    changeView({ offset: Math.max(0, view.offset - PAGE_SIZE) })
  );
  document.querySelector('#pager [data-page="next"]').addEventListener("click", () =>
    changeView({ offset: view.offset + PAGE_SIZE })
  );
  const filter = document.getElementById("filter");
  filter.value = view.filter;
  let debounce = null;
  const apply = () => {
    clearTimeout(debounce);
    if (filter.value.trim() !== view.filter) changeView({ filter: filter.value.trim(), offset: 0 });
  };
  filter.addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(apply, 300);
  });
  filter.addEventListener("keydown", (e) => {
    if (e.key === "Enter") apply();
  });
  refresh = refreshEvery(REFRESH_MS, load);
}

setup();
