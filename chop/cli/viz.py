"""The sparsity picture: the model's layer graph coloured by sparsity, as one HTML page.

:func:`layer_graph` collapses the fx graph with networkx to its weight-bearing ops (the report's
layers) plus the inputs and outputs, joined by the data flow between them: an edge u -> v when
data flows from u to v through ops that bear no weight. :func:`layout` places it in layers
(longest path from the inputs), orders each layer by the barycentre of its predecessors, and
wraps long models into several columns so a 100-layer model stays readable. :func:`render_html`
draws it as inline SVG next to a per-layer bar chart — one self-contained file, no scripts, no
network. :func:`to_dot` writes the same graph for Graphviz and other tools.
"""

from __future__ import annotations

import html
import math
from typing import Any

import networkx as nx

from chop.ir.graph import Graph
from chop.ir.masks import mask_of
from chop.passes.export.sparse import SPARSE, csr_weights

# Sparsity colour scale (0 = dense … 1 = empty), YlOrRd-like; unpruned layers are grey.
_STOPS = [(0.0, (255, 255, 204)), (0.25, (254, 217, 118)), (0.5, (253, 141, 60)),
          (0.75, (227, 26, 28)), (1.0, (128, 0, 38))]
_UNPRUNED = "#e5e7eb"
_IO = "#dbeafe"

BOX_W, BOX_H, GAP_X, GAP_Y, COL_GAP, MARGIN = 200, 58, 28, 34, 70, 24
MAX_ROWS = 14  # ranks per column before the picture wraps into another column


def colour(sparsity: float | None) -> str:
    """Fill colour of a layer with this sparsity (None: not pruned)."""
    if sparsity is None:
        return _UNPRUNED
    s = min(max(sparsity, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
        if s <= b:
            t = (s - a) / (b - a)
            return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))
    return "#800026"


def _text_colour(fill: str) -> str:
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#ffffff" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "#111827"


def layer_graph(graph: Graph, layers: list[dict[str, Any]]) -> nx.DiGraph:
    """The weight-bearing ops of ``graph`` (one node per op that uses a layer of ``layers``),
    its inputs and its output, with the data flow between them as edges."""
    by_name = {layer["name"]: layer for layer in layers}
    out = nx.DiGraph()

    def weight_of(arg: Any) -> str | None:
        if arg.op == "get_attr" and arg.target in by_name:
            return arg.target
        owner = mask_of(arg)
        return owner if owner in by_name else None

    sparse = {node: name for name, (node, _) in csr_weights(graph).items()}  # CSR layers
    reach: dict[Any, set[str]] = {}
    for node in graph.module.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            out.add_node(node.name, kind="input", label=node.name)
            reach[node] = {node.name}
        elif node.op == "get_attr" or mask_of(node):
            reach[node] = set()
        elif node.op == "output":
            out.add_node("output", kind="output", label="output")
            for source in set().union(*(reach[a] for a in inputs)):
                out.add_edge(source, "output")
        else:
            stored = sparse.get(node, node.meta.get("chop", {}).get(SPARSE, {}).get("weight"))
            weights = [w for w in map(weight_of, inputs) if w is not None] or [
                name for name in [stored] if name in by_name]
            sources = set().union(*(reach[a] for a in inputs if weight_of(a) is None))
            if weights:
                layer = by_name[weights[0]]
                out.add_node(node.name, kind="layer", **layer)
                for source in sources:
                    out.add_edge(source, node.name)
                reach[node] = {node.name}
            elif sum(1 for a in inputs if reach[a]) >= 2 and len(sources) >= 2:
                # a merge (residual add, concat, attention matmul): one junction node keeps the
                # edge count linear instead of joining every source to every later layer
                op = str(getattr(node.target, "overloadpacket", node.target)).split(".")[-1]
                out.add_node(node.name, kind="merge", label=op)
                for source in sources:
                    out.add_edge(source, node.name)
                reach[node] = {node.name}
            else:
                reach[node] = sources
    return out


def layout(g: nx.DiGraph, max_rows: int = MAX_ROWS) -> dict[str, tuple[float, float, int]]:
    """Centre ``(x, y)`` and column of every node: ranks top to bottom, wrapped into columns
    of at most ``max_rows`` ranks, read left to right like a newspaper."""
    if not g:
        return {}
    rank: dict[str, int] = {}
    for v in nx.topological_sort(g):
        rank[v] = max((rank[u] + 1 for u in g.predecessors(v)), default=0)
    sinks = [v for v in g if g.nodes[v].get("kind") == "output"]
    for v in sinks:  # the output sits on the last rank
        rank[v] = max(rank.values())
    ranks: list[list[str]] = [[] for _ in range(max(rank.values()) + 1)]
    for v in nx.topological_sort(g):
        ranks[rank[v]].append(v)
    position = {v: float(i) for row in ranks for i, v in enumerate(row)}
    for _ in range(4):  # barycentre sweeps reduce crossings
        for row in ranks[1:]:
            for v in row:
                preds = list(g.predecessors(v))
                position[v] = sum(position[u] for u in preds) / len(preds) if preds else position[v]
            row.sort(key=lambda v: position[v])
            for i, v in enumerate(row):
                position[v] = float(i)
    columns = math.ceil(len(ranks) / max_rows)
    rows = math.ceil(len(ranks) / columns)
    coords: dict[str, tuple[float, float, int]] = {}
    x0 = MARGIN
    for c in range(columns):
        chunk = ranks[c * rows:(c + 1) * rows]
        width = max(len(row) for row in chunk)
        col_w = width * BOX_W + (width - 1) * GAP_X
        y0 = MARGIN
        for row in chunk:
            row_w = len(row) * BOX_W + (len(row) - 1) * GAP_X
            row_h = 2 * max(_half_height(g, v) for v in row)
            for i, v in enumerate(row):
                x = x0 + (col_w - row_w) / 2 + i * (BOX_W + GAP_X) + BOX_W / 2
                coords[v] = (x, y0 + row_h / 2, c)
            y0 += row_h + GAP_Y
        x0 += col_w + COL_GAP
    return coords


def _fmt_shape(shape: list[int]) -> str:
    return "×".join(map(str, shape))


def _short(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def graph_svg(g: nx.DiGraph) -> str:
    """The layer graph as an inline ``<svg>`` element."""
    coords = layout(g)
    if not coords:
        return "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'></svg>"
    width = max(x for x, _, _ in coords.values()) + BOX_W / 2 + MARGIN
    height = max(y for _, y, _ in coords.values()) + BOX_H / 2 + MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        'aria-label="layer graph coloured by sparsity">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#6b7280"/></marker></defs>',
    ]
    style = 'fill="none" stroke="#9ca3af" stroke-width="1.4" marker-end="url(#arrow)"'
    stubs_out: set[str] = set()
    stubs_in: set[str] = set()
    for u, v in g.edges:
        (x1, c1, col1), (x2, c2, col2) = coords[u], coords[v]
        y1, y2 = c1 + _half_height(g, u), c2 - _half_height(g, v)
        if col1 != col2:  # continues in a later column: a dashed stub at each end
            title = f"<title>{html.escape(_name(g, u))} → {html.escape(_name(g, v))}</title>"
            if u not in stubs_out:
                stubs_out.add(u)
                parts.append(f'<path d="M{x1:.1f},{y1:.1f} L{x1:.1f},{y1 + 18:.1f}" '
                             f'stroke-dasharray="4 3" {style}>{title}</path>')
            if v not in stubs_in:
                stubs_in.add(v)
                parts.append(f'<path d="M{x2:.1f},{y2 - 20:.1f} L{x2:.1f},{y2:.1f}" '
                             f'stroke-dasharray="4 3" {style}>{title}</path>')
        elif y2 - y1 > GAP_Y + 1:  # skips ranks: an arc on the right, clear of the boxes between
            r1, r2 = x1 + _half_width(g, u), x2 + _half_width(g, v)
            between = [x + _half_width(g, w) for w, (x, y, col) in coords.items()
                       if col == col1 and c1 < y < c2]
            reach = max([r1, r2, *between]) + 22
            parts.append(f'<path d="M{r1:.1f},{c1:.1f} C{reach:.1f},{c1:.1f} {reach:.1f},'
                         f'{c2:.1f} {r2:.1f},{c2:.1f}" {style}/>')
        else:
            bend = max((y2 - y1) / 2, 12)
            parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},'
                         f'{y2 - bend:.1f} {x2:.1f},{y2:.1f}" {style}/>')
    for v, (x, y, _) in coords.items():
        parts.append(_node_svg(g.nodes[v], x, y))
    parts.append("</svg>")
    return "\n".join(parts)


def _name(g: nx.DiGraph, v: str) -> str:
    data = g.nodes[v]
    return str(data.get("layer") or data.get("label") or v)


def _half_width(g: nx.DiGraph, v: str) -> float:
    return {"layer": BOX_W / 2, "merge": 13}.get(g.nodes[v].get("kind"), 70)


def _half_height(g: nx.DiGraph, v: str) -> float:
    return {"layer": BOX_H / 2, "merge": 13}.get(g.nodes[v].get("kind"), 15)


def _node_svg(data: dict[str, Any], x: float, y: float) -> str:
    e = html.escape
    if data.get("kind") == "merge":
        return (
            f'<g class="merge"><title>{e(data.get("label", ""))}</title><circle cx="{x:.1f}" '
            f'cy="{y:.1f}" r="13" fill="#f9fafb" stroke="#9ca3af"/><text x="{x:.1f}" '
            f'y="{y + 3.5:.1f}" text-anchor="middle" class="t3">{e(data.get("label", "")[:4])}'
            '</text></g>'
        )
    if data.get("kind") != "layer":
        label = e(data.get("label", ""))
        return (
            f'<g class="io"><rect x="{x - 70:.1f}" y="{y - 15:.1f}" width="140" height="30" '
            f'rx="15" fill="{_IO}" stroke="#93c5fd"/><text x="{x:.1f}" y="{y + 4:.1f}" '
            f'text-anchor="middle" class="t2">{label}</text></g>'
        )
    sparsity = data["sparsity"] if data.get("pruned") else None
    fill = colour(sparsity)
    ink = _text_colour(fill)
    kept = f"kept {data['kept']:,} / {data['numel']:,}"
    amount = f"{data['sparsity']:.1%} sparse" if data.get("pruned") else "not pruned"
    left, top = x - BOX_W / 2, y - BOX_H / 2
    title = (f"{data['name']}: {data['op']} {_fmt_shape(data['shape'])}, {kept} "
             f"({data['sparsity']:.2%} sparse)")
    return (
        f'<g class="layer"><title>{e(title)}</title>'
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{BOX_W}" height="{BOX_H}" rx="6" '
        f'fill="{fill}" stroke="#374151" stroke-width="1"/>'
        f'<text x="{x:.1f}" y="{top + 17:.1f}" text-anchor="middle" class="t1" style="fill:{ink}">'
        f'{e(_short(data["layer"]))} · {e(data["op"])}</text>'
        f'<text x="{x:.1f}" y="{top + 33:.1f}" text-anchor="middle" class="t2" style="fill:{ink}">'
        f'{e(_fmt_shape(data["shape"]))} · {e(amount)}</text>'
        f'<text x="{x:.1f}" y="{top + 48:.1f}" text-anchor="middle" class="t3" style="fill:{ink}">'
        f'{e(kept)}</text></g>'
    )


def bars_svg(layers: list[dict[str, Any]]) -> str:
    """A horizontal bar per layer: its sparsity, coloured like the graph, with its numbers."""
    longest = max((len(_short(layer["name"], 32)) for layer in layers), default=8)
    label_w, bar_w, row_h, text_w = 16 + 7 * longest, 420, 24, 210
    width = label_w + bar_w + text_w
    height = row_h * len(layers) + 30
    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="bars" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="sparsity per layer">'
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        tx = label_w + tick * bar_w
        parts.append(f'<line x1="{tx:.1f}" y1="0" x2="{tx:.1f}" y2="{height - 22}" '
                     'stroke="#e5e7eb"/>')
        parts.append(f'<text x="{tx:.1f}" y="{height - 8}" text-anchor="middle" class="t3">'
                     f'{tick:.0%}</text>')
    for i, layer in enumerate(layers):
        y = i * row_h
        s = layer["sparsity"]
        fill = colour(s if layer.get("pruned") else None)
        parts.append(
            f'<g><title>{e(layer["name"])}: {s:.2%} sparse</title>'
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" class="t2">'
            f'{e(_short(layer["name"], 32))}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{bar_w}" height="{row_h - 8}" '
            'fill="#f3f4f6"/>'
            f'<rect x="{label_w}" y="{y + 4}" width="{s * bar_w:.1f}" height="{row_h - 8}" '
            f'fill="{fill}" stroke="#374151" stroke-width="0.5"/>'
            f'<text x="{label_w + bar_w + 8}" y="{y + 16}" class="t2">{s:.1%} · kept '
            f'{layer["kept"]:,} / {layer["numel"]:,}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _legend_svg() -> str:
    stops = "".join(
        f'<stop offset="{o:.2f}" stop-color="{colour(o)}"/>' for o in (0, 0.25, 0.5, 0.75, 1)
    )
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="360" height="40" class="legend">'
        f'<defs><linearGradient id="scale">{stops}</linearGradient></defs>'
        '<rect x="0" y="4" width="240" height="14" fill="url(#scale)" stroke="#374151" '
        'stroke-width="0.5"/>'
        '<text x="0" y="34" class="t3">0% (dense)</text>'
        '<text x="240" y="34" text-anchor="end" class="t3">100% sparse</text>'
        f'<rect x="262" y="4" width="14" height="14" fill="{_UNPRUNED}" stroke="#374151" '
        'stroke-width="0.5"/><text x="282" y="16" class="t3">not pruned</text></svg>'
    )


_CSS = """
.chop-sparsity { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
       sans-serif; margin: 24px 32px; color: #111827; background: #ffffff; }
.chop-sparsity h1 { font-size: 22px; margin: 0 0 4px 0; }
.chop-sparsity h2 { font-size: 16px; margin: 28px 0 8px 0; }
.chop-sparsity .summary { color: #374151; margin: 4px 0; font-size: 14px; }
.chop-sparsity .summary b { color: #111827; }
.chop-sparsity code { background: #f3f4f6; padding: 1px 5px; border-radius: 4px; }
.chop-sparsity .row { display: flex; flex-wrap: wrap; gap: 0 32px; align-items: flex-start; }
.chop-sparsity .panel { overflow: auto; border: 1px solid #e5e7eb; border-radius: 8px;
       padding: 8px; display: inline-block; max-width: 100%; }
.chop-sparsity svg text { font-family: inherit; } .chop-sparsity .t1 { font-size: 12px;
       font-weight: 600; }
.chop-sparsity .t2 { font-size: 11px; } .chop-sparsity .t3 { font-size: 10px; fill: #4b5563; }
"""


def render_fragment(report: dict[str, Any], g: nx.DiGraph) -> str:
    """The body of ``sparsity.html`` as one ``<div>`` with its own style: the title and totals,
    the layer graph and the per-layer bars (what a notebook shows for :func:`chop.summary`)."""
    e = html.escape
    totals = report["totals"]
    pipeline = ", ".join(step["name"] for step in report.get("pipeline", []))
    return f"""<div class="chop-sparsity"><style>{_CSS}</style>
<h1>{e(str(report.get("model", "model")))}: {totals["sparsity"]:.1%} sparse</h1>
<p class="summary">kept <b>{totals["kept"]:,}</b> of <b>{totals["numel"]:,}</b> weights in
{totals["layers"]} layers · <b>{totals["nonzero"]:,}</b> of {totals["parameters"]:,} parameters
non-zero overall{f' · pipeline <code>{e(pipeline)}</code>' if pipeline else ''}</p>
{_legend_svg()}
<div class="row">
<section><h2>Layer graph</h2>
<div class="panel">{graph_svg(g)}</div></section>
<section><h2>Sparsity per layer</h2>
<div class="panel">{bars_svg(report["layers"])}</div></section>
</div></div>"""


def render_html(report: dict[str, Any], g: nx.DiGraph) -> str:
    """The whole ``sparsity.html`` page for ``report`` and its layer graph ``g``."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>chop · {html.escape(str(report.get("model", "model")))} sparsity</title>
</head>
<body>
{render_fragment(report, g)}
</body></html>
"""


def to_dot(g: nx.DiGraph, name: str = "model") -> str:
    """The layer graph in Graphviz DOT, nodes filled with their sparsity colour."""

    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [f"digraph {q(name)} {{", '  node [shape=box, style="rounded,filled", fontsize=10];']
    for v, data in g.nodes(data=True):
        if data.get("kind") == "layer":
            label = (f"{data['layer']} ({data['op']})\n{_fmt_shape(data['shape'])}\n"
                     f"kept {data['kept']}/{data['numel']} ({data['sparsity']:.1%} sparse)")
            fill = colour(data["sparsity"] if data.get("pruned") else None)
            lines.append(f"  {q(v)} [label={q(label)}, fillcolor={q(fill)}, "
                         f"sparsity={data['sparsity']:.6f}];")
        else:
            shape = ", shape=circle" if data.get("kind") == "merge" else ""
            lines.append(f"  {q(v)} [label={q(data.get('label', v))}, fillcolor={q(_IO)}{shape}];")
    lines += [f"  {q(u)} -> {q(v)};" for u, v in g.edges]
    return "\n".join(lines + ["}"]) + "\n"
