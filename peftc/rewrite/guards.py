"""Predicates that rule `where` clauses may call, and the few functions of bound terms a rule's right side
may call (`spatial`). Each sees bound pattern terms (nodes or values). `GUARD_NAMES` lists them for the
library's load-time check."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from peftc.rewrite.graph_tools import TAG, static_val


def guards(gm: fx.GraphModule) -> dict[str, Callable[..., Any]]:
    def shape(v: Any) -> tuple[int, ...] | None:
        s = static_val(gm, v)
        return tuple(s.shape) if s is not None and hasattr(s, "shape") else None

    def scalar(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def column_of(g: Any, v: Any) -> bool:
        sg, sv = shape(g), shape(v)
        return sg is not None and sv is not None and len(sv) == 2 and sg == (sv[0], 1)

    def row_of(l_: Any, v: Any) -> bool:
        sl, sv = shape(l_), shape(v)
        return sl is not None and sv is not None and len(sv) == 2 and sl == (1, sv[1])

    def in_channels_of(l_: Any, v: Any) -> bool:
        sl, sv = shape(l_), shape(v)
        return sl is not None and sv is not None and len(sl) == len(sv) and sl[:2] == (1, sv[1]) \
            and all(d == 1 for d in sl[2:])

    def adapted(v: Any) -> bool:
        return isinstance(v, fx.Node) and TAG in v.meta

    def is_none(v: Any) -> bool:
        return v is None

    def swaps(p: Any) -> bool:
        return list(p) in ([1, 0], [-1, -2])

    def ungrouped(*rest: Any) -> bool:
        return not rest or rest[-1] == 1

    def matrix(v: Any) -> bool:
        s = shape(v)
        return s is not None and len(s) == 2

    def cols(v: Any) -> int:
        s = shape(v)
        if s is None:
            raise ValueError("cols(): the shape is not static")
        return s[-1]

    def spatial(v: Any) -> int:
        """The number of spatial dims of a conv kernel (out, in, *spatial)."""
        s = shape(v)
        if s is None and isinstance(v, fx.Node) and hasattr(v.meta.get("val"), "shape"):
            s = tuple(v.meta["val"].shape)
        if s is None:
            raise ValueError(f"spatial: the shape of {v} is unknown")
        return len(s) - 2

    return {"scalar": scalar, "column_of": column_of, "row_of": row_of, "adapted": adapted,
            "is_none": is_none, "in_channels_of": in_channels_of, "ungrouped": ungrouped, "swaps": swaps,
            "spatial": spatial, "matrix": matrix, "cols": cols}


GUARD_NAMES: frozenset[str] = frozenset(guards(None))  # type: ignore[arg-type]  # the closures only read gm when called
