// Usage: the tenant's finished jobs per day (GET /v1/usage), as a stacked bar chart per kind of job and a table.

import { get, query } from "../api.js";
import { legend, stackedBars } from "../chart.js";
import { dayRange, field, formatNumber, h, humanize, notice, replace, table } from "../dom.js";

export const METRICS = {
  worker_seconds: "worker seconds",
  jobs: "jobs",
  images: "images",
  steps: "steps",
};
const KINDS = ["training", "generation", "evaluation"];

/** Every day from start to end (YYYY-MM-DD, UTC). */
export function daysBetween(start, end) {
  const days = [];
  for (let t = Date.parse(`${start}T00:00:00Z`); t <= Date.parse(`${end}T00:00:00Z`) && days.length < 400; t += 86_400_000) {
    days.push(new Date(t).toISOString().slice(0, 10));
  }
  return days;
}

export function rangeForm(onChange, { days = 30 } = {}) {
  const [first, last] = dayRange(days);
  const start = h("input", { type: "date", value: first, required: true });
  const end = h("input", { type: "date", value: last, required: true });
  const form = h(
    "form",
    { class: "inline-form", "aria-label": "Date range" },
    field("From (UTC day)", start),
    field("To", end),
    h("button", { type: "submit", class: "secondary" }, "Show"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    onChange(start.value, end.value);
  });
  return { form, start, end };
}

export async function page(main, ctx) {
  main.append(h("h1", {}, "Usage"));
  const box = notice();
  const metric = h("select", {}, Object.entries(METRICS).map(([value, label]) => h("option", { value }, humanize(label))));
  const holder = h("div", {});
  let report = null;
  const draw = () => {
    if (!report) return;
    const days = daysBetween(report.start, report.end);
    const values = {};
    for (const entry of report.data) {
      values[entry.period] = values[entry.period] || {};
      values[entry.period][entry.kind] = (values[entry.period][entry.kind] || 0) + entry[metric.value];
    }
    const label = METRICS[metric.value];
    replace(
      holder,
      h("div", { class: "chart-holder" }, stackedBars(days, KINDS, values, { title: `${humanize(label)} per day`, yLabel: label, labelEvery: Math.ceil(days.length / 8) })),
      legend(KINDS),
      report.data.length
        ? table(
            `Usage per day and kind, ${report.start} to ${report.end}`,
            ["Day", "Kind", "Jobs", "Worker seconds", "Images", "Steps"],
            report.data.map((e) =>
              h("tr", {}, h("td", {}, e.period), h("td", {}, e.kind), h("td", {}, formatNumber(e.jobs)), h("td", {}, formatNumber(e.worker_seconds, 1)), h("td", {}, formatNumber(e.images)), h("td", {}, formatNumber(e.steps))),
            ),
          )
        : h("p", {}, "No finished jobs in this range."),
    );
  };
  const load = async (start, end) => {
    box.clear();
    try {
      report = await get(`/v1/usage${query({ start, end, granularity: "day" })}`, { signal: ctx.signal });
      draw();
    } catch (error) {
      box.error(error);
    }
  };
  const range = rangeForm(load);
  metric.addEventListener("change", draw);
  range.form.insertBefore(field("Measure", metric), range.form.lastChild);
  main.append(h("section", { class: "card", "aria-labelledby": "usage-chart" }, h("h2", { id: "usage-chart" }, "Per day"), range.form, box, holder));
  await load(range.start.value, range.end.value);
}
