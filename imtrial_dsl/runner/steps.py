"""The step registry: every pipeline step is a plain function with declared inputs and outputs.

The local runner calls the function directly; ``imtrial step NAME`` calls it from
the command line; the CWL exporter turns each spec into a CommandLineTool that
runs ``imtrial step NAME``. So all three run the very same code.

Convention: a step function is ``func(trial: Trial, **params) -> dict``. ``params``
are the declared inputs and outputs by name: paths (``file``/``directory``) or
plain values (``string``/``int``/``bool``). Output paths are created by the step.
The returned dict is a JSON-serializable summary (also printed by the CLI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

Kind = Literal["file", "directory", "string", "int", "bool"]


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    doc: str = ""
    optional: bool = False


@dataclass(frozen=True)
class StepSpec:
    name: str
    func: Callable
    inputs: tuple[Param, ...]
    outputs: tuple[Param, ...]
    doc: str = ""
    needs_secrets: tuple[str, ...] = field(default=())  # env var names read (key material), never written out


STEPS: dict[str, StepSpec] = {}


def step(name: str, inputs: list[Param], outputs: list[Param], needs_secrets: tuple[str, ...] = ()):
    """Register a pipeline step (decorator)."""

    def deco(func: Callable) -> Callable:
        STEPS[name] = StepSpec(name, func, tuple(inputs), tuple(outputs), (func.__doc__ or "").strip(), needs_secrets)
        return func

    return deco


def load_all() -> dict[str, StepSpec]:
    """Import every built-in step module so the registry is complete."""
    import importlib
    import pkgutil

    from imtrial_dsl import runner

    for mod in pkgutil.iter_modules(runner.__path__):
        if mod.name not in ("steps",):
            importlib.import_module(f"imtrial_dsl.runner.{mod.name}")
    importlib.import_module("imtrial_dsl.transfer.send")  # the transfer step lives in its own package
    return STEPS
