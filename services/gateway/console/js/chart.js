// Small inline SVG charts, drawn here (no chart library): a line (the training loss) and stacked bars (usage per
// day or per tenant). Each chart has a text title and description; the pages also show the numbers as a table.

import { h } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 220;
const PAD = { left: 56, right: 12, top: 12, bottom: 34 };

// Series colors with at least 3:1 contrast against white (WCAG non-text contrast), told apart by the legend too.
export const SERIES_COLORS = ["#1849a9", "#b5470b", "#2e7d32", "#7b1fa2", "#00695c", "#ad1457"];

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

function tickLabel(value) {
  if (value === 0) return "0";
  if (Math.abs(value) >= 1000) return value.toLocaleString(undefined, { maximumFractionDigits: 0 });
  if (Math.abs(value) >= 1) return value.toLocaleString(undefined, { maximumFractionDigits: 2 });
  return value.toPrecision(2);
}

function frame(title, description) {
  const titleId = `chart-title-${Math.random().toString(36).slice(2)}`;
  const descId = `${titleId}-desc`;
  return h(
    "svg:svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      class: "chart",
      role: "img",
      "aria-labelledby": `${titleId} ${descId}`,
      preserveAspectRatio: "xMidYMid meet",
    },
    h("svg:title", { id: titleId }, title),
    h("svg:desc", { id: descId }, description),
  );
}

function yAxis(svg, maxValue, label) {
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  for (let i = 0; i <= 4; i += 1) {
    const value = (maxValue * i) / 4;
    const y = PAD.top + plotHeight - (plotHeight * i) / 4;
    svg.append(h("svg:line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y, y2: y, class: "grid" }));
    svg.append(h("svg:text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, tickLabel(value)));
  }
  svg.append(
    h("svg:text", { x: 12, y: PAD.top + plotHeight / 2, class: "axis-label", transform: `rotate(-90 12 ${PAD.top + plotHeight / 2})`, "text-anchor": "middle" }, label),
  );
}

/** A line chart of points [{x, y}] (x ascending). */
export function lineChart(points, { title, xLabel, yLabel }) {
  const usable = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
  const description = usable.length
    ? `${usable.length} points; last: ${xLabel} ${usable[usable.length - 1].x}, ${yLabel} ${tickLabel(usable[usable.length - 1].y)}`
    : "no points yet";
  const svg = frame(title, description);
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const maxY = niceMax(Math.max(0, ...usable.map((p) => p.y)));
  const minX = usable.length ? usable[0].x : 0;
  const maxX = usable.length ? Math.max(minX + 1, usable[usable.length - 1].x) : 1;
  yAxis(svg, maxY, yLabel);
  const xAt = (x) => PAD.left + ((x - minX) / (maxX - minX)) * plotWidth;
  const yAt = (y) => PAD.top + plotHeight - (y / maxY) * plotHeight;
  svg.append(h("svg:text", { x: PAD.left, y: HEIGHT - 8, class: "tick" }, String(minX)));
  svg.append(h("svg:text", { x: WIDTH - PAD.right, y: HEIGHT - 8, class: "tick", "text-anchor": "end" }, String(maxX)));
  svg.append(h("svg:text", { x: PAD.left + plotWidth / 2, y: HEIGHT - 8, class: "axis-label", "text-anchor": "middle" }, xLabel));
  if (usable.length) {
    const path = usable.map((p, i) => `${i ? "L" : "M"}${xAt(p.x).toFixed(1)},${yAt(p.y).toFixed(1)}`).join(" ");
    svg.append(h("svg:path", { d: path, class: "line", stroke: SERIES_COLORS[0] }));
    for (const p of usable) {
      svg.append(h("svg:circle", { cx: xAt(p.x).toFixed(1), cy: yAt(p.y).toFixed(1), r: 3, fill: SERIES_COLORS[0] }));
    }
  }
  return svg;
}

/**
 * Stacked bars: one bar per category (a day, a tenant), one segment per series (a kind of job).
 * `values[category][series]` are numbers; missing ones count as 0.
 */
export function stackedBars(categories, series, values, { title, yLabel, labelEvery = 1 }) {
  const totals = categories.map((c) => series.reduce((sum, s) => sum + (values[c]?.[s] || 0), 0));
  const grand = totals.reduce((a, b) => a + b, 0);
  const svg = frame(title, `${categories.length} bars, total ${tickLabel(grand)} ${yLabel}`);
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const maxY = niceMax(Math.max(0, ...totals));
  yAxis(svg, maxY, yLabel);
  const slot = plotWidth / Math.max(1, categories.length);
  const barWidth = Math.max(2, slot * 0.7);
  categories.forEach((category, index) => {
    let base = PAD.top + plotHeight;
    series.forEach((name, seriesIndex) => {
      const value = values[category]?.[name] || 0;
      if (value <= 0) return;
      const height = (value / maxY) * plotHeight;
      base -= height;
      const rect = h("svg:rect", {
        x: (PAD.left + slot * index + (slot - barWidth) / 2).toFixed(1),
        y: base.toFixed(1),
        width: barWidth.toFixed(1),
        height: Math.max(0.5, height).toFixed(1),
        fill: SERIES_COLORS[seriesIndex % SERIES_COLORS.length],
      });
      rect.append(h("svg:title", {}, `${category} ${name}: ${tickLabel(value)}`));
      svg.append(rect);
    });
    if (index % labelEvery === 0) {
      svg.append(
        h("svg:text", { x: (PAD.left + slot * index + slot / 2).toFixed(1), y: HEIGHT - 18, class: "tick", "text-anchor": "middle" }, category),
      );
    }
  });
  return svg;
}

/** The legend of a chart's series. */
export function legend(series) {
  return h(
    "ul",
    { class: "legend" },
    series.map((name, index) =>
      h("li", {}, h("span", { class: `swatch swatch-${index % SERIES_COLORS.length}`, "aria-hidden": "true" }), name),
    ),
  );
}
