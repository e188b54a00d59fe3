"""The method library: every method and rule declared in passes/*.peft, loaded once."""
from __future__ import annotations

from functools import cache
from typing import Any

from peftc.errors import PeftcError, did_you_mean
from peftc.lang.methods import MethodDef, load_methods
from peftc.lang.rules import Rule, build_rule, ordered
from peftc.resources import data_dir


class Library:
    def __init__(self, methods: dict[str, MethodDef], rules: list[Rule]) -> None:
        self.methods = methods
        self.rules = ordered(rules)   # in the order the factor pass tries them
        self._checked = False

    def checked(self) -> Library:
        """The library after its load-time checks (ops, arity, bound names, guards: peftc.lang.check), run once.
        Compiling needs them; reading declarations (`peftc import`, saving a config) does not, nor torch."""
        if not self._checked:
            from peftc.lang.check import check_library
            check_library(self.methods.values(), self.rules)
            self._checked = True
        return self

    def method(self, name: str) -> MethodDef:
        if name not in self.methods:
            raise PeftcError(f"unknown method '{name}'{did_you_mean(name, self.methods)}; "
                             f"known: {', '.join(sorted(self.methods))}")
        return self.methods[name]

    def method_for_config(self, config: dict[str, Any]) -> MethodDef | None:
        """The method whose peft_type and fixed config entries match a PEFT adapter_config.json."""
        peft_type = str(config.get("peft_type", "")).upper()
        for m in self.methods.values():
            if m.peft_type != peft_type:
                continue
            if all(bool(config.get(k) or False) == bool(v) if isinstance(v, bool) else config.get(k) == v
                   for k, v in m.fixed_config.items()):
                return m
        return None

    def peft_types(self) -> list[str]:
        return sorted({m.peft_type for m in self.methods.values() if m.peft_type})


@cache
def library() -> Library:
    methods, rule_trees = load_methods(list(data_dir("passes").glob("*.peft")))
    rules = [build_rule(t, f, i) for i, (t, f) in enumerate(rule_trees)]
    return Library(methods, rules)
