"""chop.cli.viz: the layer graph, its layout, the self-contained HTML page and the DOT file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import chop
from chop.cli.report import build_report
from chop.cli.viz import colour, layer_graph, layout, render_html, to_dot

ROOT = Path(__file__).resolve().parents[3]


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class ResNet(nn.Module):
    def __init__(self, blocks: int = 3, d: int = 8):
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(blocks)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def pruned(model: nn.Module, x: torch.Tensor, pipeline: str = "snip, mask{sparsity=0.8}"):
    torch.manual_seed(0)
    graph = chop.trace(model, x)
    chop.run(graph, pipeline, data=[(x, torch.randint(0, 4, (x.shape[0],)))])
    report = build_report(graph)
    return graph, report, layer_graph(graph, report["layers"])


def test_layer_graph_of_a_residual_model() -> None:
    torch.manual_seed(0)
    _, report, g = pruned(ResNet(blocks=3), torch.randn(4, 6))
    kinds = [d["kind"] for _, d in g.nodes(data=True)]
    assert kinds.count("layer") == 2 + 2 * 3 and kinds.count("input") == 1
    assert kinds.count("merge") == 3 and kinds.count("output") == 1
    layer_of = {v: d.get("layer") for v, d in g.nodes(data=True)}
    edges = {(layer_of[u] or u, layer_of[v] or v) for u, v in g.edges}
    assert ("blocks.0.a", "blocks.0.b") in edges and ("head", "output") in edges
    merges = [v for v, d in g.nodes(data=True) if d["kind"] == "merge"]
    first = merges[0]
    assert {layer_of[u] for u in g.predecessors(first)} == {"stem", "blocks.0.b"}  # the skip
    assert g.number_of_edges() < 2 * g.number_of_nodes()  # linear, not quadratic
    data = next(d for _, d in g.nodes(data=True) if d.get("layer") == "head")
    head = next(layer for layer in report["layers"] if layer["name"] == "head.weight")
    assert data["kept"] == head["kept"] and data["sparsity"] == head["sparsity"]


def test_layout_wraps_long_models_into_columns() -> None:
    _, _, g = pruned(ResNet(blocks=20), torch.randn(4, 6))
    coords = layout(g)
    assert coords.keys() == set(g.nodes)
    columns = {c for _, _, c in coords.values()}
    assert len(columns) > 1
    spots = [(round(x), round(y)) for x, y, _ in coords.values()]
    assert len(spots) == len(set(spots))  # no two nodes in one place
    for u, v in g.edges:  # data flows down a column or on to a later one
        (_, y1, c1), (_, y2, c2) = coords[u], coords[v]
        assert c2 > c1 or (c2 == c1 and y2 > y1)


def test_colour_scale() -> None:
    assert colour(0.0) == "#ffffcc" and colour(1.0) == "#800026"
    assert colour(None) != colour(0.0)
    assert re.fullmatch(r"#[0-9a-f]{6}", colour(0.37))


def test_html_is_one_self_contained_page(tmp_path: Path) -> None:
    _, report, g = pruned(ResNet(blocks=2), torch.randn(4, 6))
    page = render_html(report, g)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 3  # legend, graph, bars
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "@import" not in page and "url(http" not in page
    assert not [u for u in re.findall(r"https?://[^\s\"'<>]+", page)
                if u != "http://www.w3.org/2000/svg"]
    for layer in report["layers"]:
        assert layer["name"] in page  # the bar chart
        assert f"{layer['layer']} · linear" in page  # the graph
        assert f"kept {layer['kept']:,} / {layer['numel']:,}" in page
        assert f"{layer['sparsity']:.1%}" in page
    assert f"{report['totals']['sparsity']:.1%} sparse" in page


def test_html_of_a_real_run_names_conv_layers() -> None:
    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    _, report, g = pruned(Cnn(), torch.randn(4, 1, 4, 4), "snip, mask{sparsity=0.5}, fold")
    page = render_html(report, g)
    assert "conv · conv2d" in page and "3×1×3×3" in page and "fc · linear" in page


def test_dot() -> None:
    _, report, g = pruned(ResNet(blocks=1), torch.randn(4, 6))
    dot = to_dot(g, "ResNet")
    assert dot.startswith('digraph "ResNet" {') and dot.rstrip().endswith("}")
    assert dot.count("->") == g.number_of_edges()
    assert 'label="stem (linear)\\n8×6\\nkept' in dot and "fillcolor=" in dot


def _chromium() -> str | None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from render_html import find_browser
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return find_browser()


def test_render_html_script(tmp_path: Path) -> None:
    if _chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    _, report, g = pruned(ResNet(blocks=2), torch.randn(4, 6))
    html = tmp_path / "sparsity.html"
    html.write_text(render_html(report, g))
    png = tmp_path / "page.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "render_html.py"), str(html),
                             "-o", str(png), "--width", "800", "--height", "600"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 600)
