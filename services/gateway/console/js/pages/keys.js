// API keys: the tenant's keys (prefix, name, times); create one (the key is shown once, here), revoke one.

import { del, listAll, post, session } from "../api.js";
import { actionButton, announce, badge, confirmAction, field, formatDate, h, notice, replace, table } from "../dom.js";

export async function page(main, ctx) {
  main.append(h("h1", {}, "API keys"));
  const box = notice();
  const created = h("div", { id: "created-key", "aria-live": "polite" });
  const name = h("input", { type: "text", id: "key-name", maxlength: 100, placeholder: "ci" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-key" },
    h("h2", { id: "new-key" }, "Create a key"),
    h("p", { class: "hint" }, "Rotate without downtime: create a key, switch your clients to it, then revoke the old one."),
    field("Name (optional)", name),
    box,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Create key")),
    created,
  );
  const holder = h("div", {});
  main.append(form, h("section", { "aria-labelledby": "keys-title" }, h("h2", { id: "keys-title" }, "Keys"), holder));

  const render = async () => {
    const keys = await listAll("/v1/api-keys", { limit: 100, maxPages: 1, signal: ctx.signal });
    replace(
      holder,
      table(
        "API keys of this tenant, newest first",
        ["Name", "Prefix", "State", "Created", "Last used", ""],
        keys.map((key) =>
          h(
            "tr",
            { "data-key": key.id },
            h("td", {}, key.name || "—"),
            h("td", {}, h("code", {}, `${key.prefix}…`)),
            h("td", {}, key.revoked_at ? badge("revoked") : badge("active")),
            h("td", {}, formatDate(key.created_at)),
            h("td", {}, formatDate(key.last_used_at)),
            h(
              "td",
              {},
              key.revoked_at
                ? `revoked ${formatDate(key.revoked_at)}`
                : actionButton("Revoke", () => revoke(key), { class: "danger small", "aria-label": `Revoke key ${key.name || key.prefix}` }),
            ),
          ),
        ),
      ),
    );
  };

  const revoke = async (key) => {
    const own = session.key && session.key.startsWith(key.prefix);
    const warning = own ? " This is the key this console is signed in with: you will be signed out." : "";
    if (!(await confirmAction(`Revoke the key ${key.name || key.prefix}? Its next request answers 401.${warning}`, "Revoke key"))) return;
    try {
      await del(`/v1/api-keys/${key.id}`, { signal: ctx.signal });
      announce(`Key ${key.name || key.prefix} revoked`);
      if (created.dataset.keyId === key.id) replace(created); // no need to copy a revoked key
      await render();
    } catch (error) {
      box.error(error);
    }
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    try {
      const body = name.value.trim() ? { name: name.value.trim() } : {};
      const key = await post("/v1/api-keys", body, { signal: ctx.signal });
      name.value = "";
      created.dataset.keyId = key.id;
      const output = h("input", { type: "text", id: "new-key-value", readonly: true, value: key.key, class: "mono" });
      const copy = actionButton("Copy", async () => {
        try {
          await navigator.clipboard.writeText(key.key);
          announce("Key copied");
        } catch {
          output.select();
          announce("Select and copy the key by hand");
        }
      }, { class: "secondary small" });
      replace(
        created,
        h(
          "div",
          { class: "notice success" },
          h("p", {}, h("strong", {}, `Key “${key.name || key.prefix}” created.`), " Copy it now: it is shown only here, once."),
          field("The new key", output),
          copy,
        ),
      );
      output.focus();
      output.select();
      ctx.onLeave(() => replace(created));
      await render();
    } catch (error) {
      box.error(error);
    }
  });
  await render();
}
