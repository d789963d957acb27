/*
 * consent.js — consent banner of the KDV statistics collector. No dependencies, no build step,
 * CSP-safe (no eval, no inline handlers, no style attributes).
 *
 *   <script src="https://collector.example/static/consent.js" defer></script>
 *
 * Optional attributes on that script tag:
 *   data-collector="https://collector.example/"  collector base URL; default: the folder above /static/
 *   data-policy-url="/privacy"                   adds a link to the privacy policy to the banner
 *
 * Any element with `data-kdv-consent-open` reopens the banner. API (every method returns a Promise
 * of the collector's consent state): window.kdvConsent = {open, get, accept, reject, withdraw}.
 * After each decision window receives CustomEvent "kdv:consent"; its detail is the collector's answer
 * ({statistics, advertising, policy_version, consent_id, decided_at, stale}) plus `previous`, the
 * state before the decision (null if unknown), so listeners can tell what was just granted.
 *
 * Why this exists: advertising (4.1.11) and offers (4.1.10) need the user's consent, and the page
 * address and referrer the pixel sends (3.3, items 5–6) are personal data (1.1.2). The IP statistics
 * of 3.3.2 (fraud prevention, technical support: 4.1.4, 4.1.9) are stated in the banner, not asked for.
 */
(() => {
  "use strict";
  if (window.kdvConsent) return; // included twice: the first copy stays in charge

  const script = document.currentScript;
  const scriptSrc = (script && script.src) || new URL("/static/consent.js", location.href).href;
  const ENDPOINT = new URL("consent", collectorBase()).href;
  const P = "kdv-consent"; // prefix of every class and id, to stay clear of the host page

  const TEXTS = {
    kk: {
      title: "Cookie файлдары және статистика",
      text: "Таңдауыңызды есте сақтау үшін біз cookie файлын пайдаланамыз. Сіздің келісіміңізбен сайтқа кіру статистикасын жинаймыз және жарнамамыздың тиімділігін өлшейміз. Таңдауыңызды «Cookie баптаулары» бөлімінде кез келген уақытта өзгертуге немесе келісімді қайтарып алуға болады.",
      stale: "Құпиялылық саясатымыз өзгерді. Таңдауыңызды қайта растаңыз.",
      current: "Ағымдағы таңдауыңыз: статистика — {s}, жарнама — {a}.",
      on: "қосулы", off: "өшірулі",
      necessary: "Қажетті",
      necessaryText: "Әрқашан қосулы: IP мекенжайы алаяқтықтың алдын алу және техникалық ақауларды шешу үшін пайдаланылады.",
      statistics: "Статистика",
      statisticsText: "Дүкенді жақсарту үшін қай беттер қаралатынын және келушілердің қайдан келетінін білеміз.",
      advertising: "Жарнама",
      advertisingText: "Жарнама көрсетілімдерін есептейміз және сізге лайық ұсыныстарды таңдаймыз.",
      accept: "Барлығын қабылдау", reject: "Барлығынан бас тарту", settings: "Баптаулар",
      save: "Сақтау", withdraw: "Келісімді қайтарып алу", close: "Жабу",
      policy: "Құпиялылық саясаты",
      error: "Таңдауыңызды сақтау мүмкін болмады. Қайталап көріңіз.",
    },
    ru: {
      title: "Файлы cookie и статистика",
      text: "Мы используем cookie, чтобы запомнить ваш выбор. С вашего согласия мы также собираем статистику посещений и оцениваем эффективность рекламы. Изменить выбор или отозвать согласие можно в любой момент в разделе «Настройки cookie».",
      stale: "Наша политика конфиденциальности изменилась. Пожалуйста, подтвердите выбор ещё раз.",
      current: "Ваш текущий выбор: статистика — {s}, реклама — {a}.",
      on: "включена", off: "выключена",
      necessary: "Необходимые",
      necessaryText: "Всегда включены: IP-адрес используется для защиты от мошенничества и решения технических проблем.",
      statistics: "Статистика",
      statisticsText: "Какие страницы просматривают и откуда приходят посетители — чтобы улучшать магазин.",
      advertising: "Реклама",
      advertisingText: "Учёт показов рекламы и подбор подходящих вам предложений.",
      accept: "Принять все", reject: "Отклонить все", settings: "Настройки",
      save: "Сохранить", withdraw: "Отозвать согласие", close: "Закрыть",
      policy: "Политика конфиденциальности",
      error: "Не удалось сохранить выбор. Попробуйте ещё раз.",
    },
    en: {
      title: "Cookies and statistics",
      text: "We use a cookie to remember your choice. With your consent we also collect visit statistics and measure how well our advertising works. You can change your choice or withdraw consent at any time under “Cookie settings”.",
      stale: "Our privacy policy has changed. Please confirm your choice again.",
      current: "Your current choice: statistics {s}, advertising {a}.",
      on: "on", off: "off",
      necessary: "Necessary",
      necessaryText: "Always on: the IP address is used to prevent fraud and to fix technical problems.",
      statistics: "Statistics",
      statisticsText: "Which pages are viewed and where visitors come from, so we can improve the store.",
      advertising: "Advertising",
      advertisingText: "Counting ad views and choosing offers that suit you.",
      accept: "Accept all", reject: "Reject all", settings: "Settings",
      save: "Save", withdraw: "Withdraw consent", close: "Close",
      policy: "Privacy policy",
      error: "Your choice could not be saved. Please try again.",
    },
  };

  let state = null; // the collector's last answer; the cookie is HttpOnly, so this is all we know
  let ready = null; // Promise of the first GET /consent
  let root = null; // the banner element, built on first show
  let builtLang = "";
  let els = {};
  let returnFocus = null;

  function collectorBase() {
    const explicit = script && script.dataset.collector;
    if (explicit) return new URL(explicit.endsWith("/") ? explicit : explicit + "/", location.href).href;
    return new URL("../", scriptSrc).href; // the script is served at <base>/static/consent.js
  }

  function pickLang() {
    const tags = [document.documentElement.lang, ...(navigator.languages || [navigator.language])];
    for (const tag of tags) {
      const primary = String(tag || "").toLowerCase().split(/[-_]/)[0];
      if (primary === "kz") return "kk"; // a frequent mistake for Kazakh
      if (TEXTS[primary]) return primary;
    }
    return "ru";
  }

  async function request(method, body) {
    const init = { method, credentials: "include", cache: "no-store", headers: { Accept: "application/json" } };
    if (body) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(ENDPOINT, init);
    if (!res.ok) throw new Error(`kdv-consent: ${method} ${ENDPOINT} answered ${res.status}`);
    return res.json();
  }

  // 9.1–9.2: a decision given under an older policy version does not count; ask again.
  const undecided = (s) => !s || !s.decided_at || Boolean(s.stale);
  // consent.source other than "cookie": the store's own consent platform asks and decides, and
  // the collector refuses POST/DELETE (409), so this banner never shows by itself.
  const external = (s) => Boolean(s && s.source && s.source !== "cookie");

  async function get() {
    state = await request("GET");
    return state;
  }

  async function decide(method, body) {
    await ready.catch(() => {}); // so that `previous` is what the page started with
    const previous = state;
    setBusy(true);
    try {
      state = await request(method, body);
    } catch (err) {
      if (els.error) els.error.hidden = false;
      throw err;
    } finally {
      setBusy(false);
    }
    hide();
    window.dispatchEvent(new CustomEvent("kdv:consent", { detail: { ...state, previous } }));
    return state;
  }

  // 4.1.10, 4.1.11: nothing is granted unless the user says so; "Reject" is as easy as "Accept".
  const accept = () => decide("POST", { statistics: true, advertising: true });
  const reject = () => decide("POST", { statistics: false, advertising: false });
  const withdraw = () => decide("DELETE");
  const save = () => decide("POST", { statistics: els.statistics.checked, advertising: els.advertising.checked });

  async function open() {
    returnFocus = returnFocus || document.activeElement;
    await ready.catch(() => {});
    show();
    return state;
  }

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  function button(label, cls, onClick) {
    const b = el("button", { type: "button", className: `${P}__btn ${P}__btn--${cls}`, text: label });
    b.addEventListener("click", () => onClick().catch((err) => console.warn(err)));
    return b;
  }

  function purpose(name, t, fixed = false) {
    const input = el("input", { type: "checkbox", id: `${P}-${name}`, name, className: `${P}__check` });
    if (fixed) Object.assign(input, { checked: true, disabled: true });
    els[name] = input;
    return el("label", { className: `${P}__purpose${fixed ? ` ${P}__purpose--fixed` : ""}`, for: input.id }, [
      input,
      el("span", {}, [
        el("strong", { className: `${P}__name`, text: t[name] }), " ",
        el("span", { className: `${P}__explain`, text: t[`${name}Text`] }),
      ]),
    ]);
  }

  function build(lang) {
    const t = TEXTS[lang];
    if (root) root.remove();
    els = {};
    const text = el("p", { id: `${P}-desc`, className: `${P}__text`, text: t.text });
    const policyUrl = script && script.dataset.policyUrl;
    if (policyUrl) text.append(" ", el("a", { href: policyUrl, className: `${P}__link`, text: t.policy }));
    els.status = el("p", { className: `${P}__status`, hidden: "" });
    els.error = el("p", { className: `${P}__error`, role: "alert", text: t.error, hidden: "" });
    els.settings = el("div", { id: `${P}-settings`, className: `${P}__settings`, hidden: "" }, [
      purpose("necessary", t, true), // 3.3.2: informed of, not asked for
      purpose("statistics", t),
      purpose("advertising", t),
    ]);
    els.accept = button(t.accept, "primary", accept);
    els.reject = button(t.reject, "primary", reject);
    els.toggle = button(t.settings, "secondary", async () => toggleSettings(els.settings.hidden));
    els.toggle.setAttribute("aria-expanded", "false");
    els.toggle.setAttribute("aria-controls", els.settings.id);
    els.save = button(t.save, "primary", save);
    els.save.hidden = true;
    els.withdraw = button(t.withdraw, "secondary", withdraw);
    els.close = button(t.close, "secondary", async () => hide());
    els.t = t;

    root = el("div", {
      className: P, role: "dialog", "aria-modal": "false", tabindex: "-1", lang, hidden: "",
      "aria-labelledby": `${P}-title`, "aria-describedby": `${P}-desc`,
    }, [
      el("div", { className: `${P}__inner` }, [
        el("div", { className: `${P}__body` }, [
          el("h2", { id: `${P}-title`, className: `${P}__title`, text: t.title }),
          text, els.status, els.settings, els.error,
        ]),
        el("div", { className: `${P}__actions` }, [
          els.accept, els.reject, els.toggle, els.save, els.withdraw, els.close,
        ]),
      ]),
    ]);
    root.addEventListener("keydown", onKeydown);
    document.body.append(root);
    builtLang = lang;
  }

  function render() {
    const t = els.t;
    const decided = Boolean(state && state.decided_at);
    els.status.hidden = !decided;
    if (decided) {
      els.status.textContent = state.stale ? t.stale : t.current
        .replace("{s}", state.statistics ? t.on : t.off)
        .replace("{a}", state.advertising ? t.on : t.off);
    }
    // Boxes are never pre-ticked for someone who has not decided (4.1.10, 4.1.11).
    els.statistics.checked = decided && Boolean(state.statistics);
    els.advertising.checked = decided && Boolean(state.advertising);
    els.withdraw.hidden = !decided;
    els.close.hidden = undecided(state); // without a valid decision there is nothing to fall back on
    els.error.hidden = true;
    toggleSettings(false);
  }

  function show(takeFocus = true) {
    const lang = pickLang();
    if (!root || builtLang !== lang) build(lang);
    render();
    root.hidden = false;
    if (takeFocus) root.focus();
  }

  function hide() {
    if (!root || root.hidden) return;
    const hadFocus = root.contains(document.activeElement);
    root.hidden = true;
    if (hadFocus && returnFocus && returnFocus !== document.body && returnFocus.isConnected) {
      returnFocus.focus();
    }
    returnFocus = null;
  }

  function toggleSettings(openIt) {
    els.settings.hidden = !openIt;
    els.save.hidden = !openIt;
    els.toggle.setAttribute("aria-expanded", String(openIt));
    if (openIt) els.statistics.focus();
  }

  function setBusy(busy) {
    if (!root) return;
    root.setAttribute("aria-busy", String(busy));
    for (const b of root.querySelectorAll("button")) b.disabled = busy;
  }

  function onKeydown(event) {
    if (event.key !== "Escape") return;
    if (!els.settings.hidden) {
      toggleSettings(false);
      els.toggle.focus();
      event.stopPropagation();
    } else if (!undecided(state)) {
      hide();
      event.stopPropagation();
    }
  }

  function onOpenerClick(event) {
    const opener = event.target instanceof Element && event.target.closest("[data-kdv-consent-open]");
    if (!opener) return;
    event.preventDefault();
    returnFocus = opener;
    open().catch((err) => console.warn(err));
  }

  // The page may link consent.css itself; otherwise it is loaded from beside this script. The
  // banner waits for it, so it never shows unstyled in the page flow.
  function stylesLoaded() {
    let link = document.querySelector('link[rel~="stylesheet"][href*="consent.css"]');
    if (link && link.sheet) return Promise.resolve();
    if (!link) {
      link = el("link", { rel: "stylesheet", href: new URL("consent.css", scriptSrc).href });
      document.head.append(link);
    }
    return new Promise((resolve) => {
      link.addEventListener("load", resolve, { once: true });
      link.addEventListener("error", resolve, { once: true });
      setTimeout(resolve, 3000);
    });
  }

  function init() {
    document.addEventListener("click", onOpenerClick);
    Promise.all([ready, stylesLoaded()])
      .then(() => {
        // Do not pull focus away from a field the visitor is already typing in.
        if (undecided(state) && !external(state)) {
          show(!document.activeElement || document.activeElement === document.body);
        }
      })
      .catch((err) => console.warn("kdv-consent: consent state unavailable", err));
  }

  ready = get();
  ready.catch(() => {}); // reported once, in init(); this only marks the rejection as handled
  window.kdvConsent = Object.freeze({ open, get, accept, reject, withdraw });
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init, { once: true });
  else init();
})();
