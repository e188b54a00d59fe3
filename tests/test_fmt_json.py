"""`peftc fmt` (the canonical form of specs, comments kept) and `--json` reports of `check` and `inspect`."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

import peftc.cli
from peftc.spec.format import format_spec, same_spec

MESSY = """# header comment

adapter   a:lora(r=8,alpha=16){targets q_proj,v_proj   # the attention
r at /.*q_proj/ = 4
layers 0,1
# why merge
merge}
adapter b :import "ckpt" {merge}
adapter mix:combine(0.5*a,b,type="exact")
active mix,a  # trailing
"""

CANONICAL = """# header comment

adapter a: lora(r = 8, alpha = 16) {
    targets q_proj, v_proj  # the attention
    r at /.*q_proj/ = 4
    layers 0, 1
    # why merge
    merge
}

adapter b: import "ckpt" {
    merge
}

adapter mix: combine(0.5 * a, b, type = "exact")

active mix, a  # trailing
"""


def _hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_format_is_canonical_idempotent_and_keeps_meaning():
    assert format_spec(MESSY) == CANONICAL
    assert format_spec(CANONICAL) == CANONICAL
    assert same_spec(MESSY, CANONICAL)
    assert not same_spec(MESSY, CANONICAL.replace("r = 8", "r = 9"))


def test_fmt_rewrites_in_place_keeping_permissions(tmp_path, capsys):
    spec = tmp_path / "s.peft"
    spec.write_text(MESSY)
    os.chmod(spec, 0o640)
    assert peftc.cli.main(["fmt", "--check", str(spec)]) == 1
    assert spec.read_text() == MESSY and "would reformat" in capsys.readouterr().out
    assert peftc.cli.main(["fmt", str(spec)]) == 0
    assert spec.read_text() == CANONICAL and oct(spec.stat().st_mode & 0o777) == "0o640"
    assert peftc.cli.main(["fmt", "--check", str(spec)]) == 0
    assert peftc.cli.main(["fmt", "--stdout", str(spec)]) == 0
    assert capsys.readouterr().out.endswith(CANONICAL)


def test_fmt_syntax_error_is_located_and_writes_nothing(tmp_path, capsys):
    good, bad = tmp_path / "good.peft", tmp_path / "bad.peft"
    good.write_text(MESSY)
    bad.write_text("adapter a: lora(r = 4 {\n    targets q_proj\n}\n")
    before = _hash(good), _hash(bad)
    assert peftc.cli.main(["fmt", str(good), str(bad)]) == 1   # all are read first: none is rewritten
    err = capsys.readouterr().err
    assert "bad.peft:1:23: syntax error" in err and "^" in err
    assert (_hash(good), _hash(bad)) == before
    assert peftc.cli.main(["fmt", str(tmp_path / "none.peft")]) == 1


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("json")
    spec = d / "s.peft"
    spec.write_text('adapter a: lora(r = 4) { targets q_proj, v_proj }\nadapter b: ia3() { targets k_proj }\n'
                    'active a\n')
    return {"spec": spec}


def test_check_json(checked, capsys):
    assert peftc.cli.main(["-q", "check", str(checked["spec"]), "tiny-llama", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    by = {a["name"]: a for a in data["adapters"]}
    assert by["a"]["active"] and not by["b"]["active"] and by["a"]["options"]["r"] == 4
    assert by["a"]["layers"] == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert by["a"]["params"] == 4 * 4 * (64 + 64) and data["trainable_params"] == by["a"]["params"]


def test_check_json_error(tmp_path, capsys):
    spec = tmp_path / "bad.peft"
    spec.write_text("adapter a: lora(rnak = 1) { targets q_proj }\n")
    assert peftc.cli.main(["check", str(spec), "tiny-llama", "--json"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data == {"ok": False, "error": {"message": data["error"]["message"], "file": str(spec), "line": 1,
                                           "column": 17}}
    assert "did you mean 'r'" in data["error"]["message"] and "bad.peft:1:17" in captured.err


def test_inspect_json(capsys):
    assert peftc.cli.main(["inspect", "tiny-llama", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in data["layers"]]
    assert names[0] == "model.embed_tokens" and "lm_head" in names and len(names) == 21
    assert data["layer_kinds"] == {"embedding": 1, "linear": 15, "norm": 5}
    assert peftc.cli.main(["inspect", "--builtins", "--json"]) == 0
    assert "tiny-llama" in [b["name"] for b in json.loads(capsys.readouterr().out)["builtins"]]
