
"use strict";
const VIEW = JSON.parse(document.getElementById("frontier-view").textContent);
const CSV = JSON.parse(document.getElementById("frontier-csv").textContent);
const SYMBOLS = {global: "circle", layer: "square", none: "star", null: "diamond"};
const PLOT_CONFIG = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d",
  "zoomIn2d", "zoomOut2d", "toggleSpikelines", "hoverClosestCartesian", "hoverCompareCartesian"]};
let colourBy = "front";

function fmt(v, d) { return (v === null || v === undefined) ? "" : Number(v).toFixed(d); }
function pct(v, d) { return (v === null || v === undefined) ? "" : (100 * v).toFixed(d === undefined ? 2 : d); }
function esc(s) {
  return String(s === null || s === undefined ? "" : s).replace(/[&<>"]/g,
    c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
}
function bitColour(b) { return VIEW.bit_colors[String(b)] || "#7f7f7f"; }
function symbol(g) {
  if (g.dense) return "star";
  const s = SYMBOLS[g.scope];
  return s || (g.method !== undefined ? "x" : "triangle-up");
}
function hoverText(front, g) {
  const lines = [`<b>${esc(g.label)}</b>`, `front: ${esc(front.name)}`];
  for (const [k, v] of Object.entries(g.axes || {})) lines.push(`${esc(k)} = ${esc(v)}`);
  let acc = `test acc ${pct(g.acc)}%`;
  if (g.n > 1) acc += ` ± ${pct(g.acc_std)} (n=${g.n}, seeds ${esc(g.seeds.join(", "))})`;
  lines.push(acc);
  lines.push(`ratio ${fmt(g.ratio, 2)}x`);
  if (g.size_bits !== null && g.size_bits !== undefined)
    lines.push(`size ${Math.round(g.size_bits).toLocaleString("en-US")} bits`);
  if (g.bops) lines.push(`BOPs ${Number(g.bops).toExponential(3)}`);
  if (g.latency_ms) lines.push(`latency ${fmt(g.latency_ms, 3)} ms`);
  lines.push(`status ${esc(g.statuses.join(", "))}` + (g.pareto ? " · Pareto" : ""));
  return lines.join("<br>");
}

// x of a group on one of the three plots
const XS = {
  ratio: {key: "ratio", title: "compression ratio (dense fp32 bits / compressed bits, log)", flag: "pareto",
          shape: "vh", higher: true},
  bops: {key: "bops", title: "BOPs per sample (MACs x weight bits x activation bits, log)", flag: "pareto_bops",
         shape: "hv", higher: false},
  latency: {key: "latency_ms", title: "onnxruntime latency (ms per batch, log)", flag: "pareto_latency",
            shape: "hv", higher: false},
};

function traces(kind) {
  const X = XS[kind];
  const out = [];
  let lo = Infinity, hi = -Infinity;
  const fronts = VIEW.fronts.filter(f => kind === "ratio" || f.kind === "sweep");
  fronts.forEach(f => f.groups.forEach(g => {
    const x = g[X.key];
    if (x) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
    if (kind === "latency" && g.fp32_latency_ms) {
      lo = Math.min(lo, g.fp32_latency_ms); hi = Math.max(hi, g.fp32_latency_ms);
    }
  }));
  if (!isFinite(lo)) return {data: [], lo: 1, hi: 2};
  fronts.forEach((f, fi) => {
    // one trace per method of a reference, one per front otherwise
    const parts = {};
    f.groups.forEach((g, gi) => {
      if (!g[X.key]) return;
      const key = f.kind === "reference" ? (g.method || "reference") : "";
      (parts[key] = parts[key] || []).push(gi);
    });
    Object.entries(parts).forEach(([method, gis], pi) => {
      const gs = gis.map(i => f.groups[i]);
      const colour = f.kind === "reference" && pi > 0 ? REF_SHADES[pi % REF_SHADES.length] : f.color;
      out.push({
        type: "scatter", mode: "markers", x: gs.map(g => g[X.key]), y: gs.map(g => 100 * g.acc),
        name: f.kind === "reference" ? `${f.name} · ${method}` : `${f.name} (config means)`,
        legendgroup: f.name, legendgrouptitle: {text: f.name},
        error_y: {type: "data", array: gs.map(g => 100 * (g.acc_std || 0)), visible: gs.some(g => g.n > 1),
                  thickness: 1.2, width: 3},
        marker: {size: gs.map(g => g.dense ? 14 : 9), symbol: gs.map(symbol),
                 color: gs.map(g => colourBy === "bits" ? bitColour(g.bits) : colour),
                 line: {width: 1, color: colour}},
        text: gs.map(g => hoverText(f, g)), hovertemplate: "%{text}<extra></extra>",
        customdata: gis.map(gi => [VIEW.fronts.indexOf(f), gi]),
        meta: {role: "means", front: VIEW.fronts.indexOf(f), baseColour: colour},
      });
    });
    // single seeds behind the means, where a config has several
    if (f.points.length && f.groups.some(g => g.n > 1)) {
      const ps = f.points.filter(p => p[X.key]);
      out.push({
        type: "scatter", mode: "markers", x: ps.map(p => p[X.key]), y: ps.map(p => 100 * p.acc),
        name: `${f.name} (single seeds)`, legendgroup: f.name,
        marker: {size: 5, color: f.color, opacity: 0.35}, hoverinfo: "text",
        text: ps.map(p => `${esc(p.run_dir)}<br>seed ${esc(p.seed)}: ${pct(p.acc)}%`),
        meta: {role: "seeds", front: VIEW.fronts.indexOf(f)},
      });
    }
    // the Pareto front of the config means as a step line
    const front = f.groups.filter(g => g[X.flag] && g[X.key]).sort((a, b) => a[X.key] - b[X.key]);
    if (front.length) {
      out.push({
        type: "scatter", mode: "lines", x: front.map(g => g[X.key]), y: front.map(g => 100 * g.acc),
        line: {shape: X.shape, color: f.color, width: 2, dash: f.kind === "reference" ? "dash" : "solid"},
        name: `${f.name} Pareto front`, legendgroup: f.name, hoverinfo: "skip",
        meta: {role: "front", front: VIEW.fronts.indexOf(f)},
      });
    }
  });
  const x0 = lo / 1.15, x1 = hi * 1.15;
  // dense reference lines (and 1 and 2 points below the first front's)
  fronts.forEach((f, fi) => {
    if (f.dense_acc === null || f.dense_acc === undefined) return;
    out.push({
      type: "scatter", mode: "lines", x: [x0, x1], y: [100 * f.dense_acc, 100 * f.dense_acc],
      line: {color: f.color, dash: "dash", width: 1.2}, name: `${f.name} dense ${pct(f.dense_acc)}%`,
      legendgroup: f.name, hovertemplate: `${esc(f.name)} dense fp32: ${pct(f.dense_acc)}%<extra></extra>`,
      meta: {role: "dense", front: VIEW.fronts.indexOf(f)},
    });
    if (fi === 0 && kind === "ratio") {
      [1, 2].forEach(k => out.push({
        type: "scatter", mode: "lines", x: [x0, x1], y: [100 * f.dense_acc - k, 100 * f.dense_acc - k],
        line: {color: f.color, dash: "dot", width: 0.8}, name: `${k} pt below dense`,
        legendgroup: f.name, showlegend: false, hovertemplate: `${k} point below dense<extra></extra>`,
        meta: {role: "within", front: VIEW.fronts.indexOf(f)},
      }));
    }
  });
  if (kind === "latency") {  // the fp32 ONNX model, measured beside every point
    VIEW.fronts.filter(f => f.kind === "sweep").forEach(f => {
      const fp = f.groups.map(g => g.fp32_latency_ms).filter(v => v);
      if (!fp.length || f.dense_acc === null) return;
      const m = fp.reduce((a, b) => a + b, 0) / fp.length;
      out.push({
        type: "scatter", mode: "markers", x: [m], y: [100 * f.dense_acc], name: `${f.name} fp32 ONNX`,
        legendgroup: f.name, marker: {symbol: "star", size: 14, color: f.color},
        hovertemplate: `fp32 ONNX model: ${fmt(m, 3)} ms (mean over the points' measurements)<extra></extra>`,
        meta: {role: "fp32", front: VIEW.fronts.indexOf(f)},
      });
    });
  }
  return {data: out, lo: x0, hi: x1};
}
const REF_SHADES = ["#7f7f7f", "#a6761d", "#666666", "#b3a05b", "#8da0cb", "#bdbdbd", "#c49c94", "#9c9ede",
                    "#e7ba52", "#637939"];

function yRange(kind) {
  const ys = [];
  VIEW.fronts.forEach(f => {
    if (f.dense_acc !== null && f.dense_acc !== undefined) ys.push(100 * f.dense_acc);
    f.groups.forEach(g => { if (g[XS[kind].key]) ys.push(100 * g.acc); });
  });
  if (!ys.length) return undefined;
  const top = Math.max(...ys), dense = VIEW.fronts[0] && VIEW.fronts[0].dense_acc;
  // the interesting region: down to 12 points under dense (lower points stay reachable by zooming out)
  const floor = dense ? 100 * dense - 12 : Math.min(...ys);
  return [Math.max(Math.min(...ys, floor), floor) - 1, Math.min(top + 1.5, 100.5)];
}

function draw(kind, el, height) {
  const t = traces(kind);
  const div = document.getElementById(el);
  if (!t.data.length) {
    const why = {ratio: "point with an accuracy yet (every point failed or is missing)",
                 bops: "BOPs (final/bops) in these records",
                 latency: "measured latency (deploy/onnx_latency_ms) in these records: export was off"};
    div.innerHTML = `<div class="note" style="padding:20px">no ${why[kind]}</div>`;
    div.style.height = "auto";
    return false;
  }
  const zoom = yRange(kind);
  const layout = {
    title: {text: kind === "ratio" ? "test accuracy vs compression ratio" :
            kind === "bops" ? "test accuracy vs BOPs" : "test accuracy vs measured latency", font: {size: 14}},
    xaxis: {type: "log", title: {text: XS[kind].title}},
    yaxis: {title: {text: "test accuracy (%)"}, range: zoom},
    legend: {groupclick: "toggleitem", font: {size: 11}},
    margin: {l: 60, r: 10, t: 40, b: 50}, hovermode: "closest",
    updatemenus: [{type: "buttons", direction: "right", x: 0, xanchor: "left", y: 1.0, yanchor: "bottom",
                   pad: {t: 0, b: 2}, font: {size: 11}, showactive: true, active: 0, buttons: [
      {label: "near dense", method: "relayout", args: [{"yaxis.range": zoom, "yaxis.autorange": false}]},
      {label: "all points", method: "relayout", args: [{"yaxis.autorange": true}]}]}],
  };
  if (kind === "ratio") {  // ticks at doublings of compression
    const ticks = [];
    for (let v = 1; v <= t.hi * 1.01; v *= 2) if (v >= t.lo * 0.99) ticks.push(v);
    if (ticks.length >= 2) Object.assign(layout.xaxis, {tickvals: ticks, ticktext: ticks.map(v => v + "x")});
  }
  Plotly.newPlot(div, t.data, layout, PLOT_CONFIG);
  div.on("plotly_click", ev => {
    const p = ev.points && ev.points[0];
    if (p && p.customdata) showDetail(p.customdata[0], p.customdata[1]);
  });
  return true;
}

function recolour() {
  ["plot-ratio", "plot-bops", "plot-latency"].forEach(id => {
    const div = document.getElementById(id);
    if (!div.data) return;
    div.data.forEach((tr, i) => {
      if (!tr.meta || tr.meta.role !== "means") return;
      const f = VIEW.fronts[tr.meta.front];
      const colours = tr.customdata.map(([fi, gi]) =>
        colourBy === "bits" ? bitColour(VIEW.fronts[fi].groups[gi].bits) : tr.meta.baseColour);
      Plotly.restyle(div, {"marker.color": [colours]}, [i]);
    });
  });
}

function showDetail(fi, gi) {
  const f = VIEW.fronts[fi], g = f.groups[gi];
  const members = g.members.map(r => VIEW.details[String(r)]).filter(d => d);
  document.getElementById("detail-title").textContent = `${g.label} (${f.name})`;
  let sub = `test acc ${pct(g.acc)}%` + (g.n > 1 ? ` ± ${pct(g.acc_std)} (n=${g.n})` : "") +
    `, ratio ${fmt(g.ratio, 2)}x` + (g.size_bits ? `, ${Math.round(g.size_bits).toLocaleString("en-US")} bits` : "") +
    `, status ${g.statuses.join(", ")}`;
  const layersDiv = document.getElementById("detail-layers"), sizeDiv = document.getElementById("detail-size");
  if (!members.length || !members[0].layers.length) {
    sub += g.dense ? ": the dense fp32 model (every layer 32-bit, nothing pruned)" :
      ": no per-layer record for this point";
    document.getElementById("detail-sub").textContent = sub;
    Plotly.purge(layersDiv); Plotly.purge(sizeDiv);
    layersDiv.innerHTML = ""; sizeDiv.innerHTML = "";
    return;
  }
  document.getElementById("detail-sub").textContent = sub + ` · ${members.map(m => m.run_dir).join(", ")}`;
  const names = members[0].layers.map(l => l.name);
  const lt = [];
  members.forEach((m, k) => {
    lt.push({type: "bar", x: m.layers.map(l => l.name), y: m.layers.map(l => l.sparsity),
             name: `sparsity${members.length > 1 ? " seed " + m.seed : ""}`, marker: {color: f.color},
             opacity: members.length > 1 ? 0.5 + 0.5 / (k + 1) : 0.85,
             hovertemplate: "%{x}: %{y:.3f} pruned<extra></extra>"});
  });
  lt.push({type: "scatter", mode: "markers+text", x: members[0].layers.map(l => l.name),
           y: members[0].layers.map(l => l.bits_w), yaxis: "y2", name: "weight bits",
           text: members[0].layers.map(l => `${l.bits_w}b`), textposition: "top center",
           marker: {symbol: "diamond", size: 11, color: "#333"},
           hovertemplate: "%{x}: %{y} bits<extra></extra>"});
  Plotly.newPlot(layersDiv, lt, {
    title: {text: "per-layer sparsity and weight bits", font: {size: 13}}, barmode: "group",
    yaxis: {title: {text: "pruned fraction"}, range: [0, 1.05]},
    yaxis2: {title: {text: "weight bits"}, overlaying: "y", side: "right", range: [0, 34],
             showgrid: false},
    legend: {orientation: "h", y: -0.2}, margin: {l: 55, r: 55, t: 36, b: 40},
  }, PLOT_CONFIG);
  const m = members[0];
  const cats = m.layers.map(l => `${l.name} (${l.format || "?"})`).concat(["other float tensors"]);
  const part = (key, label, colour) => ({
    type: "bar", x: cats, y: m.layers.map(l => l[key] || 0).concat([0]), name: label,
    marker: {color: colour}, hovertemplate: `%{x}: %{y:,} bits ${label}<extra></extra>`});
  const sizeData = [
    part("weight_bits", "weights (incl. index/mask format)", f.color),
    part("qparam_bits", "scales and zero points", "#ff7f0e"),
    part("bias_bits", "float biases", "#7f7f7f"),
    {type: "bar", x: cats, y: m.layers.map(() => 0).concat([m.other_bits || 0]), name: "other float tensors",
     marker: {color: "#bcbd22"}, hovertemplate: "%{x}: %{y:,} bits<extra></extra>"},
  ];
  Plotly.newPlot(sizeDiv, sizeData, {
    title: {text: `where the bits go${members.length > 1 ? " (seed " + m.seed + ")" : ""}`, font: {size: 13}},
    barmode: "stack", yaxis: {title: {text: "bits"}}, legend: {orientation: "h", y: -0.25},
    margin: {l: 60, r: 10, t: 36, b: 40},
  }, PLOT_CONFIG);
  window.qpexpDetail = {front: fi, group: gi, layers: names, members: members.map(x => x.run_dir)};
}

const COLUMNS = [
  ["front", "front", false], ["configs", "configs", true], ["points_failed", "failed or missing", true],
  ["dense_acc", "dense acc %", true, v => pct(v)],
  ["best_ratio_within_1pt", "best ratio within 1 pt", true, v => v === null ? "" : fmt(v, 2) + "x"],
  ["best_ratio_within_1pt_test_acc", "its test acc % (1 pt)", true, v => v === null ? "" : pct(v)],
  ["best_within_1pt/config", "config (1 pt)", false],
  ["best_ratio_within_2pt", "best ratio within 2 pt", true, v => v === null ? "" : fmt(v, 2) + "x"],
  ["best_ratio_within_2pt_test_acc", "its test acc % (2 pt)", true, v => v === null ? "" : pct(v)],
  ["best_within_2pt/config", "config (2 pt)", false],
  ["hypervolume_relative", "hypervolume (own dense − window)", true, v => fmt(v, 2)],
  ["hypervolume_absolute", "hypervolume (shared point)", true, v => fmt(v, 2)],
];

function buildTable() {
  const t = document.getElementById("fronts");
  t.tHead.innerHTML = "<tr>" + COLUMNS.map(([k, label, num], i) =>
    `<th class="sortable${num ? " num" : ""}" data-col="${i}" aria-sort="none">${esc(label)}</th>`).join("") + "</tr>";
  const fill = rows => {
    t.tBodies[0].innerHTML = rows.map(r => "<tr>" + COLUMNS.map(([k, label, num, f]) => {
      const v = r[k] === undefined ? null : r[k];
      const text = f ? f(v) : esc(v);
      const sw = k === "front" ? `<span class="swatch" style="background:${frontColour(r.front)}"></span>` : "";
      return `<td class="${num ? "num" : ""}" data-value="${v === null ? "" : esc(v)}">${sw}${text}</td>`;
    }).join("") + "</tr>").join("");
  };
  let rows = VIEW.table.slice();
  fill(rows);
  t.tHead.querySelectorAll("th").forEach(th => th.addEventListener("click", () => {
    const i = +th.dataset.col, [key, , num] = COLUMNS[i];
    const dir = th.getAttribute("aria-sort") === "descending" ? "ascending" : "descending";
    t.tHead.querySelectorAll("th").forEach(o => o.setAttribute("aria-sort", "none"));
    th.setAttribute("aria-sort", dir);
    const s = dir === "ascending" ? 1 : -1;
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return num ? s * (x - y) : s * String(x).localeCompare(String(y));
    });
    fill(rows);
  }));
  const ref = VIEW.hv_reference_acc;
  document.getElementById("table-note").textContent =
    `Best ratio: the highest seed-mean ratio within 1 / 2 points of the front's own dense accuracy. ` +
    `Hypervolume: area in (log2 ratio, accuracy points) dominated by the config means, above ratio 1 and ` +
    `the front's own dense accuracy − ${pct(VIEW.hv_window, 0)} points (relative), or above ONE shared ` +
    `point for every front (absolute: ratio 1, ${ref === null ? "n/a" : pct(ref) + "%"}). Click a header to sort.`;
}
function frontColour(name) {
  const f = VIEW.fronts.find(x => x.name === name);
  return f ? f.color : "#fff";
}

function buildFailed() {
  const tb = document.querySelector("#failed tbody");
  document.getElementById("failed-title").textContent =
    `Points not ok (${VIEW.failed.length}: failed, missing, or a deployment that does not match)`;
  tb.innerHTML = VIEW.failed.length ? VIEW.failed.map(f =>
    `<tr data-run-dir="${esc(f.run_dir)}"><td>${esc(f.run_dir)}</td>` +
    `<td class="status ${esc(f.status)}">${esc(f.status)}</td><td class="err">${esc(f.error)}</td></tr>`).join("")
    : '<tr><td colspan="3" class="note">every point is ok</td></tr>';
}

function subtitle() {
  const s = VIEW.summary;
  const parts = [`${s.points ?? "?"} points, ${s.points_ok ?? "?"} ok, ${s.points_failed ?? 0} failed or missing`];
  if (s.points_deploy_mismatch) parts.push(`${s.points_deploy_mismatch} deploy mismatch`);
  if (s.points_deploy_error) parts.push(`${s.points_deploy_error} deploy error`);
  if (s.points_not_deployed) parts.push(`${s.points_not_deployed} not deployed`);
  if (s.dense_acc !== undefined) parts.push(`dense ${pct(s.dense_acc)}% (test)`);
  if (s.select) parts.push(`front chosen on ${s.select}, test accuracy shown`);
  parts.push(`${VIEW.fronts.length} front${VIEW.fronts.length > 1 ? "s" : ""}`);
  parts.push(`${CSV.rows.length} rows in frontier.csv`);
  document.getElementById("subtitle").textContent = parts.join(" · ");
}

// what the page shows, for tests and for a reader's console
window.qpexpReport = function () {
  const plots = {};
  ["plot-ratio", "plot-bops", "plot-latency"].forEach(id => {
    const div = document.getElementById(id);
    const rows = new Set(), groups = [];
    (div.data || []).forEach(tr => {
      if (!tr.meta || tr.meta.role !== "means") return;
      tr.customdata.forEach(([fi, gi], k) => {
        const g = VIEW.fronts[fi].groups[gi];
        g.members.forEach(r => rows.add(r));
        groups.push({front: VIEW.fronts[fi].name, label: g.label, x: tr.x[k], y: tr.y[k], members: g.members});
      });
    });
    plots[id] = {traces: (div.data || []).length, names: (div.data || []).map(t => t.name),
                 rows: Array.from(rows).sort((a, b) => a - b), groups: groups};
  });
  return {
    plots: plots,
    failed: Array.from(document.querySelectorAll("#failed tbody tr[data-run-dir]")).map(tr => tr.dataset.runDir),
    table: Array.from(document.querySelectorAll("#fronts tbody tr")).map(tr =>
      Array.from(tr.cells).map(td => td.dataset.value)),
    csvRows: CSV.rows.length,
    detail: window.qpexpDetail || null,
  };
};
window.qpexpShowDetail = showDetail;

subtitle();
draw("ratio", "plot-ratio");
draw("bops", "plot-bops");
draw("latency", "plot-latency");
buildTable();
buildFailed();
document.getElementById("colour-by").addEventListener("change", ev => { colourBy = ev.target.value; recolour(); });
// start with the detail of the first front's best point within 1 point of dense (else its first Pareto point)
(function () {
  const f0 = VIEW.fronts.findIndex(f => f.kind === "sweep");
  if (f0 < 0) return;
  const f = VIEW.fronts[f0];
  let gi = f.groups.findIndex(g => g.label === f.numbers["best_within_1pt/config"] && !g.dense);
  if (gi < 0) gi = f.groups.findIndex(g => g.label === f.numbers["best_within_2pt/config"] && !g.dense);
  if (gi < 0) gi = f.groups.findIndex(g => g.pareto && !g.dense);
  if (gi < 0) gi = f.groups.findIndex(g => !g.dense);
  if (gi >= 0) showDetail(f0, gi);
})();
window.qpexpReady = true;
