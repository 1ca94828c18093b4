// Generate: prompt, adapter, scale, seed, size, number of images; the images appear as the generation finishes,
// newest first, above the tenant's recent generations.

import { capabilities, listAll, post } from "../api.js";
import { announce, field, h, notice } from "../dom.js";
import { generationCard, pollGeneration } from "../images.js";

function numberInput(id, { min, max, step = "1", value = "", placeholder = "" } = {}) {
  return h("input", { type: "number", id, min, max, step, value, placeholder, inputmode: step === "1" ? "numeric" : "decimal" });
}

export async function page(main, ctx, _params, search) {
  main.append(h("h1", {}, "Generate images"));
  const [caps, adapters] = await Promise.all([
    capabilities(),
    listAll("/v1/adapters", { limit: 100, maxPages: 5, signal: ctx.signal }),
  ]);
  const defaults = caps?.generation?.defaults || {};
  const box = notice();

  const prompt = h("textarea", { id: "prompt", rows: 2, required: true, maxlength: 2000, placeholder: "a photo of sks dog on the moon" });
  const negative = h("textarea", { id: "negative-prompt", rows: 1, maxlength: 2000 });
  const adapter = h(
    "select",
    { id: "adapter" },
    h("option", { value: "" }, "Base model (no adapter)"),
    adapters.map((a) => h("option", { value: a.id, selected: a.id === search.get("adapter") }, `${a.name || "unnamed"} (${a.id})`)),
  );
  const scale = numberInput("adapter-scale", { min: 0, max: 2, step: "0.05", value: defaults.adapter_scale ?? "", placeholder: "1" });
  const seed = numberInput("seed", { min: 0, max: 2147483647, placeholder: "random" });
  const width = numberInput("width", { min: 64, max: 2048, step: "8", placeholder: defaults.width ? String(defaults.width) : "native" });
  const height = numberInput("height", { min: 64, max: 2048, step: "8", placeholder: defaults.height ? String(defaults.height) : "native" });
  const steps = numberInput("steps", { min: 1, max: caps?.generation?.max_steps, placeholder: defaults.steps !== undefined ? String(defaults.steps) : "default" });
  const guidance = numberInput("guidance-scale", { min: 0, max: 30, step: "0.5", placeholder: defaults.guidance_scale !== undefined ? String(defaults.guidance_scale) : "default" });
  const count = numberInput("num-images", { min: 1, max: caps?.generation?.max_num_images, value: defaults.num_images ?? 1 });
  const submit = h("button", { type: "submit" }, "Generate");
  const results = h("div", { class: "results", id: "results" });

  const form = h(
    "form",
    { class: "card", "aria-labelledby": "generate-title", novalidate: true },
    h("h2", { id: "generate-title" }, "New generation"),
    field("Prompt", prompt),
    field("Negative prompt (optional)", negative),
    h("div", { class: "grid-3" },
      field("Adapter", adapter),
      field("Adapter scale", scale, "0–2; 1 is the adapter as trained"),
      field("Seed", seed, "empty: random"),
      field("Width (px)", width, "multiple of 8; empty: the model's native size"),
      field("Height (px)", height, "multiple of 8"),
      field("Steps", steps),
      field("Guidance scale", guidance),
      field("Number of images", count, caps?.generation?.max_num_images ? `1–${caps.generation.max_num_images}` : null),
    ),
    box,
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    const body = { prompt: prompt.value };
    const numbers = { adapter_scale: scale, seed, width, height, steps, guidance_scale: guidance, num_images: count };
    for (const [name, control] of Object.entries(numbers)) {
      const text = control.value.trim();
      if (text === "") continue;
      const value = Number(text);
      if (!Number.isFinite(value)) {
        box.show(`${control.labels?.[0]?.textContent || name} must be a number.`);
        return;
      }
      body[name] = value;
    }
    if (negative.value.trim()) body.negative_prompt = negative.value;
    if (adapter.value) body.adapter_id = adapter.value;
    else delete body.adapter_scale;
    submit.disabled = true;
    try {
      const generation = await post("/v1/generations", body, { signal: ctx.signal });
      announce(`Generation queued: ${generation.num_images} image${generation.num_images === 1 ? "" : "s"}`);
      const card = generationCard(ctx, generation, { onImage: () => announce("Image ready") });
      results.querySelector("#no-results")?.remove();
      results.prepend(card);
      pollGeneration(ctx, generation.id, (g) => card.update(g)).catch((error) => {
        if (error.name !== "AbortError") box.error(error);
      });
    } catch (error) {
      box.error(error);
    } finally {
      submit.disabled = false;
    }
  });
  main.append(form, h("section", { "aria-labelledby": "results-title" }, h("h2", { id: "results-title" }, "Results"), results));

  // The tenant's recent generations, under the new ones.
  const recent = await listAll("/v1/generations", { limit: 6, maxPages: 1, signal: ctx.signal });
  if (!recent.length) {
    results.append(h("p", { class: "hint", id: "no-results" }, "Nothing generated yet."));
    return;
  }
  for (const generation of recent) {
    const card = generationCard(ctx, generation);
    results.append(card);
    if (generation.status === "queued" || generation.status === "running") {
      pollGeneration(ctx, generation.id, (g) => card.update(g), 2000).catch(() => {});
    }
  }
}
