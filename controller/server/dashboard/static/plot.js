// Scalars as line plots: inline SVG, one plot per title, one line per series.

import { h, s } from "./dom.js";

const W = 560, H = 240;
const M = { left: 56, right: 16, top: 12, bottom: 32 };
const COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#0a7d8c", "#bc4c00", "#57606a"];

/** Group scalars [{title, series, iteration, value}] into {title: {series: [[x, y]...]}}. */
export function groupScalars(scalars) {
  const plots = new Map();
  for (const sc of scalars) {
    if (!plots.has(sc.title)) plots.set(sc.title, new Map());
    const series = plots.get(sc.title);
    if (!series.has(sc.series)) series.set(sc.series, []);
    series.get(sc.series).push([sc.iteration, typeof sc.value === "number" ? sc.value : Number(sc.value)]);
  }
  for (const series of plots.values()) for (const pts of series.values()) pts.sort((a, b) => a[0] - b[0]);
  return plots;
}

/** Round tick values covering [lo, hi]. */
function ticks(lo, hi, count = 5) {
  if (lo === hi) return [lo];
  const step0 = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= step0) || step0;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** A reported value, short: 4 significant digits (NaN and ±inf as they are). */
function fmtValue(v) {
  return isFinite(v) ? String(Number(v.toPrecision(4))) : String(v);
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

/**
 * An SVG line plot of `series` (Map name → [[x, y]]). Non-finite values (NaN, ±inf: a
 * diverging loss) break the line and are counted in the legend. Hovering shows the
 * values at the nearest iteration.
 */
export function linePlot(title, series) {
  const finite = [];
  for (const pts of series.values()) for (const [x, y] of pts) if (isFinite(y)) finite.push([x, y]);
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of finite) {
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  if (!finite.length) { x0 = 0; x1 = 1; y0 = 0; y1 = 1; }
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const px = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
  const py = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);

  const svg = s("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${title}: ${[...series.keys()].join(", ")}` });
  const grid = s("g", { class: "grid" });
  for (const t of ticks(y0, y1)) {
    grid.append(s("line", { x1: M.left, x2: W - M.right, y1: py(t), y2: py(t) }),
      s("text", { x: M.left - 6, y: py(t) + 4, class: "tick y", text: fmtTick(t) }));
  }
  for (const t of ticks(x0, x1)) {
    grid.append(s("text", { x: px(t), y: H - M.bottom + 16, class: "tick x", text: fmtTick(t) }));
  }
  grid.append(s("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }),
    s("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }));
  svg.append(grid);

  const legend = h("ul", { class: "plot-legend" });
  [...series.entries()].forEach(([name, pts], i) => {
    const color = COLORS[i % COLORS.length];
    let d = "";
    let pen = false;
    let bad = 0;
    for (const [x, y] of pts) {
      if (!isFinite(y)) { pen = false; bad++; continue; }
      d += `${pen ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`;
      pen = true;
    }
    svg.append(s("path", { class: "line", d, stroke: color }));
    if (pts.length === 1 && isFinite(pts[0][1])) {
      svg.append(s("circle", { cx: px(pts[0][0]), cy: py(pts[0][1]), r: 3, fill: color }));
    }
    const last = pts[pts.length - 1];
    legend.append(h("li", {}, h("span", { class: "swatch-line", "aria-hidden": "true", dataset: { color } }),
      `${name}: ${last ? fmtValue(last[1]) : "–"} at ${last ? last[0] : "–"} (${pts.length} points${bad ? `, ${bad} not finite` : ""})`));
  });
  for (const sw of legend.querySelectorAll(".swatch-line")) sw.style.background = sw.dataset.color;

  // Hover readout: a vertical line at the nearest iteration and the values there.
  const cursor = s("line", { class: "cursor", y1: M.top, y2: H - M.bottom, visibility: "hidden" });
  const readout = h("div", { class: "plot-readout", "aria-live": "off" });
  svg.append(cursor);
  svg.addEventListener("pointermove", (e) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + ((e.clientX - box.left) * (W / box.width) - M.left) / (W - M.left - M.right) * (x1 - x0);
    const values = [];
    let at = null;
    for (const [name, pts] of series) {
      const p = nearest(pts, x);
      if (p) { values.push(`${name} ${fmtValue(p[1])}`); at = at ?? p[0]; }
    }
    if (at === null) return;
    cursor.setAttribute("x1", px(at)); cursor.setAttribute("x2", px(at));
    cursor.setAttribute("visibility", "visible");
    readout.textContent = `iteration ${at}: ${values.join(" · ")}`;
  });
  svg.addEventListener("pointerleave", () => { cursor.setAttribute("visibility", "hidden"); readout.textContent = ""; });

  return h("figure", { class: "plot-figure", dataset: { title } },
    h("figcaption", { text: title }), svg, readout, legend);
}

/** The point of sorted `pts` whose x is nearest to `x` (binary search). */
function nearest(pts, x) {
  if (!pts.length) return null;
  let lo = 0, hi = pts.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (pts[mid][0] < x) lo = mid + 1; else hi = mid;
  }
  if (lo > 0 && Math.abs(pts[lo - 1][0] - x) <= Math.abs(pts[lo][0] - x)) lo--;
  return pts[lo];
}
