"""`peftc graph`: one adapted layer's subgraph, as inserted (the declared weight transform) and as it runs after
every pass (folded, factored, fused), drawn side by side.

A snapshot keeps the nodes peftc made for the layer (their provenance: layer, adapters, rule) and, greyed, the
nodes they read from or feed (the input activation, base weights, the layer's op). Output: Graphviz DOT
(`.dot`), or SVG (`.svg`: rendered by Graphviz's `dot` when it is installed, else by a small built-in layered
layout, the layers from networkx's topological generations).
"""
from __future__ import annotations

import html
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from torch import fx

from peftc.errors import PeftcError
from peftc.rewrite.explain import provenance
from peftc.rewrite.graph_tools import TAG

PALETTE = ["#cfe2ff", "#d1e7dd", "#fff3cd", "#f8d7da", "#e2d9f3", "#d2f4ea", "#fde2c8", "#e9ecef"]


@dataclass
class Snapshot:
    title: str
    nodes: dict[str, list[str]] = field(default_factory=dict)      # node name -> label lines
    kinds: dict[str, str] = field(default_factory=dict)            # node name -> "peftc" | "context"
    adapters: dict[str, str] = field(default_factory=dict)         # node name -> adapter(s)
    edges: list[tuple[str, str]] = field(default_factory=list)


def _op_name(n: fx.Node) -> str:
    if n.op == "get_attr":
        return str(n.target).rsplit(".", 2)[-1] if "." in str(n.target) else str(n.target)
    if n.op == "placeholder":
        return f"input {n.target}"
    if n.op == "call_function":
        name = getattr(n.target, "__name__", str(n.target))
        return name.split(".")[0] if name.startswith(("linear", "addmm", "mm", "conv")) else name
    return n.op


def first_seen(gm: fx.GraphModule, layer: str, pass_name: str, made_by: dict[str, str]) -> None:
    """Record, for the layer's nodes that are new after `pass_name`, that this pass made them."""
    for n in gm.graph.nodes:
        if n.meta.get(TAG) == layer:
            made_by.setdefault(n.name, pass_name)


def snapshot(gm: fx.GraphModule, layer: str, title: str, made_by: dict[str, str] | None = None) -> Snapshot:
    """The layer's part of `gm`: peftc's nodes for it, and one hop of context around them; a node that no rule
    made is labelled with the pass that made it (`made_by`, from `first_seen`)."""
    ours = [n for n in gm.graph.nodes if n.meta.get(TAG) == layer]
    snap = Snapshot(title)
    if not ours:
        return snap
    keep = set(ours)
    for n in ours:
        keep.update(n.all_input_nodes)
        keep.update(u for u in n.users if u.op != "output")
    for n in gm.graph.nodes:
        if n not in keep:
            continue
        p = provenance(n)
        lines = [_op_name(n)]
        if n.op == "get_attr":
            lines = [str(n.target)]
        if p.get("adapter"):
            lines.append(f"adapter: {p['adapter']}")
        if p.get("rule"):
            lines.append(f"rule: {p['rule']}")
        elif n in ours and made_by and made_by.get(n.name) not in (None, "insert"):
            lines.append(f"pass: {made_by[n.name]}")
        snap.nodes[n.name] = lines
        snap.kinds[n.name] = "peftc" if n in ours else "context"
        if p.get("adapter"):
            snap.adapters[n.name] = p["adapter"]
    for n in gm.graph.nodes:
        if n.name in snap.nodes:
            snap.edges += [(a.name, n.name) for a in n.all_input_nodes if a.name in snap.nodes]
    return snap


def _colors(snaps: list[Snapshot]) -> dict[str, str]:
    names = sorted({a for s in snaps for a in s.adapters.values()})
    return {a: PALETTE[i % len(PALETTE)] for i, a in enumerate(names)}


def to_dot(snaps: list[Snapshot], layer: str) -> str:
    colors = _colors(snaps)
    out = [f'digraph "{layer}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica",'
           ' fontsize=10];', f'  label="{layer}"; labelloc=t;']
    for i, s in enumerate(snaps):
        out.append(f'  subgraph cluster_{i} {{ label="{s.title}";')
        for name, lines in s.nodes.items():
            fill = colors.get(s.adapters.get(name, ""), "#ffffff") if s.kinds[name] == "peftc" else "#eeeeee"
            label = "\\n".join(line.replace('"', '\\"') for line in lines)
            out.append(f'    "{i}_{name}" [label="{label}", fillcolor="{fill}"'
                       f'{", fontcolor=gray40" if s.kinds[name] == "context" else ""}];')
        out += [f'    "{i}_{a}" -> "{i}_{b}";' for a, b in s.edges]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def to_svg(snaps: list[Snapshot], layer: str) -> str:
    """SVG by Graphviz when `dot` is installed, else by the built-in layered layout."""
    dot = shutil.which("dot")
    if dot:
        r = subprocess.run([dot, "-Tsvg"], input=to_dot(snaps, layer), capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return r.stdout
    return _layered_svg(snaps, layer)


def _layered_svg(snaps: list[Snapshot], layer: str) -> str:
    import networkx as nx
    colors = _colors(snaps)
    box_w, line_h, gap_x, gap_y, pad = 190, 14, 24, 36, 20
    panels, x0, height = [], pad, 0
    for s in snaps:
        g = nx.DiGraph()
        g.add_nodes_from(s.nodes)
        g.add_edges_from(s.edges)
        rows = [sorted(gen, key=list(s.nodes).index) for gen in nx.topological_generations(g)] if s.nodes else []
        width = max([len(r) for r in rows] + [1]) * (box_w + gap_x)
        pos, y = {}, 60
        for row in rows:
            h = max(len(s.nodes[n]) for n in row) * line_h + 10
            x = x0 + (width - len(row) * (box_w + gap_x)) / 2
            for n in row:
                pos[n] = (x, y, len(s.nodes[n]) * line_h + 10)
                x += box_w + gap_x
            y += h + gap_y
        panels.append((s, pos, x0, width))
        height = max(height, y)
        x0 += width + 2 * pad
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0}" height="{height + pad}" font-family="Helvetica" '
           'font-size="11">', '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
           'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
           f'<text x="{pad}" y="20" font-size="14" font-weight="bold">{html.escape(layer)}</text>']
    for s, pos, px, _ in panels:
        out.append(f'<text x="{px}" y="44" font-size="13">{html.escape(s.title)}</text>')
        for a, b in s.edges:
            (xa, ya, ha), (xb, yb, _) = pos[a], pos[b]
            out.append(f'<line x1="{xa + box_w / 2}" y1="{ya + ha}" x2="{xb + box_w / 2}" y2="{yb}" stroke="#555" '
                       'marker-end="url(#arrow)"/>')
        for n, (x, y, h) in pos.items():
            ctx = s.kinds[n] == "context"
            fill = "#eeeeee" if ctx else colors.get(s.adapters.get(n, ""), "#ffffff")
            out.append(f'<g><rect x="{x}" y="{y}" width="{box_w}" height="{h}" rx="6" fill="{fill}" stroke="#888"/>')
            grey = ' fill="#666"' if ctx else ""
            for i, line in enumerate(s.nodes[n]):
                out.append(f'<text x="{x + 6}" y="{y + 16 + i * line_h}"{grey}>{html.escape(line[:32])}</text>')
            out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render(snaps: list[Snapshot], layer: str, path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".dot":
        return to_dot(snaps, layer)
    if suffix == ".svg":
        return to_svg(snaps, layer)
    raise PeftcError(f"output {path}: `peftc graph` writes .svg or .dot")
