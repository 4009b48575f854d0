// The pipeline DAG: a layered left-to-right layout and its SVG drawing.
//
// layout() is O(V + E) per pass (a few barycenter passes to reduce crossings) and runs
// only when the graph's structure changes. DagView draws every node and edge once, then
// update() touches just the nodes whose state changed, so a 1 s poll of a 200-step
// pipeline costs a few attribute writes, not a redraw.

import { fmtDuration, s } from "./dom.js";

export const NODE_W = 176;
export const NODE_H = 46;
const GAP_X = 64;
const GAP_Y = 14;
/** Height of the slot an edge that skips a layer takes in that layer. */
const LANE_H = 8;
/** The edge ends this far before the child (the arrow head fills it). */
const ARROW_GAP = 6;
const PAD = 16;
const ORDER_PASSES = 4;
const NAME_CHARS = 24;
/** "Fit" never shrinks below this (smaller text is unreadable): the box scrolls instead. */
const MIN_FIT_SCALE = 0.55;

/**
 * Place the nodes in layers: a node's layer is one more than its deepest parent's.
 * `nodes` is [{name, parents: [names]}] in definition order. Returns
 * {pos: Map(name → {x, y, layer}), width, height, edges: [[parent, child]],
 *  lanes: Map("parent\0child" → [{x, y}])}.
 *
 * An edge that skips layers gets a lane (a slot of LANE_H) in every layer it crosses,
 * ordered with the nodes, so it is drawn through that free slot and never behind a node.
 */
export function layout(nodes) {
  const names = new Set(nodes.map((n) => n.name));
  const children = new Map(nodes.map((n) => [n.name, []]));
  const parents = new Map();
  const indegree = new Map();
  const edges = [];
  for (const n of nodes) {
    const ps = (n.parents || []).filter((p) => names.has(p) && p !== n.name);
    parents.set(n.name, ps);
    indegree.set(n.name, ps.length);
    for (const p of ps) {
      children.get(p).push(n.name);
      edges.push([p, n.name]);
    }
  }
  // Kahn's topological order; a cycle (never valid) lands after everything else.
  const layer = new Map();
  const queue = nodes.filter((n) => indegree.get(n.name) === 0).map((n) => n.name);
  for (let i = 0; i < queue.length; i++) {
    const name = queue[i];
    let depth = 0;
    for (const p of parents.get(name)) depth = Math.max(depth, (layer.get(p) ?? -1) + 1);
    layer.set(name, depth);
    for (const c of children.get(name)) {
      indegree.set(c, indegree.get(c) - 1);
      if (indegree.get(c) === 0) queue.push(c);
    }
  }
  let maxLayer = Math.max(-1, ...layer.values());
  for (const n of nodes) if (!layer.has(n.name)) layer.set(n.name, ++maxLayer);

  const layers = [];
  for (const n of nodes) {
    const l = layer.get(n.name);
    (layers[l] ||= []).push(n.name);
  }
  for (let l = 0; l < layers.length; l++) layers[l] ||= [];

  // Lanes: one placeholder per crossed layer, chained parent → lane → ... → child, so
  // the ordering passes place them like nodes. (Edges into an earlier layer, only
  // possible in a cycle, are drawn directly.)
  const laneNames = new Map(); // edge key → [lane names]
  const isLane = new Set();
  const ordParents = new Map([...parents].map(([name, ps]) => [name, [...ps]]));
  const ordChildren = new Map([...children].map(([name, cs]) => [name, [...cs]]));
  const replace = (list, old, by) => list.splice(list.indexOf(old), 1, by);
  edges.forEach(([p, c], k) => {
    const from = layer.get(p), to = layer.get(c);
    if (to - from < 2) return;
    const chain = [];
    for (let l = from + 1; l < to; l++) {
      const lane = `\u0000lane${k}:${l}`;
      chain.push(lane);
      isLane.add(lane);
      layers[l].push(lane);
    }
    laneNames.set(edgeKey(p, c), chain);
    replace(ordChildren.get(p), c, chain[0]);
    replace(ordParents.get(c), p, chain[chain.length - 1]);
    chain.forEach((lane, i) => {
      ordParents.set(lane, [i ? chain[i - 1] : p]);
      ordChildren.set(lane, [i < chain.length - 1 ? chain[i + 1] : c]);
    });
  });
  orderLayers(layers, ordParents, ordChildren);

  const slot = (name) => (isLane.has(name) ? LANE_H : NODE_H);
  const columnHeight = (names) => names.reduce((sum, name) => sum + slot(name), 0) + Math.max(0, names.length - 1) * GAP_Y;
  const tallest = Math.max(NODE_H, ...layers.map(columnHeight));
  const pos = new Map();
  const lanePos = new Map();
  layers.forEach((names, l) => {
    let y = PAD + (tallest - columnHeight(names)) / 2;
    const x = PAD + l * (NODE_W + GAP_X);
    for (const name of names) {
      if (isLane.has(name)) lanePos.set(name, { x, y: y + LANE_H / 2 });
      else pos.set(name, { x, y, layer: l });
      y += slot(name) + GAP_Y;
    }
  });
  const lanes = new Map();
  for (const [key, chain] of laneNames) lanes.set(key, chain.map((lane) => lanePos.get(lane)));
  return {
    pos,
    edges,
    lanes,
    width: PAD * 2 + layers.length * NODE_W + Math.max(0, layers.length - 1) * GAP_X,
    height: PAD * 2 + tallest,
  };
}

function edgeKey(from, to) {
  return `${from}\u0000${to}`;
}

/** Reorder each layer by the mean position of its neighbours (down, then up), in place. */
function orderLayers(layers, parents, children) {
  const rank = new Map();
  const center = (names) => names.forEach((name, i) => rank.set(name, i - (names.length - 1) / 2));
  layers.forEach(center);
  const sweep = (l, neighbours) => {
    const names = layers[l];
    const key = new Map();
    names.forEach((name, i) => {
      const ns = neighbours.get(name) || [];
      if (!ns.length) key.set(name, rank.get(name) + i * 1e-9);
      else {
        let sum = 0;
        for (const n of ns) sum += rank.get(n);
        key.set(name, sum / ns.length + i * 1e-9); // ties keep the current order
      }
    });
    names.sort((a, b) => key.get(a) - key.get(b));
    center(names);
  };
  for (let pass = 0; pass < ORDER_PASSES; pass++) {
    if (pass % 2 === 0) for (let l = 1; l < layers.length; l++) sweep(l, parents);
    else for (let l = layers.length - 2; l >= 0; l--) sweep(l, children);
  }
}

/** A curve between two points with horizontal ends; it stays between their x's (a gap). */
function curve(x1, y1, x2, y2) {
  const dx = (x2 - x1) / 2;
  return ` C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`;
}

/**
 * The edge's SVG path: from the parent's right side to the child's left side, through
 * its lanes (a straight run across each crossed layer, curves only in the gaps).
 */
export function edgePath(from, to, lanes = []) {
  let x = from.x + NODE_W, y = from.y + NODE_H / 2;
  let d = `M${x},${y}`;
  for (const lane of lanes) {
    d += curve(x, y, lane.x, lane.y) + ` L${lane.x + NODE_W},${lane.y}`;
    x = lane.x + NODE_W;
    y = lane.y;
  }
  const x2 = to.x - ARROW_GAP, y2 = to.y + NODE_H / 2;
  if (x2 > x) return d + curve(x, y, x2, y2);
  // a back edge (only in a cycle): a plain curve
  const dx = 24;
  return d + ` C${x + dx},${y} ${x2 - dx},${y2} ${x2},${y2}`;
}

function shortName(name) {
  return name.length > NAME_CHARS ? name.slice(0, NAME_CHARS - 1) + "…" : name;
}

/** Seconds a step ran (so far, while it runs); null before it started. */
export function nodeDuration(node, now) {
  if (node.started === null || node.started === undefined) return null;
  const end = node.ended ?? (node.status === "running" ? now : null);
  return end === null || end === undefined ? null : end - node.started;
}

/** The second line of a node: its status and, once started, how long it ran. */
export function nodeSubtitle(node, now) {
  const status = node.status || "pending";
  const seconds = nodeDuration(node, now);
  return seconds === null ? status : `${status} · ${fmtDuration(seconds)}`;
}

/**
 * The SVG drawing of a DAG. Callbacks: onHover(name | null), onSelect(name).
 * Nodes are <g class="node st-STATUS" data-step data-status>, focusable, and say their
 * status in text (colour only repeats it).
 */
export class DagView {
  constructor(container, { onHover, onSelect }) {
    this.container = container;
    this.onHover = onHover;
    this.onSelect = onSelect;
    this.svg = s("svg", { class: "dag", role: "group", "aria-label": "Pipeline steps" });
    this.container.append(this.svg);
    this.els = new Map(); // name → {g, sub, title}
    this.edgeEls = new Map(); // name → [path elements touching it]
    this.scale = null; // null: fit to the container's width (at most 1)
    this.size = { width: 0, height: 0 };
    this.selected = null;
    this.structure = "";
    this.order = [];
    this._listen();
  }

  _listen() {
    const nodeOf = (target) => target.closest && target.closest("g.node");
    this.svg.addEventListener("pointerover", (e) => {
      const g = nodeOf(e.target);
      if (g) this.onHover(g.dataset.step);
    });
    this.svg.addEventListener("pointerleave", () => this.onHover(null));
    this.svg.addEventListener("click", (e) => {
      const g = nodeOf(e.target);
      if (g) this.onSelect(g.dataset.step);
    });
    this.svg.addEventListener("focusin", (e) => {
      const g = nodeOf(e.target);
      if (g) this.onHover(g.dataset.step);
    });
    this.svg.addEventListener("keydown", (e) => {
      const g = nodeOf(e.target);
      if (g && (e.key === "Enter" || e.key === " ")) {
        e.preventDefault();
        this.onSelect(g.dataset.step);
      }
    });
  }

  /** True when `nodes` (name → state) has another set of steps or edges than drawn. */
  structureChanged(nodes) {
    return structureKey(nodes) !== this.structure;
  }

  /** Lay out and draw every node and edge (on the first load or a new structure). */
  draw(nodes, now) {
    this.structure = structureKey(nodes);
    const list = Object.values(nodes).map((n) => ({ name: n.name, parents: n.parents || [] }));
    const { pos, edges, lanes, width, height } = layout(list);
    this.size = { width, height };
    // the steps top to bottom, layer by layer (the timeline's rows)
    this.order = [...pos.entries()].sort(([, a], [, b]) => a.layer - b.layer || a.y - b.y).map(([name]) => name);
    this.els.clear();
    this.edgeEls.clear();
    const edgeLayer = s("g", { class: "edges" });
    const nodeLayer = s("g", { class: "nodes" });
    for (const [from, to] of edges) {
      const path = s("path", { class: "edge", d: edgePath(pos.get(from), pos.get(to), lanes.get(edgeKey(from, to))),
        "marker-end": "url(#dag-arrow)", dataset: { from, to } });
      edgeLayer.append(path);
      for (const name of [from, to]) {
        if (!this.edgeEls.has(name)) this.edgeEls.set(name, []);
        this.edgeEls.get(name).push(path);
      }
    }
    for (const node of Object.values(nodes)) {
      const p = pos.get(node.name);
      const title = s("title", { text: node.name });
      const sub = s("text", { class: "nsub", x: 12, y: 35 });
      const g = s("g", {
        class: "node", transform: `translate(${p.x},${p.y})`, tabindex: 0, role: "button",
        dataset: { step: node.name },
      }, title, s("rect", { width: NODE_W, height: NODE_H, rx: 7 }),
      s("rect", { class: "bar", width: 5, height: NODE_H, rx: 2 }),
      s("text", { class: "nname", x: 12, y: 18, text: shortName(node.name) }), sub);
      this.els.set(node.name, { g, sub, status: null, label: null });
      nodeLayer.append(g);
    }
    const defs = s("defs", {}, s("marker", {
      id: "dag-arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
      orient: "auto-start-reverse",
    }, s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow" })));
    this.svg.replaceChildren(defs, edgeLayer, nodeLayer);
    this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.svg.dataset.steps = String(list.length);
    for (const node of Object.values(nodes)) this.update(node, now);
    this.setSelected(this.selected);
    this.applyScale();
  }

  /** Show one node's new state (cheap: a class, two attributes and a text). */
  update(node, now) {
    const el = this.els.get(node.name);
    if (!el) return;
    const status = node.status || "pending";
    if (el.status !== status) {
      el.g.setAttribute("class", `node st-${status}${this.selected === node.name ? " selected" : ""}`);
      el.g.dataset.status = status;
      el.status = status;
    }
    const sub = nodeSubtitle(node, now);
    if (el.label !== sub) {
      el.sub.textContent = sub;
      el.g.setAttribute("aria-label", `step ${node.name}: ${sub}`);
      el.label = sub;
    }
  }

  setSelected(name) {
    for (const el of this.svg.querySelectorAll(".selected, .edge.hl")) el.classList.remove("selected", "hl");
    this.selected = name;
    const el = name && this.els.get(name);
    if (!el) return;
    el.g.classList.add("selected");
    for (const path of this.edgeEls.get(name) || []) path.classList.add("hl");
  }

  /** Zoom: a factor, or null to fit the width of the container (never above 100%). */
  setScale(scale) {
    this.scale = scale;
    this.applyScale();
  }

  currentScale() {
    if (this.scale !== null) return this.scale;
    const available = this.container.clientWidth - 4;
    if (!this.size.width || available <= 0) return 1;
    return Math.max(MIN_FIT_SCALE, Math.min(1, available / this.size.width));
  }

  applyScale() {
    const k = this.currentScale();
    this.svg.setAttribute("width", String(Math.ceil(this.size.width * k)));
    this.svg.setAttribute("height", String(Math.ceil(this.size.height * k)));
  }

  scrollTo(name) {
    const el = this.els.get(name);
    if (el) el.g.scrollIntoView?.({ block: "nearest", inline: "nearest" });
  }
}

function structureKey(nodes) {
  let key = "";
  for (const n of Object.values(nodes)) key += `${n.name}<${(n.parents || []).join(",")}>;`;
  return key;
}
