"""`peftc merge`: fold a spec's adapters into a Hugging Face model directory, one tensor at a time.

No tracing and no model in memory: the model is built from config.json on the meta device (a skeleton:
names, layer kinds, shapes and tied weights, no values), the adapters are planned on it (their loaded
tensors are real), and then each safetensors shard is rewritten tensor by tensor: a targeted layer's
weight is read, merged by `merged_weight.merged_layer` (fp32, cast once to the stored dtype) and written;
every other tensor is copied byte for byte. Shards, index, dtypes and every other file of the directory
(config, generation config, tokenizer files) come out as they went in. Peak memory is about what one
layer's fold needs.

Merging never changes the function: a targeted weight tied to another module (an embedding tied to the
output head) is untied, each name getting its own tensor in the shard of the original, and the copied
config says `tie_word_embeddings: false`; where the method makes tied modules follow the adapted weight
(peft's trainable tokens on a table tied to the head), the group stays tied and its stored copy is merged.
Trained biases (peft's `bias = "all"` / `"<method>_only"`) replace the model's. The output is written into
a temporary folder beside OUT_DIR and renamed at the end, so an interrupted run leaves no half-written OUT_DIR.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.atomic import check_new_dir
from peftc.errors import PeftcError
from peftc.library import Library
from peftc.merged_weight import merged_layer, realize_site
from peftc.models import model_class
from peftc.plan import Plan, _err, build_plan
from peftc.progress import step
from peftc.safetensors_stream import DTYPES, Header, ShardWriter, read_header, read_tensor
from peftc.sites import tied_modules
from peftc.spec.model import Spec

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files that hold weights in other formats: never copied (they would be the unmerged model's)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")


@dataclass
class Checkpoint:
    directory: Path
    shards: list[str]                      # file names, in order
    headers: dict[str, Header]             # file name -> header
    where: dict[str, str]                  # tensor key -> file name (the model's parameter names once renamed)
    index: dict[str, Any] | None           # model.safetensors.index.json, if sharded
    file_key: dict[str, str] = field(default_factory=dict)   # a renamed key -> its key in the file

    def stored(self, key: str) -> str:
        """The key a tensor has in its file."""
        return self.file_key.get(key, key)

    def read(self, key: str) -> torch.Tensor:
        return read_tensor(self.headers[self.where[key]], self.stored(key))

    def use_model_names(self, skeleton: nn.Module) -> None:
        """Key the checkpoint by the model's parameter names where transformers renames keys as it loads (its
        conversion mapping: transformers 5 stores ViT's `encoder.layer.N.attention.attention.query` for the
        module `layers.N.attention.q_proj`). Keys that a converter merges (several tensors into one parameter,
        such as per-expert MoE tensors) keep their file names."""
        renamed = _load_time_names(skeleton, list(self.where))
        if renamed:
            self.where = {renamed.get(k, k): f for k, f in self.where.items()}
            self.file_key = {m: k for k, m in renamed.items()}


@dataclass
class MergeResult:
    out: Path
    plan: Plan
    shards: int
    layers: list[str]                      # layers whose weights changed
    untied: list[str] = field(default_factory=list)    # names that got a tensor of their own
    copied: list[str] = field(default_factory=list)    # other files copied
    skipped: list[str] = field(default_factory=list)   # weight files in other formats, not copied
    dtype: str = ""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PeftcError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PeftcError(f"{path}: cannot read: {e}") from None


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """The shards of a model directory (index or single file), every header read and cross-checked."""
    d = Path(directory)
    if not d.is_dir():
        what = "model directory not found" if not d.exists() else "not a directory"
        raise PeftcError(f"{what}: {d} (`peftc merge` takes a Hugging Face model directory: config.json + "
                         "safetensors; for a built-in or custom model, `peftc compile --merge` merges in a graph)")
    if not (d / "config.json").is_file():
        raise PeftcError(f"{d}: not a Hugging Face model directory (no config.json)")
    index_file = d / INDEX_NAME
    if index_file.is_file():
        index = _json(index_file)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise PeftcError(f"{index_file}: no 'weight_map' (expected {{tensor key: shard file}})")
        shards = sorted(set(map(str, wmap.values())))
        headers: dict[str, Header] = {}
        for s in shards:
            if not (d / s).is_file():
                keys = [k for k, v in wmap.items() if v == s]
                more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
                raise PeftcError(f"{index_file}: shard '{s}' (holding '{keys[0]}'{more}) is missing from {d}")
            headers[s] = read_header(d / s)
        for key, s in wmap.items():
            if key not in headers[s].tensors:
                raise PeftcError(f"{d / s}: tensor '{key}' is listed in {INDEX_NAME} but is not in this shard")
        where = {k: str(v) for k, v in wmap.items()}
        for s, h in headers.items():     # tensors a shard holds beyond the index: kept where they are
            for key in h.tensors:
                where.setdefault(key, s)
        return Checkpoint(d, shards, headers, where, index)
    if (d / SINGLE_NAME).is_file():
        h = read_header(d / SINGLE_NAME)
        return Checkpoint(d, [SINGLE_NAME], {SINGLE_NAME: h}, {k: SINGLE_NAME for k in h.tensors}, None)
    other = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth") or p.suffix == ".safetensors")
    hint = (f"; it has {', '.join(other[:3])}: save the model with safetensors (transformers' save_pretrained "
            "does by default)") if other else ""
    raise PeftcError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME}; `peftc merge` reads safetensors checkpoints{hint}")


def _load_time_names(skeleton: nn.Module, keys: list[str]) -> dict[str, str]:
    """file key -> the model's parameter name, for the keys transformers' load-time renamings change."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
        transforms = get_model_conversion_mapping(skeleton)
    except Exception:  # noqa: BLE001 - an older transformers, or a model it has no mapping for: keys as they are
        return {}
    if not transforms:
        return {}
    state = dict(skeleton.state_dict(keep_vars=True))
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out: dict[str, str] = {}
    for k in keys:
        if k in state:
            continue
        try:
            new, converted = rename_source_key(k, renamings, converters,
                                               base_model_prefix=getattr(skeleton, "base_model_prefix", None),
                                               meta_state_dict=state)
        except Exception:  # noqa: BLE001 - a key transformers' rules cannot rename: left as it is
            continue
        if converted is None and new != k and new in state:
            out[k] = new
    return out


def is_safetensors_dir(ref: str) -> bool:
    """A model directory `peftc merge` / `peftc lower` can read without loading the model."""
    d = Path(ref)
    return d.is_dir() and (d / "config.json").is_file() and ((d / INDEX_NAME).is_file() or (d / SINGLE_NAME).is_file())


def _main_dtype(ck: Checkpoint) -> torch.dtype:
    """The float dtype that holds most of the checkpoint's bytes."""
    by = Counter()
    for h in ck.headers.values():
        for info in h.tensors.values():
            if info.dtype in DTYPES and DTYPES[info.dtype].is_floating_point:
                by[info.dtype] += info.nbytes
    return DTYPES[by.most_common(1)[0][0]] if by else torch.float32


def build_skeleton(directory: Path, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The model of a config.json built on the meta device: names, kinds, shapes, tied weights; no memory."""
    try:
        import transformers  # noqa: F401 - only whether it is installed
    except ImportError:
        raise PeftcError("`peftc merge` needs the 'transformers' package to read the model's structure") from None
    cfg_file = directory / "config.json"
    cls = model_class(cfg_file, config)
    try:
        cfg = cls.config_class.from_dict(config)
        with torch.device("meta"):
            model = cls._from_config(cfg, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftcError(f"{cfg_file}: cannot build the model from its config: {msg}") from None
    return model.eval()


def stand_in_weights(model: nn.Module) -> nn.Module:
    """Give a meta skeleton CPU parameters that take no memory (a zero expanded to each shape; tied parameters
    stay one object), so that planning can compute with them; what it computes from them is recomputed from
    the real weights at merge time (`merged_weight.realize_site`)."""
    new: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)
            mod._parameters[name] = new[id(p)]
    return model


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _untied_config(config: dict[str, Any]) -> dict[str, Any]:
    new = json.loads(json.dumps(config))
    new["tie_word_embeddings"] = False
    for sub in ("text_config", "decoder"):
        if isinstance(new.get(sub), dict) and "tie_word_embeddings" in new[sub]:
            new[sub]["tie_word_embeddings"] = False
    return new


def check_mergeable(plan: Plan, spec: Spec, command: str = "peftc merge") -> None:
    """Every active adapter must fold into the weights (no tracing): else one error at the adapter."""
    active = [n for n, ap in plan.adapters.items() if ap.active]
    if not active:
        raise PeftcError(f"{spec.file}: no active adapter: nothing to {command.split()[-1]}")
    for lname, sas in plan.sites.items():
        for sa in sas:
            if sa.active and not sa.program.mergeable:
                raise _err(
                    f"adapter '{sa.adapter}' cannot be merged into '{lname}' ({sa.method.name} with these options is "
                    f"not mergeable there{': ' + sa.program.unmergeable_why if sa.program.unmergeable_why else ''}): "
                    f"`{command}` folds every active adapter into the weights without tracing, "
                    "so it refuses this one; it needs to run unmerged in a traced graph (`peftc compile` / `peftc "
                    "export` without --merge), or leave it out of `active`", plan.adapters[sa.adapter].spec.span, spec)


def skeleton_plan(spec: Spec, model_dir: str | Path, *, seed: int = 0, lib: Library | None = None
                  ) -> tuple[Plan, Checkpoint, nn.Module, Callable[[str], torch.Tensor]]:
    """The plan of `spec` on the skeleton of a safetensors model directory, and read(fqn): one of its tensors."""
    d = Path(model_dir)
    ck = read_checkpoint(d)
    config = _json(d / "config.json")
    if not isinstance(config, dict):
        raise PeftcError(f"{d / 'config.json'}: expected a JSON object")
    with step("Building the model skeleton (meta device)"):
        skeleton = stand_in_weights(build_skeleton(d, config, _main_dtype(ck)))
        ck.use_model_names(skeleton)
    with step("Planning adapters"):
        plan = build_plan(spec, skeleton, seed=seed, lib=lib)
    source = {k: k for k in ck.where}
    for group in _tied_groups(skeleton):
        stored = [n for n in group if n in ck.where]
        source.update({n: stored[0] for n in group if stored and n not in ck.where})

    def read(fqn: str) -> torch.Tensor:
        if fqn not in source:
            raise PeftcError(f"{d}: the checkpoint has no tensor '{fqn}'; keys must be the model's parameter names")
        return ck.read(source[fqn])
    return plan, ck, skeleton, read


def merge_checkpoint(spec: Spec, model_dir: str | Path, out_dir: str | Path, *, seed: int = 0,
                     lib: Library | None = None) -> MergeResult:
    """Write `out_dir`: the model of `model_dir` with every active adapter of `spec` merged (see module doc)."""
    d, out = Path(model_dir), Path(out_dir)
    check_new_dir(out, d)
    plan, ck, skeleton, _ = skeleton_plan(spec, d, seed=seed, lib=lib)
    config = _json(d / "config.json")
    dtype = _main_dtype(ck)
    check_mergeable(plan, spec)

    # what changes: targeted weights (and biases an adapter transforms), copies of modules_to_save, saved bases
    targets: dict[str, tuple[str, str]] = {}     # fqn -> (layer, "weight" | "bias")
    for lname, sas in plan.sites.items():
        act = [sa for sa in sas if sa.active]
        if not act:
            continue
        layer = plan.layers[lname]
        targets[layer.weight] = (lname, "weight")
        if layer.bias and any(sa.program.bias is not None for sa in act):
            targets[layer.bias] = (lname, "bias")
    replace: dict[str, torch.Tensor] = {}
    for ap in plan.adapters.values():
        if ap.active and ap.source != "fresh":   # a fresh copy is the base module itself (here: its stand-in)
            for mod, params in ap.modules_to_save.items():
                replace.update({f"{mod}.{p}": t for p, t in params.items()})
    replace.update({f: t for f, t in plan.base_overrides.items() if f not in targets})
    # bias = "all" / "<method>_only": the trained biases replace the model's (a targeted layer folds its adapters
    # onto the trained one)
    trained: dict[str, torch.Tensor] = {fqn: t for ap in plan.adapters.values() if ap.active
                                        for fqn, (_, t) in ap.biases.items()}
    replace.update({f: t for f, t in trained.items() if f not in targets})
    changed = set(targets) | set(replace)

    # tied weights: a changed name gets a tensor of its own (each name of its group does), except where the
    # method makes the tied modules follow the adapted weight (peft's tied trainable tokens): the group stays tied
    follow: dict[str, str] = {}                  # a tied module's weight -> the adapted weight it follows
    for lname in {targets[f][0] for f in targets}:
        if all(sa.method.tied_follow for sa in plan.sites[lname] if sa.active):
            follow.update({f"{m}.weight": plan.layers[lname].weight
                           for m in tied_modules(skeleton, plan.layers[lname])})
    source = {k: k for k in ck.where}
    added: dict[str, str] = {}                   # new key -> the key whose shard, dtype and shape it takes
    untied: list[str] = []
    for group in _tied_groups(skeleton):
        if not changed & set(group):
            continue
        if all(n in follow and follow[n] in group and n not in changed or n in targets and n not in follow
               for n in group):
            for n in group:                      # the stored copy is written merged, whichever name it has
                if n in ck.where and n not in targets:
                    targets[n] = targets[follow[n]]
                    changed.add(n)
            continue
        stored = [n for n in group if n in ck.where]
        if not stored:
            raise PeftcError(f"{d}: the checkpoint has no tensor for any of {', '.join(group)}")
        for n in group:
            if n not in ck.where:
                added[n] = stored[0]
                source[n] = stored[0]
        untied += group
    for fqn in sorted(changed):
        if fqn not in source:
            raise PeftcError(f"{d}: the checkpoint has no tensor '{fqn}' (a weight the spec changes); `peftc merge` "
                             "needs the checkpoint's keys to be the model's parameter names")
    new_config = config
    if untied:
        new_config = _untied_config(config)
        check = build_skeleton(d, new_config, dtype)
        still = [g for g in _tied_groups(check) if set(g) & set(untied)]
        if still:
            raise PeftcError(f"{d}: the spec changes {', '.join(sorted(changed & set(still[0])))}, which this model "
                             f"ties to {', '.join(n for n in still[0] if n not in changed)} in its code (not through "
                             "tie_word_embeddings): merging it would change the other one too")

    shared = {name: ap.shared for name, ap in plan.adapters.items()}
    bias_cache: dict[str, torch.Tensor] = {}
    written: set[str] = set()

    def read(fqn: str) -> torch.Tensor:
        return ck.read(source[fqn])

    def merged(fqn: str) -> torch.Tensor:
        if fqn in replace:
            return replace[fqn]
        if fqn in bias_cache:
            return bias_cache.pop(fqn)
        lname, leaf = targets[fqn]
        layer = plan.layers[lname]
        w = plan.base_overrides.get(layer.weight)
        w = read(layer.weight) if w is None else w
        b = plan.base_overrides.get(layer.bias) if layer.bias else None
        b = read(layer.bias) if layer.bias and b is None else b
        b = trained.get(layer.bias, b) if layer.bias else b
        sites = [realize_site(sa, layer.kind, w, b, shared.get(sa.adapter, {}),
                              loaded=plan.adapters[sa.adapter].source != "fresh")
                 for sa in plan.sites[lname] if sa.active]
        w2, b2 = merged_layer(w, b, layer.kind, sites, shared, lname)
        if leaf == "bias":
            return b2
        if layer.bias in targets and b2 is not None and layer.bias not in written:
            bias_cache[layer.bias] = b2     # written later in this run: not folded twice
        return w2

    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    result = MergeResult(out, plan, len(ck.shards), sorted({targets[f][0] for f in targets}),
                         untied=sorted(set(untied)), dtype=str(dtype).replace("torch.", ""))
    try:
        shard_files = set(ck.shards) | {INDEX_NAME}
        for p in sorted(d.iterdir()):
            if not p.is_file() or p.name in shard_files:
                continue
            if p.name.endswith(WEIGHT_SUFFIXES):
                result.skipped.append(p.name)
                continue
            if p.name == "config.json":
                (tmp / p.name).write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(p, tmp / p.name)
            result.copied.append(p.name)
        sizes = 0
        for i, s in enumerate(ck.shards, 1):
            h = ck.headers[s]
            extra = [k for k, src in added.items() if ck.where[src] == s]
            model_name = {ck.stored(m): m for m in ck.file_key}     # file key -> the model's name (renamed keys)
            entries = [(k, info.dtype, info.shape) for k, info in h.tensors.items()]
            entries += [(k, h.tensors[ck.stored(added[k])].dtype, h.tensors[ck.stored(added[k])].shape)
                        for k in extra]
            with step(f"Merging shard {i}/{len(ck.shards)} ({s})"):
                writer = ShardWriter(tmp / s, entries, h.metadata)
                try:
                    for key, dt, shape in entries:    # written under the file's own keys
                        name = model_name.get(key, key)
                        if name in changed:
                            t = merged(name)
                            writer.write(key, t.to(DTYPES[dt]).reshape(shape))
                            written.add(name)
                        elif key in added:
                            writer.copy(key, h, ck.stored(added[key]))
                        else:
                            writer.copy(key, h)
                    writer.finish()
                finally:
                    writer.close()
                sizes += writer.size
        if ck.index is not None:
            index = json.loads(json.dumps(ck.index))
            index.setdefault("metadata", {})
            if isinstance(index["metadata"], dict):
                index["metadata"]["total_size"] = sizes
            index["weight_map"].update({k: ck.where[src] for k, src in added.items()})
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if out.is_dir():
            out.rmdir()           # checked empty above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def merge_model(spec: str | Path | Spec, model_dir: str | Path, output: str | Path, *, seed: int = 0) -> MergeResult:
    """Python API of `peftc merge`: write `output`, the Hugging Face model directory `model_dir` with every
    active adapter of `spec` (a .peft path, spec text or Spec) merged, one shard at a time (see module doc)."""
    from peftc.pipeline import check_spec, load_spec
    sp = load_spec(spec)
    check_spec(sp)
    return merge_checkpoint(sp, model_dir, output, seed=seed)
