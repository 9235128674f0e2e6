"""benchmarks.hlo_ops: the entry operations of a compiled program, bookkeeping left out."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from benchmarks import hlo_ops

_HLO = """HloModule jit_f, entry_computation_layout={(f32[4,8]{1,0})->(f32[4,8]{1,0}, s32[4,8]{1,0})}

%fused_add (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %add.0 = f32[4,8]{1,0} add(f32[4,8]{1,0} %param_0, f32[4,8]{1,0} %param_0)
}

ENTRY %main.9 (x.1: f32[4,8]) -> (f32[4,8], s32[4,8]) {
  %x.1 = f32[4,8]{1,0} parameter(0)
  %constant.2 = s32[] constant(0)
  %sort.3 = (f32[4,8]{1,0}, s32[4,8]{1,0}) sort(f32[4,8]{1,0} %x.1, s32[4,8]{1,0} %iota), dimensions={1}
  %get-tuple-element.4 = f32[4,8]{1,0} get-tuple-element((f32[4,8]{1,0}, s32[4,8]{1,0}) %sort.3), index=0
  %fusion.5 = f32[4,8]{1,0} fusion(f32[4,8]{1,0} %get-tuple-element.4), kind=kLoop, calls=%fused_add
  %custom-call.6 = f32[4,8]{1,0} custom-call(f32[4,8]{1,0} %fusion.5), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %tuple.7 = (f32[4,8]{1,0}, s32[4,8]{1,0}) tuple(f32[4,8]{1,0} %custom-call.6, s32[4,8]{1,0} %iota)
}
"""


def test_entry_ops_reads_the_entry_computation_only():
  assert hlo_ops.entry_ops(_HLO) == ["parameter", "constant", "sort", "get-tuple-element", "fusion", "custom-call",
                                     "tuple"]   # not the fused computation's parameter and add


def test_entry_ops_names_what_is_missing():
  with pytest.raises(ValueError, match="no ENTRY computation"):
    hlo_ops.entry_ops("HloModule m\n")


def test_count_ops_leaves_bookkeeping_out():
  x = jnp.arange(32.0).reshape(4, 8)
  assert hlo_ops.count_ops(lambda x: x, x)["kinds"].get("parameter") is None
  counted = hlo_ops.count_ops(lambda x: jnp.sort(x) * 2.0 + 1.0, x)
  assert counted["kinds"]["sort"] == 1 and counted["ops"] == sum(counted["kinds"].values()) >= 1
