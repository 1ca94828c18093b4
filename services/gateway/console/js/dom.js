// Building the page: elements from data with textContent only (never innerHTML with what the server or a user
// sent), formatting, the shared live regions and the confirm dialog.

/**
 * An element: h("button", {type: "button", onclick: f}, "Save"). Attributes: `class`, `for`, `text`,
 * `on<event>` listeners, booleans (true sets, false/null leaves out), anything else as an attribute.
 */
export function h(tag, attributes = {}, ...children) {
  const svg = tag.startsWith("svg:");
  const element = svg
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "text") element.textContent = String(value);
    else if (name === "value" && !svg) element.value = String(value);
    else if (name === "checked" || name === "selected") element[name] = Boolean(value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

let uniqueCounter = 0;
export function uid(prefix = "id") {
  uniqueCounter += 1;
  return `${prefix}-${uniqueCounter}`;
}

/** A labelled form field: the control gets an id, the label points at it, a hint is its description. */
export function field(labelText, control, hint = null) {
  if (!control.id) control.id = uid("field");
  const parts = [h("label", { for: control.id }, labelText), control];
  if (hint) {
    const hintId = uid("hint");
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("small", { id: hintId, class: "hint" }, hint));
  }
  return h("div", { class: "field" }, parts);
}

/** A region that shows one request's error (the envelope's message) or a notice, read out when it changes. */
export function notice() {
  const box = h("div", { class: "notice", role: "alert", hidden: true });
  box.show = (message, kind = "error", details = null) => {
    box.className = `notice ${kind}`;
    replace(box, h("p", {}, message));
    if (Array.isArray(details) && details.length) {
      box.append(
        h(
          "ul",
          {},
          details.slice(0, 8).map((item) => {
            const where = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "body").join(".") : "";
            return h("li", {}, where ? `${where}: ${item.msg ?? JSON.stringify(item)}` : item.msg ?? JSON.stringify(item));
          }),
        ),
      );
    }
    box.hidden = false;
  };
  box.error = (error) => {
    if (error && error.name === "AbortError") return;
    const message = error && error.message ? error.message : String(error);
    box.show(message, "error", error && error.details);
  };
  box.clear = () => {
    box.hidden = true;
    box.replaceChildren();
  };
  return box;
}

/** Say something to screen readers (the page's polite status region). */
export function announce(message) {
  const status = document.getElementById("status");
  status.textContent = "";
  window.setTimeout(() => {
    status.textContent = message;
  }, 50);
}

/** The console's confirm dialog (a modal <dialog>: focus stays in it, Escape cancels). Resolves true or false. */
export function confirmAction(text, okLabel = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = okLabel;
  const opener = document.activeElement;
  dialog.returnValue = "cancel";
  dialog.showModal();
  ok.focus();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        if (opener && typeof opener.focus === "function" && document.contains(opener)) opener.focus();
        resolve(dialog.returnValue === "ok");
      },
      { once: true },
    );
  });
}

/** A button that runs an async action once at a time, busy while it runs. */
export function actionButton(label, action, attributes = {}) {
  const button = h("button", { type: "button", ...attributes }, label);
  button.addEventListener("click", async () => {
    if (button.getAttribute("aria-busy") === "true") return;
    button.setAttribute("aria-busy", "true");
    button.disabled = true;
    try {
      await action(button);
    } finally {
      button.removeAttribute("aria-busy");
      button.disabled = false;
    }
  });
  return button;
}

/** A table in a scrollable, focusable region (keyboard users can scroll it at 200% zoom). */
export function table(caption, headers, rows) {
  return h(
    "div",
    { class: "table-wrap", role: "region", "aria-label": caption, tabindex: "0" },
    h(
      "table",
      {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((header) => h("th", { scope: "col" }, header)))),
      h("tbody", {}, rows),
    ),
  );
}

/** A status as a badge (text, not only color). */
export function badge(status) {
  return h("span", { class: `badge status-${status}` }, status ?? "—");
}

export function formatDate(value) {
  if (!value) return "—";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

export function formatNumber(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toLocaleString(undefined, { maximumFractionDigits: unit ? 1 : 0 })} ${units[unit]}`;
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const total = Math.max(0, Math.round(seconds));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const rest = total % 60;
  if (hours) return `${hours} h ${minutes} min`;
  if (minutes) return `${minutes} min ${rest} s`;
  return `${rest} s`;
}

/** "max_queued_jobs" -> "Max queued jobs". */
export function humanize(name) {
  const text = String(name).replace(/_/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** Save a Blob as a file through a temporary object URL. */
export function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  window.setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** Today and `days - 1` days before it, as YYYY-MM-DD (UTC, as the usage routes count days). */
export function dayRange(days) {
  const end = new Date();
  const start = new Date(end.getTime() - (days - 1) * 86_400_000);
  return [start.toISOString().slice(0, 10), end.toISOString().slice(0, 10)];
}
