"""`peftc graph`: one adapted layer's subgraph as inserted and after the passes, with provenance labels."""
from __future__ import annotations

import xml.dom.minidom
from pathlib import Path

import pytest

import peftc.cli
from peftc import graph_view

ROOT = Path(__file__).resolve().parent.parent
LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def dot(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("g") / "q.dot"
    assert peftc.cli.main(["-q", "graph", str(ROOT / "examples" / "lora.peft"), "tiny-llama", "--layer", LAYER,
                           "-o", str(out)]) == 0
    return out.read_text()


def _cluster(dot: str, i: int) -> str:
    return dot.split(f"subgraph cluster_{i}")[1].split("subgraph cluster_")[0]


def test_before_is_the_declared_transform_and_after_is_factored(dot):
    before, after = _cluster(dot, 0), _cluster(dot, 1)
    assert "as inserted" in before and "after every pass" in after
    assert '"0_mm_default" [label="mm\\nadapter: assistant"' in before      # B @ A, as lora.peft declares it
    assert "rule:" not in before
    # linear(x, W) + linear(linear(x, A), s*B) (rules split_sum, stack) for q/k/v as one call, factored (one
    # shared x @ cat(A)) or dense by token count (pass choose); s*B and cat(A) from the weight cache (pass cache)
    assert "rule: stack" in after and "lowrank_linears\\nadapter: assistant\\nrule: choose" in after
    assert "call_module" in after
    assert "mm\\n" not in after                                           # B @ A is never formed
    assert after.count("->") > 5


def test_builtin_svg_renderer(monkeypatch, tmp_path):
    monkeypatch.setattr(graph_view.shutil, "which", lambda _: None)      # no Graphviz: the built-in layout
    snap = graph_view.Snapshot("t", {"x": ["input x"], "w": ["w"], "y": ["linear", "rule: r"]},
                               {"x": "context", "w": "context", "y": "peftc"}, {"y": "a"},
                               [("x", "y"), ("w", "y")])
    svg = graph_view.render([snap], "layer", tmp_path / "g.svg")
    doc = xml.dom.minidom.parseString(svg)
    assert len(doc.getElementsByTagName("rect")) == 3 and len(doc.getElementsByTagName("line")) == 2
    texts = [t.firstChild.data for t in doc.getElementsByTagName("text")]
    assert "rule: r" in texts and "layer" in texts


def test_cli_writes_svg(tmp_path):
    out = tmp_path / "q.svg"
    assert peftc.cli.main(["-q", "graph", str(ROOT / "examples" / "ia3.peft"), "tiny-llama", "--layer",
                           "model.layers.0.mlp.down_proj", "-o", str(out)]) == 0
    xml.dom.minidom.parse(str(out))


def test_bad_layer_and_output(tmp_path, capsys):
    spec = str(ROOT / "examples" / "lora.peft")
    assert peftc.cli.main(["graph", spec, "tiny-llama", "--layer", "model.layers.0.self_attn.q_prj", "-o",
                           str(tmp_path / "g.svg")]) == 1
    err = capsys.readouterr().err
    assert "no adapter of the spec is on that layer" in err and "did you mean 'model.layers.0.self_attn.q_proj'" in err
    assert not (tmp_path / "g.svg").exists()
    assert peftc.cli.main(["graph", spec, "tiny-llama", "--layer", LAYER, "-o", str(tmp_path / "g.png")]) == 1
    assert "writes a .svg or .dot file" in capsys.readouterr().err
