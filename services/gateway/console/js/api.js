// The console's only way to the server: the public /v1 API with the signed-in key in the Authorization header.
// The key lives in this tab's session storage only (never in a URL, a cookie or a log line), so it is gone when
// the tab closes, and the console can do no more than the key can.

const KEY_ITEM = "krona.console.key";
const ROLE_ITEM = "krona.console.role";

// The API's root, relative to where the console is served (/console/ -> /), so a path prefix in front of the
// gateway keeps working.
const API_ROOT = new URL("../", window.location.href);

export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), API_ROOT).toString();
}

export const session = {
  get key() {
    return window.sessionStorage.getItem(KEY_ITEM);
  },
  get role() {
    return window.sessionStorage.getItem(ROLE_ITEM);
  },
  save(key, role) {
    window.sessionStorage.setItem(KEY_ITEM, key);
    window.sessionStorage.setItem(ROLE_ITEM, role);
  },
  clear() {
    window.sessionStorage.removeItem(KEY_ITEM);
    window.sessionStorage.removeItem(ROLE_ITEM);
  },
};

/** An answer of the API that was not a success: the error envelope's code, message and details. */
export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): fall through to the status line
  }
  if (body && body.error && typeof body.error.message === "string") {
    return new ApiError(response.status, body.error.code, body.error.message, body.error.details ?? null);
  }
  return new ApiError(response.status, `http_${response.status}`, `${response.status} ${response.statusText}`.trim());
}

// Listeners told when the key stops working (revoked, deleted tenant): the console signs out.
const unauthorizedListeners = new Set();
export function onUnauthorized(listener) {
  unauthorizedListeners.add(listener);
}

/**
 * One request. `json` sends a JSON body, `form` a FormData (multipart); `raw` returns the Response itself.
 * Throws ApiError with the envelope's message on any error status, or code network_error when nothing answered.
 * An abort (the page was left) is rethrown as the AbortError it is.
 */
export async function request(path, { method = "GET", json, form, signal, raw = false, key, headers = {} } = {}) {
  const useKey = key ?? session.key;
  const sent = { ...headers };
  if (useKey) sent.Authorization = `Bearer ${useKey}`;
  let body;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(apiUrl(path), { method, headers: sent, body, signal, cache: "no-store", credentials: "omit" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", `the gateway did not answer (${error.message})`);
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401 && key === undefined) unauthorizedListeners.forEach((listener) => listener(error));
    throw error;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

export const get = (path, options) => request(path, options);
export const post = (path, json, options = {}) => request(path, { ...options, method: "POST", json });
export const patch = (path, json, options = {}) => request(path, { ...options, method: "PATCH", json });
export const del = (path, options = {}) => request(path, { ...options, method: "DELETE" });

/** A query string from an object, leaving out null, undefined and "" values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

/** Every page of a list route (at most `maxPages` of `limit`), newest first. */
export async function listAll(path, { limit = 100, maxPages = 10, signal, params = {} } = {}) {
  const rows = [];
  let cursor = null;
  for (let pageNumber = 0; pageNumber < maxPages; pageNumber += 1) {
    const page = await get(path + query({ ...params, limit, cursor }), { signal });
    rows.push(...page.data);
    cursor = page.next_cursor;
    if (!cursor) break;
  }
  return rows;
}

/** A binary answer (an image, an adapter file) as a Blob and the file name the server suggests. */
export async function fetchBlob(path, { signal } = {}) {
  const response = await request(path, { raw: true, signal });
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  return { blob: await response.blob(), filename: match ? match[1] : null };
}

/**
 * Follow a server-sent event stream with the Authorization header (EventSource cannot send one): calls
 * `onEvent(name, data)` for each event (data parsed as JSON when it is JSON) until the stream ends or `signal`
 * aborts. Returns normally when the server closed the stream; throws ApiError when it refused to open it.
 */
export async function followEvents(path, { signal, onEvent }) {
  const response = await request(path, { raw: true, signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // Events are separated by a blank line (LF, CRLF or CR line ends).
      const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = blocks.pop();
      for (const block of blocks) dispatchEvent(block, onEvent);
    }
  } finally {
    reader.releaseLock();
  }
}

function dispatchEvent(block, onEvent) {
  let name = "message";
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (line === "" || line.startsWith(":")) continue; // comments keep the connection open
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (data.length === 0) return;
  const text = data.join("\n");
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // plain text data: handed over as it is
  }
  onEvent(name, parsed);
}

// What the server serves (GET /v1/capabilities): base model, native size, limits and defaults; read once per
// sign-in. The console is served by the same gateway, so the route is there; if it fails, fields stay empty and
// the server's defaults apply.
let capabilitiesPromise = null;
export function capabilities() {
  if (capabilitiesPromise === null) capabilitiesPromise = get("/v1/capabilities").catch(() => null);
  return capabilitiesPromise;
}
export function forgetCapabilities() {
  capabilitiesPromise = null;
}
