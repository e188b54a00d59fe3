"""Pass `cache` (peftc.rewrite.cache_weights): the small weight-side tensors computed from live adapter tensors are
computed once and reused until one of the tensors they read changes (in place, replaced, or moved), and never
while autograd records gradients for them."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, TOL, inputs_for, lora, max_diff, randomize_, run_logits

import peftc
from peftc.rewrite.cache_weights import WeightCache
from peftc.rewrite.graph_tools import get_path, set_path

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    """Two LoRAs on overlapping llama layers (stacked A's and scaled B's: weight-side work to cache)."""
    pms, spec = [], ""
    for i, (name, targets) in enumerate((("a", ["q_proj", "v_proj", "down_proj"]), ("b", ["q_proj", "k_proj"]))):
        pm = peft.get_peft_model(copy.deepcopy(MODELS["llama"]()), lora(target_modules=targets)).eval()
        randomize_(pm, seed=20 + i)
        d = tmp_path_factory.mktemp(name)
        pm.save_pretrained(str(d))
        spec += f'adapter {name}: import "{d}"\n'
        pms.append(pm)
    return spec


def _cache(gm) -> WeightCache:
    caches = [m for m in gm.modules() if isinstance(m, WeightCache)]
    assert len(caches) == 1
    return caches[0]


def _uncached(gm, x):
    """The graph's output computed without the cache (autograd on: the cache steps aside)."""
    with torch.enable_grad():
        return gm(**x)["logits"].detach()


def test_computed_once_and_follows_changes(two_loras):
    gm = peftc.compile(two_loras, MODELS["llama"]())
    cache, x = _cache(gm), inputs_for("llama")
    first = run_logits(gm, x)
    value = cache._value
    assert value is not None and len(value) > 0
    assert max_diff(run_logits(gm, x), first) == 0 and cache._value is value   # reused, not recomputed
    live = [n for n, p in gm.named_parameters() if p.requires_grad and "lora_B" in n]
    with torch.no_grad():
        get_path(gm, live[0]).mul_(3.0)                 # in place: an optimizer step, a hot swap
    changed = run_logits(gm, x)
    assert cache._value is not value and max_diff(changed, first) > 1e-4
    assert max_diff(changed, _uncached(gm, x)) <= TOL
    old = get_path(gm, live[1])                          # replaced by another tensor object
    set_path(gm, live[1], torch.nn.Parameter(old.detach() * -1.0))
    replaced = run_logits(gm, x)
    assert max_diff(replaced, changed) > 1e-4 and max_diff(replaced, _uncached(gm, x)) <= TOL


def test_not_used_while_recording_gradients(two_loras):
    gm = peftc.compile(two_loras, MODELS["llama"]())
    cache, x = _cache(gm), inputs_for("llama")
    gm(**x)["logits"].square().mean().backward()
    assert cache._value is None
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


def test_no_cache_without_live_adapters(two_loras):
    gm = peftc.compile(two_loras, MODELS["llama"](), merge=True)
    assert not [m for m in gm.modules() if isinstance(m, WeightCache)]


def test_full_size_updates_are_not_cached():
    """LoHa's update is W-sized (pass `rejoin` adds it to W): holding it would be a second copy of the weight."""
    gm = peftc.compile("adapter h: loha(r = 2, alpha = 4) { targets q_proj, v_proj }\n", MODELS["llama"]())
    assert c_rejoined(gm) and not [m for m in gm.modules() if isinstance(m, WeightCache)]


def c_rejoined(gm) -> bool:
    return any(n.meta.get("peftc_rule") == "rejoin_dense" for n in gm.graph.nodes)
