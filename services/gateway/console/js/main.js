// The console's shell: sign-in state, navigation, and a small hash router. Pages are modules that render into
// <main> with a context whose signal aborts their requests and timers when the page is left.

import { ApiError, forgetCapabilities, get, onUnauthorized, session } from "./api.js";
import { announce, h, notice, replace } from "./dom.js";
import * as adapters from "./pages/adapters.js";
import * as batches from "./pages/batches.js";
import * as generate from "./pages/generate.js";
import * as keys from "./pages/keys.js";
import * as operator from "./pages/operator.js";
import * as trainings from "./pages/trainings.js";
import * as usage from "./pages/usage.js";

const TENANT_PAGES = [
  { path: "trainings", label: "Train", page: trainings.list },
  { path: "trainings/:id", page: trainings.detail, nav: "trainings" },
  { path: "adapters", label: "Adapters", page: adapters.list },
  { path: "adapters/:id", page: adapters.detail, nav: "adapters" },
  { path: "generate", label: "Generate", page: generate.page },
  { path: "batches", label: "Batches", page: batches.list },
  { path: "batches/:id", page: batches.detail, nav: "batches" },
  { path: "keys", label: "API keys", page: keys.page },
  { path: "usage", label: "Usage", page: usage.page },
];
const ADMIN_PAGES = [
  { path: "operator/tenants", label: "Tenants", page: operator.tenants },
  { path: "operator/queues", label: "Queues", page: operator.queues },
  { path: "operator/workers", label: "Workers", page: operator.workers },
  { path: "operator/usage", label: "Usage", page: operator.usage },
  { path: "operator/failures", label: "Failures", page: operator.failures },
];

let current = null; // the page shown: {controller, cleanups}
let firstRender = true;

function pagesFor(role) {
  return role === "admin" ? ADMIN_PAGES : role === "tenant" ? TENANT_PAGES : [];
}

function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, "");
  const [path, search = ""] = raw.split("?");
  return { path: path.replace(/\/+$/, ""), params: new URLSearchParams(search) };
}

function match(pages, path) {
  const parts = path.split("/");
  for (const entry of pages) {
    const pattern = entry.path.split("/");
    if (pattern.length !== parts.length) continue;
    const found = {};
    const ok = pattern.every((piece, i) => {
      if (piece.startsWith(":")) {
        found[piece.slice(1)] = decodeURIComponent(parts[i]);
        return parts[i] !== "";
      }
      return piece === parts[i];
    });
    if (ok) return { entry, found };
  }
  return null;
}

export function navigate(hash) {
  if (window.location.hash === hash) route();
  else window.location.hash = hash;
}

function renderNav(role, active) {
  const nav = document.getElementById("nav");
  const pages = pagesFor(role).filter((p) => p.label);
  if (!pages.length) {
    replace(nav);
    return;
  }
  replace(
    nav,
    h(
      "ul",
      {},
      pages.map((p) =>
        h("li", {}, h("a", { href: `#/${p.path}`, "aria-current": p.path === active ? "page" : null }, p.label)),
      ),
    ),
  );
  const who = document.getElementById("who");
  replace(
    who,
    h("span", { class: "role" }, role === "admin" ? "Operator (admin key)" : "Tenant key"),
    h("button", { type: "button", class: "secondary small", onclick: signOut }, "Sign out"),
  );
}

function leavePage() {
  if (current) {
    current.controller.abort();
    for (const cleanup of current.cleanups.splice(0)) {
      try {
        cleanup();
      } catch {
        // a cleanup must not stop the others
      }
    }
  }
  current = null;
}

function pageContext() {
  const controller = new AbortController();
  const cleanups = [];
  current = { controller, cleanups };
  return {
    signal: controller.signal,
    navigate,
    /** Run `fn` every `ms` until the page is left (not twice at once). */
    every(fn, ms) {
      let running = false;
      const timer = window.setInterval(async () => {
        if (running || controller.signal.aborted) return;
        running = true;
        try {
          await fn();
        } finally {
          running = false;
        }
      }, ms);
      cleanups.push(() => window.clearInterval(timer));
    },
    /** Wait `ms` (rejects with AbortError when the page is left). */
    sleep(ms) {
      return new Promise((resolve, reject) => {
        const timer = window.setTimeout(resolve, ms);
        controller.signal.addEventListener("abort", () => {
          window.clearTimeout(timer);
          reject(new DOMException("page left", "AbortError"));
        });
      });
    },
    /** An object URL revoked when the page is left. */
    objectUrl(blob) {
      const url = URL.createObjectURL(blob);
      cleanups.push(() => URL.revokeObjectURL(url));
      return url;
    },
    onLeave(fn) {
      cleanups.push(fn);
    },
  };
}

async function route() {
  leavePage();
  const main = document.getElementById("main");
  const { path, params } = parseHash();
  const role = session.key ? session.role : null;
  if (!role) {
    renderNav(null, null);
    replace(document.getElementById("who"));
    await renderPage(main, { path: "signin", label: "Sign in", page: signInPage }, {}, params);
    return;
  }
  const pages = pagesFor(role);
  const found = match(pages, path);
  if (!found) {
    window.location.replace(`#/${pages[0].path}`);
    return;
  }
  renderNav(role, found.entry.nav || found.entry.path);
  await renderPage(main, found.entry, found.found, params);
}

async function renderPage(main, entry, found, params) {
  const context = pageContext();
  replace(main);
  main.setAttribute("aria-busy", "true"); // until the page has its data (and the focus is on its heading)
  try {
    await entry.page(main, context, found, params);
  } catch (error) {
    if (error && error.name === "AbortError") return;
    const box = notice();
    main.append(box);
    box.error(error);
  }
  const heading = main.querySelector("h1");
  document.title = heading ? `${heading.textContent} · Krona console` : "Krona console";
  // The focus goes to the new page's heading, unless the user is already in one of its controls (typing into a
  // form that showed before the page's last data came): taking the focus there would drop their keystrokes.
  if (!firstRender && heading && !main.contains(document.activeElement)) {
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
  firstRender = false;
  if (!context.signal.aborted) main.removeAttribute("aria-busy");
}

// Sign-in -----------------------------------------------------------------------------------------------

/** The key's role: a tenant key reads its own keys; an admin key is refused there with tenant_key_required. */
async function roleOf(key) {
  try {
    await get("/v1/api-keys?limit=1", { key });
    return "tenant";
  } catch (error) {
    if (error instanceof ApiError && error.status === 403 && error.code === "tenant_key_required") return "admin";
    throw error;
  }
}

async function signInPage(main) {
  const box = notice();
  const input = h("input", {
    type: "password",
    id: "api-key",
    name: "api-key",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "api-key-hint",
  });
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h(
    "form",
    { class: "card narrow", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h(
      "p",
      {},
      "Paste an API key: a tenant's key opens its trainings, adapters, images, keys and usage; an admin key opens " +
        "the operator pages. The console can do exactly what the key can, nothing more.",
    ),
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input),
    h(
      "small",
      { id: "api-key-hint", class: "hint" },
      "Kept in this tab's session storage only, until you sign out or close the tab. " +
        "With krona up, the default tenant's key is in .krona/api-key.",
    ),
    box,
    h("div", { class: "actions" }, button),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    const key = input.value.trim();
    if (!key) {
      box.show("Enter an API key.");
      return;
    }
    button.disabled = true;
    try {
      const role = await roleOf(key);
      session.save(key, role);
      forgetCapabilities();
      input.value = "";
      announce(role === "admin" ? "Signed in with an admin key" : "Signed in");
      firstRender = false;
      navigate(role === "admin" ? "#/operator/queues" : "#/trainings");
    } catch (error) {
      box.error(error);
    } finally {
      button.disabled = false;
    }
  });
  main.append(form);
  const reason = window.sessionStorage.getItem("krona.console.signout-reason");
  if (reason) {
    window.sessionStorage.removeItem("krona.console.signout-reason");
    box.show(reason);
  }
}

function signOut() {
  session.clear();
  forgetCapabilities();
  announce("Signed out");
  navigate("#/signin");
}

onUnauthorized((error) => {
  // The key was revoked (maybe from this console) or its tenant deleted: back to sign-in, saying why.
  if (!session.key) return;
  session.clear();
  window.sessionStorage.setItem("krona.console.signout-reason", error.message);
  navigate("#/signin");
});

window.addEventListener("hashchange", route);
route();
