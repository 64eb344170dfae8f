// Review page: polls /v1/results (newest first) and draws one card per inspection; a card opens the detail view,
// where an operator gives a verdict (good / defect, with a note). Above: the queue "flagged, not reviewed" with the
// counts, and per product the version served, its drift, a teach button and the versions with rollback buttons.
// Text from results (file names, sources, notes) is set with textContent only, never parsed as HTML.
"use strict";
const POLL_MS = 2000;
const LIMIT = 60;
const QUEUE_LIMIT = 24;
const $ = (id) => document.getElementById(id);
let shown = "";  // the ids (and review marks) drawn last time, to redraw only on change
let queued = "";
let current = null;  // the result open in the detail view
const messages = {};  // product -> [text, failed]: the last teach/rollback outcome, kept across redraws
let products = [];

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
function fmtRate(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + " %"; }
function reviewText(review) { return review ? "reviewed: " + review.verdict + " by " + review.operator : ""; }

async function api(method, path, body) {
  const init = {method: method, headers: {}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer = {};
  try { answer = await response.json(); } catch (err) { answer = {detail: "HTTP " + response.status}; }
  return [response.ok, answer];
}

function card(r, inQueue) {
  const [cls, text] = verdictOf(r);
  const node = el("div", {class: (inQueue ? "queued " : "") + "card " + cls, "data-id": r.id, "data-verdict": cls});
  node.append(el("img", {src: r.urls.overlay, alt: "overlay " + (r.file || r.id), loading: "lazy"}));
  node.append(el("div", {class: "meta"},
    el("span", {class: "score"}, fmtScore(r.score)), " ", el("span", {class: "verdict " + cls}, text),
    el("br"), el("span", {class: "file"}, baseName(r.file) || (r.frame !== null && r.frame !== undefined ? "frame " + r.frame : "")),
    el("br"), el("span", {class: "product"}, r.product || ""), " \u00b7 ", el("span", {class: "source"}, String(r.source || "")),
    r.version !== null && r.version !== undefined ? " \u00b7 v" + r.version : "",
    el("br"), el("span", {class: "time"}, fmtTime(r.captured_at)),
    el("br"), el("span", {class: "reviewed"}, reviewText(r.review))));
  node.addEventListener("click", () => { location.hash = "result=" + r.id; });
  return node;
}

function openDetail(r) {
  current = r;
  $("detail-title").textContent = (r.file || r.id) + " \u2014 " + verdictOf(r)[1];
  $("detail-image").src = r.urls.image;
  $("detail-overlay").src = r.urls.overlay;
  $("detail-map").href = r.urls.map;
  $("detail-json").href = r.urls.self;
  $("verdict-current").textContent = r.review ? reviewText(r.review) + (r.review.note ? " (" + r.review.note + ")" : "")
                                              : "not reviewed";
  $("verdict-status").textContent = "";
  $("verdict-note").value = "";
  const table = $("detail-numbers");
  table.replaceChildren();
  for (const key of ["score", "anomalous", "threshold", "zero_shot_score", "mode", "product", "version", "source",
                     "file", "frame", "captured_at", "latency_ms", "model", "weights_id", "id"]) {
    if (r[key] === undefined) continue;
    const value = typeof r[key] === "number" ? (Number.isInteger(r[key]) ? r[key] : r[key].toFixed(6)) : JSON.stringify(r[key]);
    table.append(el("tr", {}, el("td", {}, key), el("td", {}, String(value))));
  }
  if (!$("detail").open) $("detail").showModal();
}

async function giveVerdict(verdict) {
  if (!current) return;
  const [ok, answer] = await api("POST", "/v1/results/" + current.id + "/verdict",
                                 {verdict: verdict, note: $("verdict-note").value});
  $("verdict-status").textContent = ok ? verdict + " recorded by " + answer.operator +
    (answer.teachable ? " (can be taught)" : "") : "not recorded: " + answer.detail;
  $("verdict-status").dataset.outcome = ok ? "recorded" : "failed";
  if (ok) {
    current.review = {verdict: answer.verdict, operator: answer.operator, at: answer.at, note: answer.note};
    $("verdict-current").textContent = reviewText(current.review);
    refresh();
  }
}

// The detail view follows the address (#result=<id>): a link to one inspection opens it directly.
async function showFromHash() {
  const match = /^#result=([0-9a-f]{32})$/.exec(location.hash);
  if (!match) { if ($("detail").open) $("detail").close(); current = null; return; }
  const response = await fetch("/v1/results/" + match[1]);
  if (response.ok) openDetail(await response.json());
}

async function loadProducts() {
  const response = await fetch("/v1/products");
  if (!response.ok) return;
  const select = $("product");
  products = (await response.json()).products.map((p) => p.product);
  for (const p of products) select.append(el("option", {value: p}, p));
}

function countsText(counts) {
  return Object.entries(counts).map(([p, c]) => p + ": " + c.reviewed + " reviewed (" + c.good + " good, " + c.defect +
    " defect), " + c.false_alarms + " false alarms, " + c.taught + " taught").join(" \u00b7 ");
}

function driftView(d) {
  const node = el("span", {class: "drift"});
  if (!d.watched) { node.append("drift: not watched"); return node; }
  if (!d.calibrated) { node.append("drift: no calibration to watch against"); return node; }
  node.append("drift (" + d.scores + " scores, " + d.reviewed_goods + " reviewed goods): ");
  const names = {false_alarm_rate: "false alarms on goods", ks: "KS", share_above: "flagged share"};
  for (const [key, label] of Object.entries(names)) {
    const value = d.values[key];
    const text = label + " " + (value === null ? "-" : key === "ks" ? value.toFixed(3) : fmtRate(value));
    node.append(d.active[key] ? el("span", {class: "alert", "data-alert": key}, text + " ALERT") : text, "  ");
  }
  return node;
}

function versionsTable(product, listing) {
  const table = el("table", {class: "versions"});
  table.append(el("tr", {}, ...["version", "", "action", "by", "when", "references", "threshold", "target / observed FAR", ""]
    .map((h) => el("th", {}, h))));
  for (const v of listing.versions.slice().reverse()) {
    const serving = v.version === listing.serving;
    const row = el("tr", {class: serving ? "serving" : v.error ? "damaged" : "", "data-version": String(v.version)});
    if (v.error) {
      row.append(el("td", {}, String(v.version)), el("td", {}, v.live ? "live" : ""), el("td", {colspan: "7"}, "damaged: " + v.error));
    } else {
      const button = serving ? "" : el("button", {type: "button", class: "rollback", "data-product": product,
                                                  "data-version": String(v.version)}, "serve this");
      if (button) button.addEventListener("click", () => rollBack(product, v.version));
      row.append(el("td", {}, String(v.version)), el("td", {}, serving ? "serving" : v.live ? "live" : ""),
        el("td", {}, v.action), el("td", {}, v.who), el("td", {}, fmtTime(v.created)),
        el("td", {}, String(v.references === null ? "-" : v.references) + (v.added ? " (+" + v.added + ")" : "")),
        el("td", {}, fmtScore(v.threshold)),
        el("td", {}, fmtRate(v.target_false_alarm_rate) + " / " + fmtRate(v.false_alarm_rate)), el("td", {}, button));
    }
    table.append(row);
  }
  return table;
}

async function productPanel(product) {
  const [[okV, listing], [okD, drift]] = await Promise.all([api("GET", "/v1/products/" + product + "/versions"),
                                                           api("GET", "/v1/products/" + product + "/drift")]);
  const panel = el("div", {class: "product-panel", "data-product": product});
  const teach = el("button", {type: "button", class: "teach", "data-product": product}, "teach good verdicts");
  teach.addEventListener("click", () => teachProduct(product));
  const serving = okV && listing.serving !== null ? "version " + listing.serving : "unversioned files";
  panel.append(el("div", {class: "product-head"}, el("h3", {}, product), el("span", {}, "serving " + serving), teach,
                  okD ? driftView(drift) : ""));
  const message = messages[product];
  panel.append(el("div", {class: "message" + (message && message[1] ? " failed" : ""), "data-product": product},
                  message ? message[0] : ""));
  if (okV && listing.versions.length) panel.append(versionsTable(product, listing));
  return panel;
}

async function refreshProducts() {
  const panels = await Promise.all(products.map(productPanel));
  $("products").replaceChildren(...panels);
}

async function teachProduct(product) {
  messages[product] = ["teaching ...", false];
  refreshProducts();
  const [ok, a] = await api("POST", "/v1/products/" + product + "/teach", {});
  messages[product] = ok ? ["version " + a.version + " is served: " + a.added + " reference(s) added (" + a.references +
    " in all), threshold " + fmtScore(a.previous_threshold) + " \u2192 " + fmtScore(a.threshold), false]
                         : ["not taught: " + a.detail, true];
  await refreshProducts();
}

async function rollBack(product, version) {
  const [ok, a] = await api("POST", "/v1/products/" + product + "/rollback", {version: version});
  messages[product] = ok ? ["version " + a.version + " is served (was " + a.previous + ")", false]
                         : ["not rolled back: " + a.detail, true];
  await refreshProducts();
}

async function refreshQueue() {
  const query = new URLSearchParams({limit: QUEUE_LIMIT});
  if ($("product").value) query.set("product", $("product").value);
  const [ok, body] = await api("GET", "/v1/review/queue?" + query);
  if (!ok) return;
  $("queue-count").textContent = String(body.waiting);
  $("counts").textContent = countsText(body.counts) + " \u00b7 " + body.flagged + " flagged kept";
  const ids = body.queue.map((r) => r.id).join(",");
  if (ids !== queued) {
    $("queue").replaceChildren(...body.queue.map((r) => card(r, true)));
    queued = ids;
  }
  $("queue-empty").hidden = body.queue.length > 0;
}

async function refresh() {
  const query = new URLSearchParams({limit: LIMIT});
  if ($("verdict").value) query.set("anomalous", $("verdict").value);
  if ($("product").value) query.set("product", $("product").value);
  try {
    const response = await fetch("/v1/results?" + query);
    if (!response.ok) throw new Error("HTTP " + response.status);
    const body = await response.json();
    const ids = body.results.map((r) => r.id + (r.review ? r.review.at : "")).join(",");
    if (ids !== shown) {
      $("grid").replaceChildren(...body.results.map((r) => card(r, false)));
      shown = ids;
    }
    $("empty").hidden = body.results.length > 0;
    $("status").textContent = body.results.length + " shown, " + body.kept + " kept \u00b7 updated " + new Date().toLocaleTimeString();
    await refreshQueue();
  } catch (err) {
    $("status").textContent = "cannot reach the station (" + err.message + ")";
  }
}

function loop() {
  if ($("live").checked) refresh().then(refreshProducts);
  setTimeout(loop, POLL_MS);
}

$("verdict").addEventListener("change", refresh);
$("product").addEventListener("change", refresh);
$("verdict-good").addEventListener("click", () => giveVerdict("good"));
$("verdict-defect").addEventListener("click", () => giveVerdict("defect"));
$("detail").addEventListener("close", () => { current = null; if (location.hash) history.replaceState(null, "", location.pathname); });
window.addEventListener("hashchange", showFromHash);
loadProducts().then(() => Promise.all([refresh(), refreshProducts()])).then(() => { showFromHash(); setTimeout(loop, POLL_MS); });
