"""How many operations a jitted call runs, read from its compiled program: a launch estimate.

A decode step's attention is small enough that the number of kernels it launches, not their work, can
set its time: each costs a few microseconds to launch on a GPU however little it does. XLA's compiled
program (`jax.jit(fn).lower(*args).compile().as_text()`, the optimised HLO) lists the top-level operations
of its entry computation: fusions, sorts, custom calls (a Pallas kernel is one) and so on, each a kernel
launch on a GPU, unless XLA captures several into one CUDA graph (a command buffer shows up as one `call`
here, so it is counted once). Parameters, constants, tuples and bitcasts are bookkeeping, not kernels,
and are left out. Counts differ by backend (XLA fuses differently on CPU and GPU), so a benchmark records
them beside its timings on the machine that ran them.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Callable

import jax

FREE_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                      "opt-barrier", "partition-id", "replica-id"})
"""Entry operations that launch nothing."""

_OPCODE = re.compile(r"=\s.*?\s([a-z][\w\-]*)\(")   # "name = <type> opcode(" (a tuple type has no "word(")


def entry_ops(hlo_text: str) -> list[str]:
  """The opcodes of the ENTRY computation of an HLO module's text, in order.

  Raises:
    ValueError: the text holds no ENTRY computation.
  """
  lines = hlo_text.splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith("ENTRY")), None)
  if start is None:
    raise ValueError("no ENTRY computation in this HLO text; pass `compiled.as_text()` of a jitted call")
  ops = []
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    match = _OPCODE.search(line)
    if match:
      ops.append(match.group(1))
  return ops


def count_ops(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
  """{"ops": the entry operations of `jax.jit(fn)`'s compiled program at `args` that launch work,
  "kinds": {opcode: count} of those} (`fn` may already be jitted; compiled here, not run)."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  kinds = collections.Counter(op for op in entry_ops(jitted.lower(*args).compile().as_text())
                              if op not in FREE_OPS)
  return {"ops": sum(kinds.values()), "kinds": dict(sorted(kinds.items()))}
