// KDV statistics dashboard. No inline code (CSP script-src 'self'); every string that
// comes from the server is put into the page with textContent, never as HTML.
"use strict";
(function () {
  const KEY = "kdv-stats-token";
  const DIMS = ["page", "referrer", "browser", "os", "device_class", "country", "placement", "source"];
  const $ = (id) => document.getElementById(id);
  let chart = null;
  let k = 5;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const pct = (r) => (r === null || r === undefined ? "–" : (r * 100).toFixed(1) + " %");
  const isoDay = (d) => d.toISOString().slice(0, 10);

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  async function api(path, params) {
    const url = new URL(path, window.location.origin);
    for (const [name, value] of Object.entries(params || {})) {
      if (value) url.searchParams.set(name, value);
    }
    const res = await fetch(url, {
      headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY), Accept: "application/json" },
    });
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) {
      const detail = body && body.detail ? body.detail : res.status + " " + res.statusText;
      throw new ApiError(res.status, detail);
    }
    return body;
  }

  function showLogin(message) {
    $("main").hidden = true;
    $("who").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  async function start() {
    if (!sessionStorage.getItem(KEY)) { showLogin(""); return; }
    let me;
    try {
      me = await api("/api/whoami");
    } catch (e) {
      sessionStorage.removeItem(KEY);
      showLogin(e.message);
      return;
    }
    $("login").hidden = true;
    $("main").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = me.name + " (" + me.role + ")";
    $("engineer").hidden = !(me.role === "engineer" || me.role === "admin");
    if (!$("to").value) setDays(30);
    await refresh();
  }

  function setDays(days) {
    const to = new Date();
    const from = new Date(to.getTime() - (days - 1) * 86400000);
    $("from").value = isoDay(from);
    $("to").value = isoDay(to);
  }

  function params(extra) {
    return Object.assign({ from: $("from").value, to: $("to").value, source: $("source").value }, extra || {});
  }

  async function refresh() {
    $("error").textContent = "";
    const csv = new URL("/api/stats/breakdown", window.location.origin);
    for (const [n, v] of Object.entries(params({ by: "page", limit: "100", format: "csv" }))) {
      if (v) csv.searchParams.set(n, v);
    }
    $("csv").href = csv.toString();
    const jobs = [loadSummary(), loadSeries(), ...DIMS.map(loadBars)];
    if (!$("engineer").hidden) jobs.push(loadSuspicious());
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) $("error").textContent = failed.reason.message;
  }

  async function loadSummary() {
    const [s, c] = await Promise.all([
      api("/api/stats/summary", params()),
      api("/api/stats/consent", { from: $("from").value, to: $("to").value }),
    ]);
    k = s.k;
    for (const node of document.querySelectorAll(".k")) node.textContent = String(k);
    $("t-hits").textContent = s.suppressed ? "hidden" : fmt(s.hits);
    $("t-visitors").textContent = s.suppressed ? "hidden" : fmt(s.visitors);
    const t = c.total;
    $("t-consent").textContent = pct(t.rate);
    $("t-consent-detail").textContent =
      "granted " + fmt(t.granted) + " · refused " + fmt(t.refused) +
      " · no decision " + fmt(t.absent) + " · invalid " + fmt(t.invalid);
  }

  async function loadSeries() {
    const body = await api("/api/stats/timeseries", params({ granularity: "day" }));
    const xs = [], hits = [], visitors = [];
    for (const item of body.items) {
      xs.push(Date.parse(item.t + "T00:00:00Z") / 1000);
      hits.push(item.hits);
      visitors.push(item.visitors);
    }
    const box = $("chart");
    const width = Math.max(300, box.clientWidth);
    const opts = {
      width: width, height: 300,
      scales: { x: { time: true } },
      series: [
        {},
        { label: "Hits", stroke: "#2563eb", width: 2, fill: "rgba(37,99,235,0.08)" },
        { label: "Unique visitors", stroke: "#16a34a", width: 2 },
      ],
      axes: [{}, { size: 60 }],
    };
    if (chart) chart.destroy();
    box.replaceChildren();
    chart = new window.uPlot(opts, [xs, hits, visitors], box);
  }

  async function loadBars(by) {
    const box = document.querySelector('.bars[data-by="' + by + '"]');
    const body = await api("/api/stats/breakdown", params({ by: by, limit: "10" }));
    box.replaceChildren();
    const head = el("div", "bar-row bar-head");
    head.append(el("span", "", by.replace("_", " ")), el("span", "bar-num", "hits"),
      el("span", "bar-num", "visitors"));
    box.append(head);
    const max = Math.max(1, ...body.items.map((i) => i.hits), body.other.hits);
    const rows = body.items.map((i) => [i.value, i.hits, i.visitors, false]);
    if (body.other.hits > 0) rows.push(["other", body.other.hits, null, true]);
    if (rows.length === 0) box.append(el("p", "muted", "No data in this range."));
    for (const [label, n, v, isOther] of rows) {
      const row = el("div", "bar-row" + (isOther ? " other" : ""));
      const track = el("div", "bar-track");
      const fill = el("div", "bar-fill");
      fill.style.width = ((100 * n) / max).toFixed(1) + "%";
      const name = el("span", "bar-label", label);
      name.title = label;
      track.append(fill, name);
      row.append(track, el("span", "bar-num", fmt(n)), el("span", "bar-num", v === null ? "" : fmt(v)));
      box.append(row);
    }
  }

  async function loadSuspicious() {
    $("ip-error").textContent = "";
    const tbody = document.querySelector("#ip-table tbody");
    tbody.replaceChildren();
    let body;
    try {
      body = await api("/api/ip", { date: $("to").value, sort: "score", limit: "50" });
    } catch (e) {
      $("ip-error").textContent = "IP statistics: " + e.message;
      return;
    }
    for (const item of body.items || []) {
      const tr = document.createElement("tr");
      const cells = [item.ip, item.network, item.score, (item.rules || []).join(", "), item.hits,
        item.visitors, item.country, item.asn ? "AS" + item.asn + " " + (item.as_org || "") : "",
        item.crawler ? "yes" : ""];
      cells.forEach((value, i) => {
        const td = el("td", [2, 4, 5].includes(i) ? "num" : "", value === null || value === undefined ? "" : value);
        tr.append(td);
      });
      tr.addEventListener("click", () => { $("ip").value = item.ip; lookup(); });
      tbody.append(tr);
    }
    if (!(body.items || []).length) {
      const tr = document.createElement("tr");
      const td = el("td", "muted", "No scored IPs on this day.");
      td.colSpan = 9;
      tr.append(td);
      tbody.append(tr);
    }
  }

  async function lookup() {
    const out = $("ip-result");
    out.replaceChildren();
    const ip = $("ip").value.trim();
    if (!ip) return;
    try {
      const body = await api("/api/ip/" + encodeURIComponent(ip));
      const h = el("h3", "", (body.ip || ip) + (body.network ? " · " + body.network : "") +
        " · score " + (body.score === undefined ? "–" : body.score));
      const list = el("ul");
      for (const s of body.signals || []) list.append(el("li", "", s.rule + ": " + s.explanation));
      const pre = el("pre", "", JSON.stringify({ geo: body.geo, days: body.days, hits: body.hits }, null, 2));
      out.append(h, list, pre);
    } catch (e) {
      out.append(el("p", "error", "Lookup failed: " + e.message));
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, $("token").value.trim());
      $("token").value = "";
      start();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showLogin("Signed out.");
    });
    $("range").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });
    for (const b of document.querySelectorAll("[data-days]")) {
      b.addEventListener("click", () => { setDays(Number(b.dataset.days)); refresh(); });
    }
    $("ip-form").addEventListener("submit", (ev) => { ev.preventDefault(); lookup(); });
    $("csv").addEventListener("click", async (ev) => {
      // A plain link cannot send the bearer token: fetch, then hand the browser a blob.
      ev.preventDefault();
      const res = await fetch($("csv").href, { headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) } });
      if (!res.ok) { $("error").textContent = "CSV export failed: " + res.status; return; }
      const url = URL.createObjectURL(await res.blob());
      const a = el("a");
      a.href = url;
      a.download = "top-pages.csv";
      a.click();
      URL.revokeObjectURL(url);
    });
    window.addEventListener("resize", () => {
      if (chart) chart.setSize({ width: Math.max(300, $("chart").clientWidth), height: 300 });
    });
    start();
  });
})();
