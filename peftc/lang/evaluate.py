"""Evaluates an Expr. One evaluator serves three uses:

* plain Python values (option arithmetic, shapes, conditions),
* eager tensors (parameter initialisation, e.g. DoRA's magnitude = row_norm(W + s*B@A)),
* graph emission (a Backend turns each tensor op into an fx node).

Whenever any argument of an op is a tensor or an fx node the op goes to the backend; otherwise it is
computed in Python.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import fx

from peftc.lang.expr import Call, Const, Expr, Name, Rest
from peftc.ops import INITS, SCALAR_FUNCS, TENSOR_OPS, Op

aten = torch.ops.aten


class EvalError(Exception):
    def __init__(self, message: str, expr: Expr | None = None) -> None:
        super().__init__(message)
        self.expr = expr


class Backend(Protocol):
    def apply(self, op: Op, target: Any, args: list[Any]) -> Any: ...


class Eager:
    """Runs tensor ops right away."""

    def apply(self, op: Op, target: Any, args: list[Any]) -> Any:
        return target(*args)


EAGER = Eager()


def is_tensor(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, fx.Node))


def _apply(backend: Backend, op: Op, args: list[Any]) -> Any:
    """Apply a tensor op, with the argument order ATen wants for scalar/tensor mixes (the tensor first)."""
    if len(args) == 2 and not is_tensor(args[0]) and is_tensor(args[1]):
        scalar, tensor = args
        if op.commutative:
            return backend.apply(op, op.target, [tensor, scalar])
        if op.name == "sub":
            return backend.apply(op, aten.rsub.Scalar, [tensor, scalar])
        if op.name == "div":  # c / t = reciprocal(t) * c
            recip = backend.apply(op, aten.reciprocal.default, [tensor])
            return backend.apply(TENSOR_OPS["mul"], aten.mul.Tensor, [recip, scalar])
    return backend.apply(op, op.target, args)


def evaluate(expr: Expr, env: Mapping[str, Any], backend: Backend = EAGER,
             funcs: Mapping[str, Callable[..., Any]] | None = None) -> Any:
    """Evaluate `expr` with names from `env`; `funcs` adds Python predicates/functions by name."""
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Name):
        if expr.id not in env:
            raise EvalError(f"unknown name '{expr.id}'", expr)
        return env[expr.id]
    if isinstance(expr, Rest):
        raise EvalError("'...' may only stand as the last argument of a call", expr)
    assert isinstance(expr, Call)
    fn = expr.fn

    def ev(e: Expr) -> Any:
        return evaluate(e, env, backend, funcs)

    if fn == "cond":
        return ev(expr.args[1]) if ev(expr.args[0]) else ev(expr.args[2])
    if fn == "tuple":
        return tuple(ev(a) for a in expr.args)
    if fn == "and":
        return bool(ev(expr.args[0])) and bool(ev(expr.args[1]))
    if fn == "or":
        return bool(ev(expr.args[0])) or bool(ev(expr.args[1]))
    args: list[Any] = []
    for a in expr.args:
        if isinstance(a, Rest):
            args.extend(env.get("...", []))
        else:
            args.append(ev(a))
    kwargs = {k: ev(v) for k, v in expr.kwargs}
    if fn in INITS:
        return INITS[fn](**kwargs)
    if funcs and fn in funcs:
        return funcs[fn](*args, **kwargs)
    # None behaves as "absent": absent + x = x, absent * x = absent (e.g. a missing bias).
    if fn == "add" and len(args) == 2 and (args[0] is None or args[1] is None):
        return args[1] if args[0] is None else args[0]
    if fn in ("mul", "div") and len(args) == 2 and args[0] is None:
        return None
    if any(is_tensor(a) for a in args) or (fn in TENSOR_OPS and fn not in SCALAR_FUNCS):
        if fn not in TENSOR_OPS:
            raise EvalError(f"unknown tensor op '{fn}'", expr)
        return _apply(backend, TENSOR_OPS[fn], args)
    if fn not in SCALAR_FUNCS:
        raise EvalError(f"unknown function '{fn}'", expr)
    try:
        return SCALAR_FUNCS[fn](*args, **kwargs)
    except (TypeError, ValueError, ZeroDivisionError, IndexError, OverflowError) as e:
        raise EvalError(f"{fn}: {e}", expr) from None
