"""Model inputs in the method language: `input("input_ids")` is the compiled graph's input of that name.

A method may read a model input to compute something per row or per token (a mask from the token ids, say).
Such a value exists only in the graph: a `let` that reads an input is evaluated when the graph is built, never
at plan time, and an adapter whose method reads one cannot be merged (its update depends on the inputs; the
method's `mergeable` says so). `graph_funcs` binds `input` to the traced graph's placeholders, with a clear
error when the model has no input of that name.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from peftc.errors import PeftcError
from peftc.lang.expr import Call, Const, Expr

if TYPE_CHECKING:
    from torch import fx

INPUT = "input"           # the method language's function: input("name")
GRAPH_ONLY = {INPUT}      # functions with a value only while a graph is built


def _calls(e: Any) -> Iterable[Call]:
    if isinstance(e, Call):
        yield e
        for a in e.args:
            yield from _calls(a)
        for _, a in e.kwargs:
            yield from _calls(a)


def graph_only(expr: Expr | None) -> bool:
    """True when `expr` calls a function that has a value only in a graph (it reads a model input)."""
    return any(c.fn in GRAPH_ONLY for c in _calls(expr))


def inputs_read(exprs: Iterable[Expr | None]) -> list[str]:
    """The model inputs that some expressions read (`input("name")` with a constant name), in order."""
    out: dict[str, None] = {}
    for e in exprs:
        for c in _calls(e):
            if c.fn == INPUT and c.args and isinstance(c.args[0], Const):
                out[str(c.args[0].value)] = None
    return list(out)


def graph_funcs(gm: fx.GraphModule, where: str) -> dict[str, Callable[..., Any]]:
    """The graph-only functions for evaluating a method at one layer of `gm` (`where` names it in errors)."""
    def model_input(name: Any) -> fx.Node:
        if not isinstance(name, str):
            raise PeftcError(f"{where}: input(...) takes the name of a model input as a string, got {name!r}")
        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for n in places:
            if n.target == name or n.name == name:
                return n
        have = ", ".join(str(n.target) for n in places) or "none"
        raise PeftcError(f"{where}: the method reads the model input '{name}', but the model has no input of that "
                         f"name (its inputs: {have})")
    return {INPUT: model_input}


def program_inputs(prog: Any) -> list[str]:
    """The model inputs a method instantiated at one layer (a SiteProgram) reads."""
    return inputs_read([prog.weight, prog.bias, *(e for _, e in prog.lets)])


def check_whole_sequence(plan: Any, why: str) -> None:
    """An error when a live adapter reads a model input (`why`: the mode in which each call sees only part of
    the sequence, such as generation steps over a key/value cache)."""
    for lname, sas in plan.sites.items():
        for sa in sas:
            read = program_inputs(sa.program) if sa.active and not sa.merge else []
            rows = [n for n in read if n in sa.method.row_inputs]
            if rows:
                raise PeftcError(f"adapter '{sa.adapter}' ({sa.method.name} on '{lname}') reads the per-row input "
                                 f"'{rows[0]}', which a --with-past export cannot take (onnxruntime-genai feeds no "
                                 f"'{rows[0]}'); export it without --with-past")
            if read:
                raise PeftcError(f"adapter '{sa.adapter}' ({sa.method.name} on '{lname}') computes its update from "
                                 f"the model input '{read[0]}' over the whole sequence, but {why}; export it "
                                 "without --with-past")


def row_inputs_needed(plan: Any, have: Iterable[str]) -> list[str]:
    """The per-row inputs (a method's `row_input`) that live adapters read and the model does not take: the
    compiled graph takes them as extra inputs (int64, [batch])."""
    have = set(have)
    out: dict[str, None] = {}
    for sas in plan.sites.values():
        for sa in sas:
            if sa.active and not sa.merge:
                out.update(dict.fromkeys(n for n in program_inputs(sa.program)
                                         if n not in have and n in sa.method.row_inputs))
    return list(out)


def with_row_inputs(inputs: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The example inputs plus each per-row input (zeros: row i takes the first entry, e.g. task 0)."""
    import torch
    batch = next((t.shape[0] for t in inputs.values() if t.dim() >= 1), 1)
    return {**inputs, **{n: torch.zeros(batch, dtype=torch.int64) for n in names}}
