/*
 * pixel.js — optional helper for the collector's statistics pixel. A plain
 *   <img src="https://collector.example/p.gif?e=banner-1" alt="" width="1" height="1">
 * works without it; this script only augments such images when they carry `data-kdv-pixel`:
 * it adds u (page address), r (referrer) and e (placement, from data-placement) to their src.
 *
 *   <script src="https://collector.example/static/pixel.js" defer></script>
 *   (optional data-collector="https://collector.example/" — default: the folder above /static/)
 *
 * API: window.kdvPixel.hit(placement) sends one more hit with a new Image() and returns a Promise
 * that resolves to true when the GIF loaded, false otherwise; window.kdvPixel.scan(root) augments
 * pixel images inside root (images added to the page later are picked up automatically).
 *
 * Consent is decided by the collector from its kdv_consent cookie, not here; the pixel is always
 * sent. When consent.js reports (event "kdv:consent") that statistics was just granted, the hits of
 * this page view are sent once more, so the view is counted under consent without a reload.
 */
(() => {
  "use strict";
  if (window.kdvPixel) return;

  const script = document.currentScript;
  const scriptSrc = (script && script.src) || new URL("/static/pixel.js", location.href).href;
  const explicit = script && script.dataset.collector;
  const base = explicit ? new URL(explicit.endsWith("/") ? explicit : explicit + "/", location.href)
    : new URL("../", scriptSrc); // the script is served at <base>/static/pixel.js
  const DEFAULT_PIXEL = new URL("p.gif", base).href;
  const MAX_URL = 1500; // keeps the pixel URL under common server and proxy limits

  const augmented = new WeakSet();
  const sent = new Map(); // placement -> pixel URL, for re-sending after consent
  const inFlight = new Set(); // keeps Image objects alive until they finish
  let counter = 0;

  // 3.3 items 5–6: the address of the page carrying the pixel and the referrer. The fragment is
  // dropped: browsers never send it to servers, and it can hold tokens.
  function pageAddress() {
    const url = new URL(location.href);
    url.hash = "";
    return url.href.slice(0, MAX_URL);
  }

  function withPageParams(src, placement) {
    const url = new URL(src, document.baseURI);
    url.searchParams.set("u", pageAddress()); // URLSearchParams does the URL-encoding
    url.searchParams.set("r", document.referrer.slice(0, MAX_URL));
    if (placement) url.searchParams.set("e", placement);
    return url;
  }

  function placementOf(img, src) {
    return img.dataset.placement || new URL(src, document.baseURI).searchParams.get("e") || "";
  }

  function augment(img) {
    if (augmented.has(img)) return;
    augmented.add(img);
    const src = img.getAttribute("src") || DEFAULT_PIXEL;
    const placement = placementOf(img, src);
    sent.set(placement, new URL(src, document.baseURI).href);
    img.src = withPageParams(src, placement).href;
  }

  function scan(root = document) {
    if (root instanceof HTMLImageElement && root.hasAttribute("data-kdv-pixel")) augment(root);
    if (root.querySelectorAll) root.querySelectorAll("img[data-kdv-pixel]").forEach(augment);
  }

  function send(src, placement) {
    const url = withPageParams(src, placement);
    // A URL already shown on the page may be answered from the browser's image cache without any
    // request; a unique `_` makes sure the hit reaches the collector (which ignores `_`).
    url.searchParams.set("_", `${Date.now().toString(36)}${(counter++).toString(36)}`);
    sent.set(placement, new URL(src, document.baseURI).href);
    return new Promise((resolve) => {
      const img = new Image(1, 1);
      inFlight.add(img);
      const done = (ok) => {
        inFlight.delete(img);
        resolve(ok);
      };
      img.addEventListener("load", () => done(true), { once: true });
      img.addEventListener("error", () => done(false), { once: true });
      img.src = url.href;
    });
  }

  function hit(placement = "") {
    return send(DEFAULT_PIXEL, String(placement));
  }

  function onConsent(event) {
    const d = event.detail || {};
    const before = d.previous;
    const hadStatistics = Boolean(before && before.statistics && before.decided_at && !before.stale);
    if (!d.statistics || d.stale || hadStatistics) return;
    for (const [placement, src] of [...sent]) send(src, placement);
  }

  function start() {
    scan(document);
    new MutationObserver((records) => {
      for (const record of records) record.addedNodes.forEach((node) => node.nodeType === 1 && scan(node));
    }).observe(document.documentElement, { childList: true, subtree: true });
  }

  window.addEventListener("kdv:consent", onConsent);
  window.kdvPixel = Object.freeze({ hit, scan });
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start, { once: true });
  else start();
})();
