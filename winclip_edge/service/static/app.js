// Review page: polls /v1/results (newest first) and draws one card per inspection; a card opens the detail view.
// Text from results (file names, sources) is set with textContent only, never parsed as HTML.
"use strict";
const POLL_MS = 2000;
const LIMIT = 60;
const $ = (id) => document.getElementById(id);
let shown = "";  // the ids drawn last time, to redraw only on change

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function verdictOf(r) {
  if (r.error) return ["error", "error"];
  if (r.anomalous === true) return ["anomalous", "ANOMALOUS"];
  if (r.anomalous === false) return ["normal", "normal"];
  return ["undecided", "no threshold"];
}

function baseName(path) { return path ? String(path).split(/[\\/]/).pop() : ""; }
function fmtScore(x) { return x === null || x === undefined ? "-" : Number(x).toFixed(4); }
function fmtTime(iso) { return iso ? new Date(iso).toLocaleString() : ""; }

function card(r) {
  const [cls, text] = verdictOf(r);
  const node = el("div", {class: "card " + cls, "data-id": r.id, "data-verdict": cls});
  node.append(el("img", {src: r.urls.overlay, alt: "overlay " + (r.file || r.id), loading: "lazy"}));
  node.append(el("div", {class: "meta"},
    el("span", {class: "score"}, fmtScore(r.score)), " ", el("span", {class: "verdict " + cls}, text),
    el("br"), el("span", {class: "file"}, baseName(r.file) || (r.frame !== null && r.frame !== undefined ? "frame " + r.frame : "")),
    el("br"), el("span", {class: "product"}, r.product || ""), " \u00b7 ", el("span", {class: "source"}, String(r.source || "")),
    el("br"), el("span", {class: "time"}, fmtTime(r.captured_at))));
  node.addEventListener("click", () => { location.hash = "result=" + r.id; });
  return node;
}

function openDetail(r) {
  $("detail-title").textContent = (r.file || r.id) + " \u2014 " + verdictOf(r)[1];
  $("detail-image").src = r.urls.image;
  $("detail-overlay").src = r.urls.overlay;
  $("detail-map").href = r.urls.map;
  $("detail-json").href = r.urls.self;
  const table = $("detail-numbers");
  table.replaceChildren();
  for (const key of ["score", "anomalous", "threshold", "zero_shot_score", "mode", "product", "source", "file",
                     "frame", "captured_at", "latency_ms", "model", "weights_id", "id"]) {
    if (r[key] === undefined) continue;
    const value = typeof r[key] === "number" ? (Number.isInteger(r[key]) ? r[key] : r[key].toFixed(6)) : JSON.stringify(r[key]);
    table.append(el("tr", {}, el("td", {}, key), el("td", {}, String(value))));
  }
  $("detail").showModal();
}

// The detail view follows the address (#result=<id>): a link to one inspection opens it directly.
async function showFromHash() {
  const match = /^#result=([0-9a-f]{32})$/.exec(location.hash);
  if (!match) { if ($("detail").open) $("detail").close(); return; }
  const response = await fetch("/v1/results/" + match[1]);
  if (response.ok) openDetail(await response.json());
}

async function loadProducts() {
  const response = await fetch("/v1/products");
  if (!response.ok) return;
  const select = $("product");
  for (const p of (await response.json()).products) select.append(el("option", {value: p.product}, p.product));
}

async function refresh() {
  const query = new URLSearchParams({limit: LIMIT});
  if ($("verdict").value) query.set("anomalous", $("verdict").value);
  if ($("product").value) query.set("product", $("product").value);
  try {
    const response = await fetch("/v1/results?" + query);
    if (!response.ok) throw new Error("HTTP " + response.status);
    const body = await response.json();
    const ids = body.results.map((r) => r.id).join(",");
    if (ids !== shown) {
      $("grid").replaceChildren(...body.results.map(card));
      shown = ids;
    }
    $("empty").hidden = body.results.length > 0;
    $("status").textContent = body.results.length + " shown, " + body.kept + " kept \u00b7 updated " + new Date().toLocaleTimeString();
  } catch (err) {
    $("status").textContent = "cannot reach the station (" + err.message + ")";
  }
}

function loop() {
  if ($("live").checked) refresh();
  setTimeout(loop, POLL_MS);
}

$("verdict").addEventListener("change", refresh);
$("product").addEventListener("change", refresh);
$("detail").addEventListener("close", () => { if (location.hash) history.replaceState(null, "", location.pathname); });
window.addEventListener("hashchange", showFromHash);
loadProducts().then(() => { refresh(); showFromHash(); setTimeout(loop, POLL_MS); });
