// Batches: many generations in one request, with their counts per status; a batch of one prompt over several
// adapters and scales is shown as a grid (rows: adapters, columns: scales) that fills in as images finish.

import { capabilities, get, listAll, post, query } from "../api.js";
import { announce, badge, field, formatDate, h, notice, replace, table } from "../dom.js";
import { authImage, ENDED, generationCard } from "../images.js";

const STATUSES = ["queued", "running", "canceling", "succeeded", "failed", "canceled"];

function countsView(counts, total) {
  return h(
    "ul",
    { class: "counts", "aria-label": `Counts of ${total} generations` },
    STATUSES.map((s) => h("li", { class: `count status-${s}` }, h("span", { class: "badge status-" + s }, s), ` ${counts[s] ?? 0}`)),
  );
}

export async function list(main, ctx) {
  main.append(h("h1", {}, "Batches"));
  const caps = await capabilities();
  const box = notice();
  const prompts = h("textarea", { rows: 4, required: true, placeholder: "a photo of sks dog on the moon\na photo of sks dog in the snow" });
  const adapters = await listAll("/v1/adapters", { limit: 100, maxPages: 5, signal: ctx.signal });
  const adapter = h("select", {}, h("option", { value: "" }, "Base model (no adapter)"), adapters.map((a) => h("option", { value: a.id }, `${a.name || "unnamed"} (${a.id})`)));
  const steps = h("input", { type: "number", min: 1, inputmode: "numeric", placeholder: String(caps?.generation?.defaults?.steps ?? "default") });
  const size = h("input", { type: "number", min: 64, step: 8, inputmode: "numeric", placeholder: String(caps?.native_resolution ?? "native") });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-batch", novalidate: true },
    h("h2", { id: "new-batch" }, "New batch"),
    field("Prompts, one per line", prompts, caps?.generation?.max_batch_generations ? `up to ${caps.generation.max_batch_generations}` : null),
    h("div", { class: "grid-3" }, field("Adapter", adapter), field("Steps", steps), field("Size (px, square)", size, "empty: native")),
    box,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Queue the batch")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    const lines = prompts.value.split("\n").map((line) => line.trim()).filter(Boolean);
    if (!lines.length) {
      box.show("Write at least one prompt.");
      return;
    }
    const common = {};
    if (adapter.value) common.adapter_id = adapter.value;
    if (steps.value) common.steps = Number(steps.value);
    if (size.value) common.width = common.height = Number(size.value);
    try {
      const batch = await post("/v1/batches", { generations: lines.map((prompt) => ({ ...common, prompt })) }, { signal: ctx.signal });
      announce(`Batch of ${batch.total} queued`);
      ctx.navigate(`#/batches/${batch.id}`);
    } catch (error) {
      box.error(error);
    }
  });
  main.append(form);
  const batches = await get(`/v1/batches${query({ limit: 20 })}`, { signal: ctx.signal });
  main.append(h("h2", {}, "Recent batches"));
  if (!batches.data.length) {
    main.append(h("p", {}, "No batches yet."));
    return;
  }
  main.append(
    table(
      "Batches, newest first",
      ["Batch", "Generations", "Counts", "Created"],
      batches.data.map((b) =>
        h("tr", {}, h("td", {}, h("a", { href: `#/batches/${b.id}` }, b.id)), h("td", {}, String(b.total)), h("td", {}, countsView(b.counts, b.total)), h("td", {}, formatDate(b.created_at))),
      ),
    ),
  );
}

export async function detail(main, ctx, { id }) {
  const box = notice();
  main.append(h("h1", {}, `Batch ${id}`), box);
  const countsHolder = h("div", { "aria-live": "polite" });
  const body = h("div", {});
  main.append(h("section", { class: "card", "aria-labelledby": "batch-counts" }, h("h2", { id: "batch-counts" }, "Counts"), countsHolder), body);
  const cells = new Map(); // generation id -> {status, element}
  let layout = null;
  const adapterNames = new Map(
    (await listAll("/v1/adapters", { limit: 100, maxPages: 5, signal: ctx.signal })).map((a) => [a.id, a.name || a.id]),
  );
  const refresh = async () => {
    const batch = await get(`/v1/batches/${encodeURIComponent(id)}`, { signal: ctx.signal });
    replace(countsHolder, countsView(batch.counts, batch.total));
    const generations = await listAll("/v1/generations", { limit: 100, maxPages: 10, signal: ctx.signal, params: { batch_id: id } });
    generations.sort((a, b) => (a.id < b.id ? -1 : 1));
    if (layout === null) layout = buildLayout(ctx, generations, body, cells, adapterNames);
    for (const g of generations) {
      const cell = cells.get(g.id);
      if (!cell || cell.status === g.status) continue;
      cell.status = g.status;
      cell.update(g);
    }
    return generations.every((g) => ENDED.has(g.status));
  };
  if (await refresh()) return;
  const poll = async () => {
    try {
      if (await refresh()) return;
    } catch (error) {
      if (error.name === "AbortError") return;
      box.error(error);
    }
    ctx.sleep(1500).then(poll, () => {});
  };
  ctx.sleep(1500).then(poll, () => {});
}

/** A grid when the batch varies adapters or scales over one prompt, else a card per generation. */
function buildLayout(ctx, generations, body, cells, adapterNames) {
  const rowKey = (g) => g.adapter_id || "";
  const rowsKeys = [...new Set(generations.map(rowKey))];
  const scales = [...new Set(generations.filter((g) => g.adapter_id).map((g) => g.adapter_scale))].sort((a, b) => a - b);
  const prompts = new Set(generations.map((g) => g.prompt));
  const isGrid = prompts.size === 1 && generations.length > 1 && (rowsKeys.length > 1 || scales.length > 1);
  if (!isGrid) {
    const list = h("div", { class: "results" });
    body.append(h("section", { "aria-labelledby": "batch-generations" }, h("h2", { id: "batch-generations" }, "Generations"), list));
    for (const g of generations) {
      const card = generationCard(ctx, g);
      list.append(card);
      cells.set(g.id, { status: g.status, update: card.update });
    }
    return "cards";
  }
  const columns = scales.length ? scales : [null];
  const header = h("tr", {}, h("th", { scope: "col" }, "Adapter"), columns.map((s) => h("th", { scope: "col" }, s === null ? "—" : `scale ${s}`)));
  const rows = rowsKeys.map((key) => {
    const row = h("tr", {}, h("th", { scope: "row" }, key ? adapterNames.get(key) || key : "Base model"));
    const inRow = generations.filter((g) => rowKey(g) === key);
    columns.forEach((scale, index) => {
      const g = key ? inRow.find((x) => x.adapter_scale === scale) : index === 0 ? inRow[0] : null;
      const td = h("td", {});
      row.append(td);
      if (!g) return;
      const update = (gen) => {
        if (gen.status === "succeeded" && gen.images.length) {
          replace(td, gen.images.map((image) => authImage(ctx, gen, image, { size: 160 })));
        } else {
          replace(td, h("div", { class: "placeholder" }, badge(gen.status), gen.error ? ` ${gen.error.message}` : ""));
        }
      };
      cells.set(g.id, { status: null, update });
    });
    return row;
  });
  body.append(
    h("section", { class: "card", "aria-labelledby": "grid-title" },
      h("h2", { id: "grid-title" }, "Grid"),
      h("p", {}, `“${[...prompts][0]}”, seed ${generations[0].seed}`),
      h("div", { class: "table-wrap", role: "region", "aria-label": "Grid of images", tabindex: "0" },
        h("table", { class: "grid-table" }, h("thead", {}, header), h("tbody", {}, rows)),
      ),
    ),
  );
  return "grid";
}
