"""The methods a run can name (``method.name``): one entry each, read by every part that
needs to know about a method.

An entry says where the method's step is (``"module:function"``, the form of a Python entry
point, imported when a run uses it), how reports call it, whether it keeps a small-loss
share (and so takes a forget rate), what its per-sample loss is called in error messages,
and which ``method.*`` keys it reads. Config validation, the trainer, the step, the reports
and the tests derive from here, so adding a method is one module in ``methods/`` and one
entry below.

Methods outside the package register the same way, through the entry-point group
``jocor_ddp.methods`` of an installed distribution (``NAME = some.module:ENTRY``, ENTRY a
``Method``); docs/architecture.md shows how.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Callable

ENTRY_POINT_GROUP = "jocor_ddp.methods"


class RegistryError(RuntimeError):
    """An installed plugin's entry point does not give a Method of its name."""


@dataclass(frozen=True)
class Method:
    name: str        # the value of method.name
    display: str     # how tables and plots call it
    step: str        # "module:function": step(logits1, logits2, labels, values, selector, cfg) -> MethodStep
    selects: bool    # keeps a small-loss share of each batch, so it takes a forget rate
    loss_name: str   # its per-sample loss, in error messages ("non-finite joint loss ...")
    uses: tuple[str, ...] = ()  # the method.* keys it reads besides the forget rate's

    def load_step(self) -> Callable:
        module, _, function = self.step.partition(":")
        return getattr(importlib.import_module(module), function)


BUILTIN = (
    Method("jocor", "JoCoR", "jocor_ddp.methods.jocor:step", selects=True, loss_name="joint loss",
           uses=("co_lambda",)),
    Method("coteaching", "Co-teaching", "jocor_ddp.methods.coteaching:step", selects=True, loss_name="loss"),
    Method("coteaching_plus", "Co-teaching+", "jocor_ddp.methods.coteaching_plus:step", selects=True,
           loss_name="loss", uses=("init_epoch",)),
    Method("decoupling", "Decoupling", "jocor_ddp.methods.decoupling:step", selects=False, loss_name="loss"),
    Method("standard", "Standard", "jocor_ddp.methods.standard:step", selects=False, loss_name="loss"),
    Method("fcorrection", "F-correction", "jocor_ddp.methods.fcorrection:step", selects=False,
           loss_name="forward-corrected loss", uses=("transition",)),
)


@lru_cache(maxsize=1)
def methods() -> dict[str, Method]:
    """Every method by name: the built-in ones, then those of installed plugins."""
    found = {m.name: m for m in BUILTIN}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            method = ep.load()
        except Exception as exc:  # a plugin that does not import: say which, not a traceback
            raise RegistryError(f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP}): cannot be "
                                f"loaded: {type(exc).__name__}: {exc}") from None
        if not isinstance(method, Method) or method.name != ep.name:
            raise RegistryError(f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP}): expected a "
                            f"jocor_ddp.registry.Method named {ep.name!r}")
        found.setdefault(method.name, method)
    return found


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def display_name(name: str) -> str:
    """How tables and plots call method ``name`` (the name itself where no entry has it)."""
    entry = methods().get(name)
    return entry.display if entry else name


def get_method(name: str) -> Method:
    try:
        return methods()[name]
    except KeyError:
        raise KeyError(f"method.name: {name!r} is not one of {', '.join(map(repr, methods()))}") from None
