// Adapters: the list with evaluation scores; one adapter with its sample images, downloads (native or LoKr),
// evaluation and deletion; grids that compare adapters and scales side by side (a batch of generations).

import { capabilities, del, fetchBlob, get, listAll, post, query, request } from "../api.js";
import {
  actionButton,
  announce,
  badge,
  confirmAction,
  field,
  formatBytes,
  formatDate,
  formatNumber,
  h,
  notice,
  replace,
  saveBlob,
  table,
} from "../dom.js";
import { authImage, ENDED } from "../images.js";

function scores(evaluation) {
  if (!evaluation) return "not evaluated";
  if (evaluation.status !== "succeeded") {
    return h("span", {}, badge(evaluation.status), evaluation.error ? ` ${evaluation.error.message}` : "");
  }
  return `CLIP-I ${formatNumber(evaluation.clip_i, 3)} · CLIP-T ${formatNumber(evaluation.clip_t, 3)} · DINO ${formatNumber(evaluation.dino, 3)}`;
}

async function download(adapter, format, box, ctx) {
  try {
    const { blob, filename } = await fetchBlob(`/v1/adapters/${adapter.id}/file${query({ format })}`, { signal: ctx.signal });
    saveBlob(blob, filename || `${adapter.id}.${format}.safetensors`);
    announce(`Downloading ${filename || adapter.id}`);
  } catch (error) {
    box.error(error);
  }
}

function downloadButtons(adapter, box, ctx) {
  return [
    actionButton("Download", () => download(adapter, "krona", box, ctx), {
      class: "secondary small",
      "aria-label": `Download ${adapter.name || adapter.id} (native Krona file)`,
      "data-download": "krona",
    }),
    actionButton("LoKr", () => download(adapter, "lycoris", box, ctx), {
      class: "secondary small",
      "aria-label": `Download ${adapter.name || adapter.id} as a LyCORIS LoKr file (ComfyUI, A1111, Forge)`,
      "data-download": "lycoris",
    }),
  ];
}

async function deleteAdapter(adapter, box, ctx) {
  const label = adapter.name || adapter.id;
  if (!(await confirmAction(`Delete the adapter ${label} and its file? Images made with it stay.`, "Delete adapter"))) return false;
  try {
    await del(`/v1/adapters/${adapter.id}`, { signal: ctx.signal });
    announce(`Adapter ${label} deleted`);
    return true;
  } catch (error) {
    box.error(error);
    return false;
  }
}

export async function list(main, ctx) {
  main.append(h("h1", {}, "Adapters"));
  const box = notice();
  main.append(box);
  const adapters = await listAll("/v1/adapters", { limit: 100, maxPages: 5, signal: ctx.signal });
  if (!adapters.length) {
    main.append(h("p", {}, "No adapters yet: ", h("a", { href: "#/trainings" }, "train one"), "."));
    return;
  }
  const chosen = new Set();
  const rows = adapters.map((a) => {
    const row = h("tr", {});
    const check = h("input", {
      type: "checkbox",
      "aria-label": `Compare ${a.name || a.id}`,
      onchange: () => (check.checked ? chosen.add(a.id) : chosen.delete(a.id)),
    });
    const remove = actionButton("Delete", async () => {
      if (await deleteAdapter(a, box, ctx)) {
        row.remove();
        chosen.delete(a.id);
      }
    }, { class: "danger small", "aria-label": `Delete ${a.name || a.id}` });
    replace(
      row,
      h("td", {}, check),
      h("td", {}, h("a", { href: `#/adapters/${a.id}` }, a.name || a.id)),
      h("td", {}, `${a.config.a1} × ${a.config.a2}`),
      h("td", {}, formatNumber(a.num_parameters)),
      h("td", {}, formatBytes(a.size_bytes)),
      h("td", {}, scores(a.evaluation)),
      h("td", {}, formatDate(a.created_at)),
      h("td", { class: "row-actions" }, downloadButtons(a, box, ctx), remove),
    );
    return row;
  });
  main.append(table("Adapters, newest first", ["Compare", "Name", "Factors a1 × a2", "Parameters", "Size", "Evaluation", "Created", "Actions"], rows));
  main.append(await gridForm(ctx, () => [...chosen], { title: "Compare adapters side by side", scalesDefault: "1", withBase: true }));
}

/**
 * A form that makes a grid: one generation per (adapter, scale) with the same prompt and seed, sent as one batch;
 * the batch's page shows them as a grid as they finish.
 */
async function gridForm(ctx, adaptersChosen, { title, scalesDefault, withBase }) {
  const caps = await capabilities();
  const box = notice();
  const headingId = `grid-${Math.random().toString(36).slice(2)}`;
  const prompt = h("input", { type: "text", required: true, maxlength: 2000, placeholder: "a photo of sks dog on the beach" });
  const seed = h("input", { type: "number", min: 0, max: 2147483647, value: 0, inputmode: "numeric" });
  const scales = h("input", { type: "text", value: scalesDefault, inputmode: "decimal" });
  const steps = h("input", { type: "number", min: 1, inputmode: "numeric", placeholder: String(caps?.generation?.defaults?.steps ?? "default") });
  const size = h("input", { type: "number", min: 64, step: 8, inputmode: "numeric", placeholder: String(caps?.native_resolution ?? "native") });
  const base = withBase ? h("input", { type: "checkbox", checked: true }) : null;
  const form = h(
    "form",
    { class: "card", "aria-labelledby": headingId, novalidate: true },
    h("h2", { id: headingId }, title),
    withBase ? h("p", { class: "hint" }, "Tick adapters in the table, then make the grid: one row per adapter, one column per scale.") : null,
    field("Prompt", prompt),
    h("div", { class: "grid-3" },
      field("Seed", seed, "the same for every image"),
      field("Scales", scales, "comma-separated, 0–2"),
      field("Steps", steps),
      field("Size (px, square)", size, "empty: the model's native size"),
    ),
    withBase ? h("div", { class: "checkbox" }, base, h("label", {}, "Add a row for the base model (no adapter)")) : null,
    box,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Make the grid")),
  );
  if (base) {
    base.id = `${headingId}-base`;
    base.nextSibling.setAttribute("for", base.id);
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    const scaleValues = scales.value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
    if (!scaleValues.length || scaleValues.some((s) => !Number.isFinite(s))) {
      box.show("Scales must be numbers separated by commas, e.g. 0, 0.5, 1.");
      return;
    }
    const adapterIds = adaptersChosen();
    if (!adapterIds.length && !(base && base.checked)) {
      box.show("Choose at least one adapter (or the base model).");
      return;
    }
    const common = { prompt: prompt.value, seed: Number(seed.value || 0) };
    if (steps.value) common.steps = Number(steps.value);
    if (size.value) common.width = common.height = Number(size.value);
    const generations = [];
    if (base && base.checked) generations.push({ ...common });
    for (const id of adapterIds) for (const s of scaleValues) generations.push({ ...common, adapter_id: id, adapter_scale: s });
    try {
      const batch = await post("/v1/batches", { generations }, { signal: ctx.signal });
      announce(`Batch of ${batch.total} queued`);
      ctx.navigate(`#/batches/${batch.id}`);
    } catch (error) {
      box.error(error);
    }
  });
  return form;
}

export async function detail(main, ctx, { id }) {
  const box = notice();
  let adapter = await get(`/v1/adapters/${encodeURIComponent(id)}`, { signal: ctx.signal });
  const title = h("h1", {}, `Adapter ${adapter.name || adapter.id}`);
  main.append(title, box);
  const facts = h("dl", { class: "facts" });
  const evaluationHolder = h("div", { "aria-live": "polite" });
  const showFacts = (a) => {
    replace(
      facts,
      ...[
        ["Id", a.id],
        ["Base model", a.base_model],
        ["Factors", `a1 = ${a.config.a1}, a2 = ${a.config.a2}`],
        ["Layers", a.config.targets.join(", ") || "—"],
        ["Parameters", formatNumber(a.num_parameters)],
        ["Size", formatBytes(a.size_bytes)],
        ["SHA-256", a.sha256],
        ["Training", a.training_id ? h("a", { href: `#/trainings/${a.training_id}` }, a.training_id) : "uploaded"],
        ["Created", formatDate(a.created_at)],
      ].map(([label, value]) => h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, value))),
    );
    replace(evaluationHolder, evaluationView(a.evaluation));
  };
  showFacts(adapter);
  const remove = actionButton("Delete adapter", async () => {
    if (await deleteAdapter(adapter, box, ctx)) ctx.navigate("#/adapters");
  }, { class: "danger" });
  main.append(
    h("section", { class: "card", "aria-labelledby": "about" },
      h("h2", { id: "about" }, "About"),
      facts,
      h("div", { class: "actions" },
        downloadButtons(adapter, box, ctx),
        h("a", { class: "button-like", href: `#/generate?adapter=${adapter.id}` }, "Generate with it"),
        remove,
      ),
    ),
  );

  // Sample images: the latest images made with this adapter.
  const samples = h("div", { class: "tiles" }, h("p", {}, "Loading…"));
  main.append(h("section", { class: "card", "aria-labelledby": "samples" }, h("h2", { id: "samples" }, "Sample images"), samples));
  const made = await get(`/v1/generations${query({ adapter_id: adapter.id, status: "succeeded", limit: 4 })}`, { signal: ctx.signal });
  const tiles = made.data.filter((g) => !g.images_expired_at).flatMap((g) => g.images.map((image) => authImage(ctx, g, image, { size: 160 })));
  replace(samples, tiles.length ? tiles : h("p", {}, "No images made with this adapter yet."));

  // Evaluation.
  main.append(
    h("section", { class: "card", "aria-labelledby": "evaluation" }, h("h2", { id: "evaluation" }, "Evaluation"), evaluationHolder, evaluationForm(ctx, adapter, async () => {
      // Poll the adapter until its evaluation ends.
      for (;;) {
        adapter = await get(`/v1/adapters/${adapter.id}`, { signal: ctx.signal });
        showFacts(adapter);
        if (!adapter.evaluation || ENDED.has(adapter.evaluation.status)) break;
        await ctx.sleep(2000);
      }
      announce(`Evaluation ${adapter.evaluation ? adapter.evaluation.status : "ended"}`);
    })),
  );
  main.append(await gridForm(ctx, () => [adapter.id], { title: "Scale grid", scalesDefault: "0, 0.5, 1, 1.5", withBase: false }));
  if (adapter.evaluation && !ENDED.has(adapter.evaluation.status)) {
    ctx.every(async () => {
      adapter = await get(`/v1/adapters/${adapter.id}`, { signal: ctx.signal }).catch(() => adapter);
      showFacts(adapter);
    }, 3000);
  }
}

function evaluationView(evaluation) {
  if (!evaluation) return h("p", {}, "Not evaluated yet.");
  const rows = [
    ["Status", badge(evaluation.status)],
    ["CLIP-I (subject fidelity)", formatNumber(evaluation.clip_i, 3)],
    ["DINO (subject fidelity)", formatNumber(evaluation.dino, 3)],
    ["CLIP-T (prompt fidelity)", formatNumber(evaluation.clip_t, 3)],
    ["Prompts × images", `${evaluation.prompts} × ${evaluation.images_per_prompt}, ${evaluation.steps} steps`],
    ["Subject", `${evaluation.identifier} ${evaluation.class_noun}`],
    ["Reference photos", String(evaluation.reference_images)],
    ["Finished", formatDate(evaluation.finished_at)],
  ];
  return h(
    "div",
    {},
    h("dl", { class: "facts" }, rows.map(([label, value]) => h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, value)))),
    evaluation.error ? h("div", { class: "notice error", role: "alert" }, h("p", {}, `${evaluation.error.message} (${evaluation.error.code})`)) : null,
  );
}

function evaluationForm(ctx, adapter, afterQueued) {
  const box = notice();
  const photos = h("input", { type: "file", id: "eval-photos", multiple: true, accept: "image/png,image/jpeg,image/webp" });
  const prompts = h("input", { type: "number", id: "eval-prompts", min: 1, max: 25, placeholder: "4" });
  const perPrompt = h("input", { type: "number", id: "eval-per-prompt", min: 1, max: 4, placeholder: "2" });
  const steps = h("input", { type: "number", id: "eval-steps", min: 1, max: 100, placeholder: "25" });
  const classNoun = h("input", { type: "text", id: "eval-class", maxlength: 100, placeholder: adapter.training_id ? "from the instance prompt" : "dog" });
  const submit = h("button", { type: "submit" }, "Evaluate");
  const form = h(
    "form",
    { class: "subform", "aria-label": "Evaluate this adapter", novalidate: true },
    h("p", { class: "hint" }, "Scores generated images against real photos of the subject (CLIP-I, DINO) and against their prompts (CLIP-T). The photos are deleted when it ends."),
    field("Photos of the subject (1–20)", photos),
    h("div", { class: "grid-3" },
      field("Prompts", prompts),
      field("Images per prompt", perPrompt),
      field("Steps", steps),
      field("Class noun", classNoun, adapter.training_id ? null : "required for an uploaded adapter"),
    ),
    box,
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    const body = new FormData();
    for (const file of photos.files) body.append("images", file, file.name);
    const params = {};
    for (const [name, control] of [["prompts", prompts], ["per_prompt", perPrompt], ["steps", steps]]) {
      if (control.value) params[name] = Number(control.value);
    }
    if (classNoun.value.trim()) params.class_noun = classNoun.value.trim();
    if (Object.keys(params).length) body.append("params", JSON.stringify(params));
    submit.disabled = true;
    try {
      await request(`/v1/adapters/${adapter.id}/evaluations`, { method: "POST", form: body, signal: ctx.signal });
      announce("Evaluation queued");
      afterQueued().catch((error) => box.error(error));
    } catch (error) {
      box.error(error);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
