"""docs/methods.md is generated from passes/ (python -m peftc.docs) and must not go stale; the generator covers
every method, option, layer kind and checkpoint key, and renders a method it has never seen."""
from __future__ import annotations

from pathlib import Path

from peftc.docs import REGENERATE, render, render_library, tensors
from peftc.lang.methods import parse_library_file
from peftc.library import library

DOC = Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def test_methods_md_is_up_to_date():
    assert DOC.is_file(), f"docs/methods.md is missing: run `{REGENERATE}`"
    assert DOC.read_text() == render_library(), f"docs/methods.md is stale: run `{REGENERATE}`"


def test_catalogue_lists_every_method_option_kind_and_key():
    text = render_library()
    for m in library().methods.values():
        assert f"## {m.name}\n" in text
        for o in m.options.values():
            assert f"| `{o.name}` |" in text
            if o.config_key:
                assert f"`{o.config_key}`" in text
        for kind in m.kinds:
            keys = tensors(m.body, kind)
            assert keys, (m.name, kind)
            for key, *_ in keys:
                assert f"| {kind} | `{key}` |" in text
    for r in library().rules:
        assert f"| `{r.name}` |" in text


def test_conditions_and_kinds_come_from_the_declaration():
    lora = library().method("lora")
    assert ("lora_B.bias", "bias_B", "[out]", "layer", "lora_bias") in tensors(lora.body, "linear")
    assert not [t for t in tensors(lora.body, "embedding") if t[0] == "lora_B.bias"]
    ia3 = library().method("ia3")
    assert {t[4] for t in tensors(ia3.body, "linear")} == {"feedforward", "not feedforward"}


def test_a_new_method_renders_without_change(tmp_path):
    f = tmp_path / "newm.peft"
    f.write_text("# NewM: a made-up method.\n\nmethod newm(r: int = 4 as \"r\", scale: float = 0.5)\n"
                 "    peft \"NEWM\"\n    layers linear\n    mergeable r > 0\n{\n"
                 "    when scale > 0 { param P: [r, in] init zeros() saved \"newm_P\" }\n"
                 "    weight W + scale * t(P)[:, None]\n}\n")
    methods, _ = parse_library_file(f.read_text(), str(f))
    text = render(methods, [])
    assert "## newm" in text and "NewM: a made-up method." in text
    assert "| linear | `newm_P` | `P` | `[r, in]` | layer | `scale > 0` |" in text
    assert "when `r > 0`" in text and "| `scale` | float | `0.5` |" in text
