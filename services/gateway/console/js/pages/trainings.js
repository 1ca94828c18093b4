// Train: drop photos, pick a preset or set parameters, start a fine-tune; follow it live (phase, step, loss curve,
// ETA) over the training's event stream; cancel it.

import { ApiError, capabilities, followEvents, get, listAll, post, request } from "../api.js";
import { lineChart } from "../chart.js";
import {
  actionButton,
  announce,
  badge,
  confirmAction,
  field,
  formatDate,
  formatNumber,
  formatSeconds,
  h,
  notice,
  replace,
  table,
} from "../dom.js";

// Presets scale the server's own defaults (GET /v1/capabilities: training.defaults), so nothing here assumes a
// base model: quick is a quarter of the default steps, quality twice them at the learning rate the DiffuseKronA
// paper's ablation found best (6e-4). Standard sends nothing: the server's defaults.
export const PRESETS = {
  quick: { label: "Quick", describe: "¼ of the default steps: a first look", steps: (d) => Math.max(1, Math.round(d / 4)) },
  standard: { label: "Standard", describe: "the server's defaults", steps: null },
  quality: { label: "Quality", describe: "2× the default steps, learning rate 6e-4", steps: (d) => d * 2, learning_rate: 6e-4 },
};

// The advanced fields shown as inputs; every other parameter goes in the JSON box.
const ADVANCED = [
  { name: "steps", label: "Steps", type: "int" },
  { name: "learning_rate", label: "Learning rate", type: "float" },
  { name: "a1", label: "a1 (A is a1 × a2)", type: "int" },
  { name: "a2", label: "a2", type: "int" },
  { name: "resolution", label: "Resolution (px)", type: "int" },
  { name: "gradient_accumulation", label: "Gradient accumulation", type: "int" },
  { name: "seed", label: "Seed", type: "int" },
];

// `canceling`: a running job whose cancel was asked for, until its worker stops it.
const ACTIVE = new Set(["queued", "running", "canceling"]);

export async function list(main, ctx) {
  main.append(h("h1", {}, "Train an adapter"));
  const caps = await capabilities();
  main.append(trainingForm(ctx, caps));
  const recent = h("section", { "aria-labelledby": "recent-trainings" }, h("h2", { id: "recent-trainings" }, "Recent trainings"));
  main.append(recent);
  const box = notice();
  recent.append(box);
  const holder = h("div", {}, h("p", {}, "Loading…"));
  recent.append(holder);
  const refresh = async () => {
    try {
      const rows = await listAll("/v1/trainings", { limit: 20, maxPages: 1, signal: ctx.signal });
      replace(holder, trainingsTable(rows));
      box.clear();
    } catch (error) {
      box.error(error);
    }
  };
  await refresh();
  ctx.every(refresh, 5000);
}

function trainingsTable(rows) {
  if (!rows.length) return h("p", {}, "No trainings yet.");
  return table(
    "Trainings, newest first",
    ["Name", "Status", "Progress", "Adapter", "Created"],
    rows.map((t) =>
      h(
        "tr",
        {},
        h("td", {}, h("a", { href: `#/trainings/${t.id}` }, t.name || t.id)),
        h("td", {}, badge(t.status)),
        h("td", {}, `${t.progress.step} / ${t.progress.total_steps || "?"}`),
        h("td", {}, t.adapter_id ? h("a", { href: `#/adapters/${t.adapter_id}` }, t.adapter_id) : "—"),
        h("td", {}, formatDate(t.created_at)),
      ),
    ),
  );
}

function trainingForm(ctx, caps) {
  const defaults = caps?.training?.defaults || {};
  const images = caps?.training?.images;
  const files = [];
  const box = notice();

  // Photos: a drop zone around an ordinary file input (the keyboard's way in).
  const input = h("input", { type: "file", id: "photos", multiple: true, accept: images?.formats?.join(",") || "image/png,image/jpeg,image/webp" });
  const thumbs = h("ul", { class: "thumbs", "aria-label": "Chosen photos" });
  const count = h("p", { class: "hint", id: "photo-count", "aria-live": "polite" }, "No photos chosen.");
  const addFiles = (chosen) => {
    for (const file of chosen) {
      if (!file.type.startsWith("image/")) {
        box.show(`${file.name} is not an image (${file.type || "unknown type"}).`);
        continue;
      }
      files.push(file);
    }
    renderThumbs();
  };
  const renderThumbs = () => {
    replace(
      thumbs,
      files.map((file, index) => {
        const url = ctx.objectUrl(file);
        return h(
          "li",
          {},
          h("img", { src: url, alt: file.name, width: 96, height: 96 }),
          h("button", {
            type: "button",
            class: "secondary small",
            "aria-label": `Remove ${file.name}`,
            onclick: () => {
              files.splice(index, 1);
              renderThumbs();
            },
          }, "Remove"),
        );
      }),
    );
    const limits = images ? ` (${images.min_images}–${images.max_images} needed)` : "";
    count.textContent = files.length ? `${files.length} photo${files.length === 1 ? "" : "s"} chosen${limits}.` : `No photos chosen${limits}.`;
  };
  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = "";
  });
  const zone = h(
    "div",
    { class: "dropzone", id: "dropzone" },
    h("label", { for: "photos" }, "Photos of the subject"),
    h("p", { class: "hint" }, `Drop ${images ? `${images.min_images}–${images.max_images} ` : ""}photos here, or choose them:`),
    input,
    images ? h("p", { class: "hint" }, `PNG, JPEG or WebP; up to ${formatNumber(images.max_bytes / 1048576)} MiB each.`) : null,
  );
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addFiles([...(event.dataTransfer?.files || [])]);
  });

  const prompt = h("input", { type: "text", id: "instance-prompt", required: true, maxlength: 1000, placeholder: "a photo of sks dog" });
  const name = h("input", { type: "text", id: "training-name", maxlength: 200 });
  const webhook = h("input", { type: "url", id: "webhook-url", maxlength: 2000, placeholder: "https://…" });

  // Presets and advanced parameters.
  const inputs = {};
  const advancedFields = ADVANCED.map((spec) => {
    const control = h("input", {
      type: "number",
      id: `param-${spec.name}`,
      step: spec.type === "float" ? "any" : "1",
      inputmode: spec.type === "float" ? "decimal" : "numeric",
      placeholder: defaults[spec.name] !== undefined ? String(defaults[spec.name]) : "server default",
    });
    inputs[spec.name] = control;
    const hint = defaults[spec.name] !== undefined ? `empty: ${defaults[spec.name]}` : "empty: the server's default";
    return field(spec.label, control, hint);
  });
  const extra = h("textarea", { id: "param-json", rows: 3, placeholder: '{"prior_preservation": true, "class_prompt": "a photo of a dog"}' });
  const allowed = caps?.training?.params ? `Any of: ${caps.training.params.join(", ")}.` : null;
  const presetName = `preset-${Math.random().toString(36).slice(2)}`;
  const applyPreset = (key) => {
    const preset = PRESETS[key];
    const baseSteps = Number(defaults.steps);
    inputs.steps.value = preset.steps && Number.isFinite(baseSteps) ? String(preset.steps(baseSteps)) : "";
    inputs.learning_rate.value = preset.learning_rate ? String(preset.learning_rate) : "";
  };
  const presets = h(
    "fieldset",
    { class: "presets" },
    h("legend", {}, "Preset"),
    Object.entries(PRESETS).map(([key, preset]) => {
      const id = `preset-${key}`;
      return h(
        "div",
        { class: "radio" },
        h("input", { type: "radio", name: presetName, id, value: key, checked: key === "standard", onchange: () => applyPreset(key) }),
        h("label", { for: id }, h("strong", {}, preset.label), ` — ${preset.describe}`),
      );
    }),
  );

  const submit = h("button", { type: "submit" }, "Start training");
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-training", novalidate: true },
    h("h2", { id: "new-training" }, "New training"),
    zone,
    count,
    thumbs,
    field("Instance prompt", prompt, "the rare token and the class, e.g. “a photo of sks dog”"),
    h("div", { class: "grid-2" }, field("Name (optional)", name), field("Webhook URL (optional)", webhook)),
    presets,
    h(
      "details",
      { class: "advanced" },
      h("summary", {}, "Advanced parameters"),
      h("div", { class: "grid-3" }, advancedFields),
      field("More parameters (JSON object, merged last)", extra, allowed),
    ),
    box,
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    box.clear();
    let params;
    try {
      params = collectParams(inputs, extra.value);
    } catch (error) {
      box.show(error.message);
      return;
    }
    const body = new FormData();
    for (const file of files) body.append("images", file, file.name);
    body.append("instance_prompt", prompt.value);
    if (Object.keys(params).length) body.append("params", JSON.stringify(params));
    if (name.value.trim()) body.append("name", name.value.trim());
    if (webhook.value.trim()) body.append("webhook_url", webhook.value.trim());
    submit.disabled = true;
    try {
      const training = await request("/v1/trainings", { method: "POST", form: body, signal: ctx.signal });
      announce(`Training ${training.id} queued`);
      ctx.navigate(`#/trainings/${training.id}`);
    } catch (error) {
      box.error(error);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

function collectParams(inputs, extraText) {
  const params = {};
  for (const spec of ADVANCED) {
    const text = inputs[spec.name].value.trim();
    if (text === "") continue;
    const value = Number(text);
    if (!Number.isFinite(value) || (spec.type === "int" && !Number.isInteger(value))) {
      throw new Error(`${spec.label} must be ${spec.type === "int" ? "a whole number" : "a number"}.`);
    }
    params[spec.name] = value;
  }
  if (extraText.trim()) {
    let extra;
    try {
      extra = JSON.parse(extraText);
    } catch (error) {
      throw new Error(`More parameters is not JSON: ${error.message}`);
    }
    if (extra === null || typeof extra !== "object" || Array.isArray(extra)) throw new Error("More parameters must be a JSON object.");
    Object.assign(params, extra);
  }
  return params;
}

// One training, followed live -------------------------------------------------------------------------------

export async function detail(main, ctx, { id }) {
  const box = notice();
  const title = h("h1", {}, "Training");
  main.append(title, box);
  let training = await get(`/v1/trainings/${encodeURIComponent(id)}`, { signal: ctx.signal });
  const losses = new Map(); // step -> loss, as the events bring them
  const timeline = [];
  const summary = h("dl", { class: "facts" });
  const bar = h("progress", { id: "training-progress", max: 1, value: 0, "aria-labelledby": "progress-label" });
  const progressLabel = h("p", { id: "progress-label", class: "progress-label", "aria-live": "polite" });
  const chartHolder = h("div", { class: "chart-holder" });
  const timelineList = h("ol", { class: "timeline", id: "training-timeline", "aria-label": "What happened" });
  const actions = h("div", { class: "actions" });
  const errorBox = h("div", {});
  const paramsHolder = h("div", {});
  main.append(
    h("section", { class: "card", "aria-labelledby": "progress-title" },
      h("h2", { id: "progress-title" }, "Progress"),
      progressLabel,
      bar,
      summary,
      paramsHolder,
      errorBox,
      actions,
    ),
    h("section", { class: "card", "aria-labelledby": "loss-title" }, h("h2", { id: "loss-title" }, "Loss"), chartHolder),
    h("section", { class: "card", "aria-labelledby": "timeline-title" }, h("h2", { id: "timeline-title" }, "Timeline"), timelineList),
  );

  const cancel = actionButton("Cancel training", async () => {
    if (!(await confirmAction("Stop this training? A running one stops at its next step; nothing is kept.", "Stop training"))) return;
    try {
      training = await post(`/v1/trainings/${training.id}/cancel`, undefined, { signal: ctx.signal });
      show(training);
      announce("Cancel requested");
    } catch (error) {
      box.error(error);
    }
  }, { class: "danger", id: "cancel-training" });

  let lastPhase = null;
  const show = (t) => {
    training = t;
    title.textContent = `Training ${t.name || t.id}`;
    const p = t.progress;
    if (p.loss !== null && p.loss !== undefined && p.step > 0) losses.set(p.step, p.loss);
    const phase = t.status === "running" ? p.phase || "running" : t.status;
    const stepText = `step ${p.step} of ${p.total_steps || "?"}`;
    if (phase !== lastPhase || (timeline.length && timeline[timeline.length - 1].step !== p.step && phase === "training")) {
      timeline.push({ at: new Date(), phase, step: p.step });
      const what = String(phase).replace(/_/g, " ");
      timelineList.append(h("li", {}, `${new Date().toLocaleTimeString()} — ${what}${phase === "training" ? ` (${stepText})` : ""}`));
      lastPhase = phase;
    }
    bar.max = Math.max(1, p.total_steps || 1);
    bar.value = Math.min(p.step, bar.max);
    bar.dataset.status = t.status;
    progressLabel.textContent =
      t.status === "queued"
        ? `Queued${t.queue_position ? `, position ${t.queue_position}` : ""}`
        : t.status === "running"
          ? `${humanPhase(phase)}: ${stepText}${p.eta_seconds !== null && p.eta_seconds !== undefined ? `, about ${formatSeconds(p.eta_seconds)} left` : ""}`
          : `${humanPhase(t.status)}: ${stepText}`;
    replace(
      summary,
      fact("Status", badge(t.status), "training-status"),
      fact("Phase", String(phase).replace(/_/g, " "), "training-phase"),
      fact("Step", `${p.step} / ${p.total_steps || "?"}`, "training-step"),
      fact("Loss", p.loss === null || p.loss === undefined ? "—" : formatNumber(p.loss, 4)),
      fact("ETA", t.status === "running" ? formatSeconds(p.eta_seconds) : "—"),
      fact("Photos", String(t.num_images)),
      fact("Instance prompt", t.instance_prompt),
      fact("Created", formatDate(t.created_at)),
      fact("Finished", formatDate(t.finished_at)),
    );
    if (!paramsHolder.firstChild) replace(paramsHolder, paramsView(t.params));
    replace(errorBox, t.error ? h("div", { class: "notice error", role: "alert" }, h("p", {}, `${t.error.message} (${t.error.code})`)) : null);
    const points = [...losses.entries()].sort((a, b) => a[0] - b[0]).map(([x, y]) => ({ x, y }));
    replace(chartHolder, lineChart(points, { title: "Training loss by step", xLabel: "step", yLabel: "loss" }));
    replace(
      actions,
      ACTIVE.has(t.status) ? cancel : null,
      t.adapter_id
        ? h("a", { class: "button-like", href: `#/adapters/${t.adapter_id}`, id: "open-adapter" }, "Open the adapter")
        : null,
      t.adapter_id ? h("a", { class: "button-like secondary", href: `#/generate?adapter=${t.adapter_id}` }, "Generate with it") : null,
    );
  };
  show(training);
  if (!ACTIVE.has(training.status)) return;
  follow(ctx, training.id, show, box).then((ended) => {
    if (ended) announce(`Training ${ended.status}`);
  });
}

function paramsView(params) {
  const entries = Object.entries(params || {}).filter(([, value]) => value !== null);
  if (!entries.length) return null;
  return h(
    "details",
    {},
    h("summary", {}, "Parameters"),
    h(
      "dl",
      { class: "limits" },
      entries.map(([name, value]) => h("div", {}, h("dt", {}, name), h("dd", {}, typeof value === "object" ? JSON.stringify(value) : String(value)))),
    ),
  );
}

function humanPhase(phase) {
  return String(phase).replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
}

function fact(label, value, id = null) {
  return h("div", { class: "fact" }, h("dt", {}, label), h("dd", { id }, value));
}

/**
 * Follow the training's event stream until it ends; reconnect when the stream drops, poll when the server has no
 * stream slot free (429). Resolves with the ended Training (or null when the page was left).
 */
async function follow(ctx, id, show, box) {
  let ended = null;
  let failures = 0;
  while (!ended && !ctx.signal.aborted) {
    try {
      await followEvents(`/v1/trainings/${id}/events`, {
        signal: ctx.signal,
        onEvent(name, data) {
          if (name === "error") {
            box.show(data?.error?.message || "the progress stream ended with an error");
            ended = ended || { status: "unknown" };
            return;
          }
          if (data && data.id) {
            show(data);
            if (name === "done" || !ACTIVE.has(data.status)) ended = data;
          }
        },
      });
      failures = 0;
    } catch (error) {
      if (error.name === "AbortError") return null;
      failures += 1;
      if (error instanceof ApiError && error.status === 429) {
        // No stream slot: poll instead.
        try {
          const t = await get(`/v1/trainings/${id}`, { signal: ctx.signal });
          show(t);
          if (!ACTIVE.has(t.status)) ended = t;
        } catch (pollError) {
          if (pollError.name === "AbortError") return null;
          box.error(pollError);
        }
      } else if (error instanceof ApiError && error.status && error.status !== 503) {
        box.error(error);
        return null;
      } else if (failures > 3) {
        box.error(error);
      }
    }
    if (!ended) {
      try {
        await ctx.sleep(Math.min(5000, 500 * 2 ** Math.min(failures, 4)));
      } catch {
        return null;
      }
    }
  }
  return ended;
}
