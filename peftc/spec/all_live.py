"""The spec a compile mode that needs every adapter live compiles (`--adapter-ids`, `--adapters-as-inputs`):
every declared adapter live (the `active` line does not apply: the choice is made at run time); merged
adapters, an empty spec and exact combinations (one adapter per term) are refused, the mode's flag and reason
named."""
from __future__ import annotations

import dataclasses

from peftc.errors import PeftcError
from peftc.spec.model import Spec


def all_adapters_live(sp: Spec, merge: bool, *, flag: str, merged_why: str, terms_why: str) -> Spec:
    """`sp` with every adapter live. `flag`: the option named in errors; `merged_why`: why a merged adapter (or
    --merge) cannot be (after "but "); `terms_why`: what to do about an exact combination (after "runs as one
    adapter per term")."""
    merged = [a for a in sp.adapters.values() if a.merge]
    if merge or merged:
        where = f"adapter '{merged[0].name}' is declared with `merge`" if merged else "--merge folds every adapter"
        raise PeftcError(f"{flag}: {where}, but {merged_why}")
    if not sp.adapters:
        raise PeftcError(f"{flag}: the spec declares no adapter")
    terms = [a for a in sp.adapters.values() if a.delta_scale is not None]
    if terms:
        comb = terms[0].extra_config["__combination"][0]
        raise PeftcError(f"{flag}: combination '{comb}' (type exact) runs as one adapter per term{terms_why}")
    return dataclasses.replace(sp, active=None)
