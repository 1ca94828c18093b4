// Operator pages, for an admin key: tenants (weight, limits, effective limits; edit, create), queue depth and
// running jobs per queue, workers seen by their leases, usage per tenant, recent failures with their error codes.

import { get, listAll, patch, post, query } from "../api.js";
import { legend, stackedBars } from "../chart.js";
import {
  actionButton,
  announce,
  badge,
  field,
  formatDate,
  formatNumber,
  formatSeconds,
  h,
  humanize,
  notice,
  replace,
  table,
} from "../dom.js";
import { rangeForm } from "./usage.js";

// Tenants --------------------------------------------------------------------------------------------------

export async function tenants(main, ctx) {
  main.append(h("h1", {}, "Tenants"));
  const box = notice();
  const holder = h("div", {});
  const editor = h("div", { id: "tenant-editor" });
  main.append(box, holder, editor);
  let rows = [];

  const render = async () => {
    rows = await listAll("/v1/tenants", { limit: 100, maxPages: 10, signal: ctx.signal });
    replace(
      holder,
      table(
        "Tenants, newest first",
        ["Name", "Weight", "Overrides", "Effective limits", "Created", ""],
        rows.map((t) =>
          h(
            "tr",
            { "data-tenant": t.id },
            h("th", { scope: "row" }, t.name, h("br"), h("small", { class: "mono" }, t.id)),
            h("td", { class: "weight" }, formatNumber(t.weight, 3)),
            h("td", {}, Object.keys(t.limits).length ? limitsList(t.limits) : "none"),
            h("td", {}, h("details", {}, h("summary", {}, "Show"), limitsList(t.effective_limits))),
            h("td", {}, formatDate(t.created_at)),
            h("td", {}, h("button", { type: "button", class: "secondary small", "aria-label": `Edit ${t.name}`, onclick: () => edit(t) }, "Edit")),
          ),
        ),
      ),
    );
  };

  const edit = (tenant) => {
    const formBox = notice();
    const weight = h("input", { type: "number", id: "tenant-weight", min: 0, max: 1000, step: "any", value: tenant.weight, inputmode: "decimal" });
    const inputs = {};
    const limitFields = Object.entries(tenant.effective_limits).map(([name, effective]) => {
      const override = tenant.limits[name];
      const control = h("input", {
        type: "number",
        id: `limit-${name}`,
        min: 0,
        step: "any",
        inputmode: "decimal",
        value: override ?? "",
        placeholder: String(effective),
      });
      inputs[name] = control;
      return field(humanize(name), control, override === undefined ? `empty: the server's default (${formatNumber(effective, 3)})` : "empty: back to the server's default");
    });
    const form = h(
      "form",
      { class: "card", "aria-labelledby": "edit-tenant-title", novalidate: true },
      h("h2", { id: "edit-tenant-title", tabindex: "-1" }, `Edit ${tenant.name}`),
      field("Weight", weight, "its share of the workers under contention (default 1)"),
      h("fieldset", {}, h("legend", {}, "Limit overrides"), h("div", { class: "grid-3" }, limitFields)),
      formBox,
      h(
        "div",
        { class: "actions" },
        h("button", { type: "submit" }, "Save"),
        h("button", { type: "button", class: "secondary", onclick: () => replace(editor) }, "Close"),
      ),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      formBox.clear();
      const body = {};
      if (weight.value.trim() === "") body.weight = null;
      else if (Number(weight.value) !== tenant.weight) body.weight = Number(weight.value);
      const limits = {};
      for (const [name, control] of Object.entries(inputs)) {
        const text = control.value.trim();
        const before = tenant.limits[name];
        if (text === "" && before !== undefined) limits[name] = null;
        else if (text !== "" && Number(text) !== before) limits[name] = Number(text);
      }
      if (Object.keys(limits).length) body.limits = limits;
      if (!Object.keys(body).length) {
        formBox.show("Nothing changed.", "info");
        return;
      }
      try {
        const updated = await patch(`/v1/tenants/${tenant.id}`, body, { signal: ctx.signal });
        announce(`${updated.name} saved: weight ${updated.weight}`);
        await render();
        edit(updated);
        editor.querySelector(".notice").show(`Saved ${updated.name}: weight ${updated.weight}.`, "success");
      } catch (error) {
        formBox.error(error);
      }
    });
    replace(editor, form);
    form.querySelector("h2").focus();
  };

  main.append(createTenantForm(ctx, render));
  await render();
}

function limitsList(limits) {
  return h(
    "dl",
    { class: "limits" },
    Object.entries(limits).map(([name, value]) => h("div", {}, h("dt", {}, humanize(name)), h("dd", {}, formatNumber(value, 3)))),
  );
}

function createTenantForm(ctx, afterCreate) {
  const box = notice();
  const result = h("div", { "aria-live": "polite" });
  const name = h("input", { type: "text", required: true, maxlength: 100, pattern: "[A-Za-z0-9._\\-]{1,100}" });
  const weight = h("input", { type: "number", min: 0, max: 1000, step: "any", placeholder: "1", inputmode: "decimal" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-tenant", novalidate: true },
    h("h2", { id: "new-tenant" }, "Create a tenant"),
    h("div", { class: "grid-3" }, field("Name", name, "letters, digits, '-', '_' or '.'"), field("Weight", weight)),
    box,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Create tenant")),
    result,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    const body = { name: name.value.trim() };
    if (weight.value) body.weight = Number(weight.value);
    try {
      const created = await post("/v1/tenants", body, { signal: ctx.signal });
      name.value = "";
      weight.value = "";
      const keyOut = h("input", { type: "text", readonly: true, value: created.api_key, class: "mono" });
      const secretOut = h("input", { type: "text", readonly: true, value: created.webhook_secret, class: "mono" });
      replace(
        result,
        h(
          "div",
          { class: "notice success" },
          h("p", {}, h("strong", {}, `Tenant ${created.tenant.name} created.`), " Its first API key and webhook signing secret are shown only here, once."),
          field("API key", keyOut),
          field("Webhook secret", secretOut),
        ),
      );
      ctx.onLeave(() => replace(result));
      keyOut.focus();
      await afterCreate();
    } catch (error) {
      box.error(error);
    }
  });
  return form;
}

// Queues and workers -------------------------------------------------------------------------------------------

function autoRefresh(ctx, load, ms = 5000) {
  const stamp = h("p", { class: "hint" });
  const toggle = h("input", { type: "checkbox", id: `auto-${Math.random().toString(36).slice(2)}`, checked: true });
  const refresh = async () => {
    await load();
    stamp.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  };
  ctx.every(async () => {
    if (toggle.checked) await refresh();
  }, ms);
  return {
    controls: h(
      "div",
      { class: "inline-form" },
      actionButton("Refresh", refresh, { class: "secondary small" }),
      h("div", { class: "checkbox" }, toggle, h("label", { for: toggle.id }, `Refresh every ${ms / 1000} s`)),
      stamp,
    ),
    refresh,
  };
}

export async function queues(main, ctx) {
  main.append(h("h1", {}, "Queues"));
  const box = notice();
  const holder = h("div", { class: "queues" });
  const load = async () => {
    try {
      const report = await get("/v1/operator/queues", { signal: ctx.signal });
      box.clear();
      replace(holder, report.queues.map((q) => queueCard(q)));
    } catch (error) {
      box.error(error);
    }
  };
  const auto = autoRefresh(ctx, load);
  main.append(auto.controls, box, holder);
  await auto.refresh();
}

function queueCard(q) {
  const id = `queue-${q.queue}`;
  return h(
    "section",
    { class: "card", "aria-labelledby": id, "data-queue": q.queue },
    h("h2", { id }, `Queue ${q.queue}`),
    h(
      "dl",
      { class: "facts big" },
      h("div", { class: "fact" }, h("dt", {}, "Queued"), h("dd", { class: "queued" }, formatNumber(q.queued))),
      h("div", { class: "fact" }, h("dt", {}, "Running"), h("dd", { class: "running" }, formatNumber(q.running))),
      h("div", { class: "fact" }, h("dt", {}, "Oldest queued"), h("dd", {}, q.oldest_queued_seconds === null ? "—" : formatSeconds(q.oldest_queued_seconds))),
    ),
    table(
      `Queue ${q.queue} per kind of job`,
      ["Kind", "Queued", "Running", "Oldest queued"],
      q.kinds.map((k) =>
        h("tr", {}, h("td", {}, k.kind), h("td", {}, formatNumber(k.queued)), h("td", {}, formatNumber(k.running)), h("td", {}, k.oldest_queued_seconds === null ? "—" : formatSeconds(k.oldest_queued_seconds))),
      ),
    ),
    q.tenants.length
      ? table(
          `Queue ${q.queue} per tenant`,
          ["Tenant", "Queued", "Running"],
          q.tenants.map((t) => h("tr", {}, h("td", {}, t.tenant_name), h("td", {}, formatNumber(t.queued)), h("td", {}, formatNumber(t.running)))),
        )
      : h("p", { class: "hint" }, "No tenant has jobs here."),
  );
}

export async function workers(main, ctx) {
  main.append(h("h1", {}, "Workers"));
  main.append(
    h("p", { class: "hint" }, "Workers as their leases show them: each worker process that holds the lease of a running job. An idle worker holds none and is not listed; an expired lease means its worker stopped renewing it (the reaper hands the job to another)."),
  );
  const box = notice();
  const holder = h("div", {});
  const load = async () => {
    try {
      const report = await get("/v1/operator/workers", { signal: ctx.signal });
      box.clear();
      replace(
        holder,
        report.workers.length
          ? table(
              "Workers holding leases",
              ["Host", "Process", "Queues", "Jobs", "Lease expires", "Lease"],
              report.workers.map((w) =>
                h(
                  "tr",
                  {},
                  h("td", {}, w.host),
                  h("td", { class: "mono" }, w.pid === null ? w.owner : `pid ${w.pid}`),
                  h("td", {}, w.queues.join(", ")),
                  h("td", {}, Object.entries(w.kinds).map(([kind, n]) => `${n} ${kind}${n === 1 ? "" : "s"}`).join(", ")),
                  h("td", {}, formatDate(w.lease_expires_at)),
                  h("td", {}, w.lease_live ? badge("live") : badge("expired")),
                ),
              ),
            )
          : h("p", {}, "No running job holds a lease now."),
      );
    } catch (error) {
      box.error(error);
    }
  };
  const auto = autoRefresh(ctx, load);
  main.append(auto.controls, box, holder);
  await auto.refresh();
}

// Usage per tenant ---------------------------------------------------------------------------------------------

const KINDS = ["training", "generation", "evaluation"];

export async function usage(main, ctx) {
  main.append(h("h1", {}, "Usage per tenant"));
  const box = notice();
  const holder = h("div", {});
  const load = async (start, end) => {
    box.clear();
    try {
      const report = await get(`/v1/operator/usage${query({ start, end })}`, { signal: ctx.signal });
      const tenantsSeen = [...new Set(report.data.map((e) => e.tenant_name || e.tenant_id))];
      const values = {};
      for (const e of report.data) {
        const name = e.tenant_name || e.tenant_id;
        values[name] = values[name] || {};
        values[name][e.kind] = (values[name][e.kind] || 0) + e.worker_seconds;
      }
      replace(
        holder,
        report.data.length
          ? [
              h("div", { class: "chart-holder" }, stackedBars(tenantsSeen.slice(0, 30), KINDS, values, { title: `Worker seconds per tenant, ${report.start} to ${report.end}`, yLabel: "worker seconds" })),
              legend(KINDS),
              table(
                `Usage per tenant and kind, ${report.start} to ${report.end}`,
                ["Tenant", "Kind", "Jobs", "Worker seconds", "Images", "Steps"],
                report.data.map((e) =>
                  h("tr", {}, h("td", {}, e.tenant_name || e.tenant_id), h("td", {}, e.kind), h("td", {}, formatNumber(e.jobs)), h("td", {}, formatNumber(e.worker_seconds, 1)), h("td", {}, formatNumber(e.images)), h("td", {}, formatNumber(e.steps))),
                ),
              ),
            ]
          : h("p", {}, "No finished jobs in this range."),
      );
    } catch (error) {
      box.error(error);
    }
  };
  const range = rangeForm(load);
  main.append(h("section", { class: "card", "aria-labelledby": "range-title" }, h("h2", { id: "range-title" }, "Range"), range.form, box, holder));
  await load(range.start.value, range.end.value);
}

// Failures -----------------------------------------------------------------------------------------------------

export async function failures(main, ctx) {
  main.append(h("h1", {}, "Recent failures"));
  const box = notice();
  const holder = h("div", {});
  const kind = h("select", {}, h("option", { value: "" }, "every kind"), KINDS.map((k) => h("option", { value: k }, k)));
  const limit = h("select", {}, [20, 50, 100].map((n) => h("option", { value: n }, String(n))));
  const load = async () => {
    box.clear();
    try {
      const report = await get(`/v1/operator/failures${query({ kind: kind.value, limit: limit.value })}`, { signal: ctx.signal });
      replace(
        holder,
        report.data.length
          ? table(
              "Failed jobs, newest first",
              ["When", "Kind", "Job", "Tenant", "Error code", "Message", "Attempts"],
              report.data.map((f) =>
                h(
                  "tr",
                  {},
                  h("td", {}, formatDate(f.finished_at || f.created_at)),
                  h("td", {}, f.kind),
                  h("td", { class: "mono" }, f.id),
                  h("td", {}, f.tenant_name || f.tenant_id),
                  h("td", {}, h("code", {}, f.error.code)),
                  h("td", { class: "message" }, f.error.message),
                  h("td", {}, String(f.attempts)),
                ),
              ),
            )
          : h("p", {}, "No failed jobs."),
      );
    } catch (error) {
      box.error(error);
    }
  };
  const form = h("form", { class: "inline-form", "aria-label": "Filter failures" }, field("Kind", kind), field("How many", limit), h("button", { type: "submit", class: "secondary" }, "Show"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  main.append(form, box, holder);
  await load();
}
