"""The registry of tunable attention methods: name → class, resolved lazily.

Tuned checkpoints store a method's name and options; `get_method(name, options)` rebuilds it. Adding a
method is one line in `METHODS` ("module:Class"), or `register_method` at run time.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from afbs_jax.attention.method import AttentionMethod

METHODS: dict[str, Any] = {
    "sparge": "afbs_jax.attention.sparge:SpargeMethod",
    "decode": "afbs_jax.attention.decode:DecodeMethod",
}


def register_method(name: str, method_class: type[AttentionMethod] | str) -> None:
  """Registers `method_class` (a class or "module:Class") under `name` (its `name` attribute)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"a method name must be a non-empty string; got {name!r}")
  METHODS[name] = method_class


def method_class(name: str) -> type[AttentionMethod]:
  """The class registered under `name`."""
  if name not in METHODS:
    raise ValueError(f"unknown attention method {name!r}; registered: {', '.join(sorted(METHODS))}")
  entry = METHODS[name]
  if isinstance(entry, str):
    module_name, class_name = entry.split(":")
    entry = getattr(importlib.import_module(module_name), class_name)
  if not (isinstance(entry, type) and issubclass(entry, AttentionMethod)) or entry.name != name:
    raise ValueError(f"method {name!r} must be registered as an AttentionMethod subclass with name={name!r}; "
                     f"got {entry!r}")
  return entry


def get_method(name: str, options: Mapping[str, Any] | None = None) -> AttentionMethod:
  """The method `name` built from its stored `options` (see `AttentionMethod.options`)."""
  return method_class(name).from_options(dict(options or {}))
