// Two small SVG charts, drawn from numbers only (no text from a model ever reaches them):
// turnChart: one stacked bar per turn (cached | prefilled | generated tokens); sparkline: a line over recent readings.

const NS = "http://www.w3.org/2000/svg";
export const KINDS = ["cached", "prefilled", "generated"];

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

export function niceMax(value) {
  if (value <= 10) return 10;
  const step = 10 ** Math.floor(Math.log10(value));
  return Math.ceil(value / step) * step;
}

/**
 * A stacked bar chart of turns: `turns` are /v1/sessions/{id}/turns items (turn, cached_tokens, prefilled_tokens,
 * generated_tokens, ttft_s). Each bar segment carries data-turn / data-kind / data-value for tests and tools.
 */
export function turnChart(turns) {
  const width = 300, height = 150, left = 34, bottom = 20, top = 8;
  const shown = turns.slice(-12); // the latest turns; the table lists them all
  const totals = shown.map((t) => t.cached_tokens + t.prefilled_tokens + t.generated_tokens);
  const max = niceMax(Math.max(1, ...totals));
  const plotH = height - bottom - top;
  const slot = (width - left) / Math.max(shown.length, 1);
  const barW = Math.min(28, slot * 0.6);
  const label = shown.length
    ? `Tokens per turn: ${shown.map((t) => `turn ${t.turn}: ${t.cached_tokens} cached, ${t.prefilled_tokens} `
      + `prefilled, ${t.generated_tokens} generated`).join("; ")}`
    : "No turns yet";
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, class: "chart" });
  root.append(svg("title", {}, label));
  for (const frac of [0, 0.5, 1]) {
    const y = top + plotH * (1 - frac);
    root.append(svg("line", { x1: left, x2: width, y1: y, y2: y, class: "grid" }));
    root.append(svg("text", { x: left - 4, y: y + 3, class: "axis", "text-anchor": "end" }, fmt(max * frac)));
  }
  shown.forEach((t, i) => {
    const x = left + slot * i + (slot - barW) / 2;
    let y = top + plotH;
    for (const kind of KINDS) {
      const value = t[`${kind}_tokens`];
      const h = (value / max) * plotH;
      y -= h;
      root.append(svg("rect", { x, y, width: barW, height: Math.max(h, 0), class: `bar ${kind}`,
                                "data-turn": t.turn, "data-kind": kind, "data-value": value }));
    }
    root.append(svg("text", { x: x + barW / 2, y: height - 6, class: "axis", "text-anchor": "middle" }, `${t.turn}`));
  });
  if (!shown.length) {
    root.append(svg("text", { x: (width + left) / 2, y: height / 2, class: "axis", "text-anchor": "middle" },
                    "no turns yet"));
  }
  return root;
}

/** A filled line of `values` (oldest first), from 0 to `niceMax` of them (the caller prints the scale); `label`
 * names it for screen readers. */
export function sparkline(values, label) {
  const width = 600, height = 80;
  const max = niceMax(Math.max(1, ...values));
  const n = Math.max(values.length - 1, 1);
  const pts = values.map((v, i) => [(i / n) * width, height - 4 - (v / max) * (height - 8)]);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, class: "chart",
                            preserveAspectRatio: "none" });
  root.append(svg("title", {}, label));
  if (pts.length > 1) {
    const line = pts.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    root.append(svg("path", { d: `${line} L${width},${height} L0,${height} Z`, class: "spark-fill" }));
    root.append(svg("path", { d: line, class: "spark-line" }));
  }
  return root;
}

export function fmt(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(0)}k`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return Number.isInteger(n) ? `${n}` : n.toFixed(1);
}
