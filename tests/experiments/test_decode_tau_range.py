"""experiments/decode_tau_range.py: the needed-τ rule and the table (the model run is a CPU minute, not here)."""

from __future__ import annotations

import numpy as np

from experiments import decode_tau_range


def test_needed_tau_is_the_lowest_tau_before_the_first_error_over_the_ceiling():
  taus = np.asarray(decode_tau_range.TAUS)
  errors = np.zeros((len(taus), 3), np.float32)
  errors[:, 0] = np.where(taus < 0.9, 0.2, 0.01)             # fails below 0.9
  errors[:, 1] = 0.01                                        # never fails: the grid's lowest
  errors[:, 2] = np.where((taus < 0.99) & (taus > 0.5), 0.2, 0.0)   # passes again at 0.5: too late
  np.testing.assert_allclose(decode_tau_range.needed_tau(errors, 0.055), [0.9, min(taus), 0.99])
  errors[1, 0] = 0.1                                         # already over at 0.99: τ = 1 is needed
  assert decode_tau_range.needed_tau(errors, 0.055)[0] == 1.0


def test_table_reports_quartiles_and_the_heads_at_the_floor():
  taus = list(decode_tau_range.TAUS)
  row = {"layer": 3, "sparsity": np.linspace(0, 0.9, len(taus))[:, None].repeat(2, 1).tolist(),
         "needed_tau": {str(c): [0.1, 0.9] for c in decode_tau_range.CEILINGS}}
  result = {"device": "cpu", "length": 256, "block_size": 16, "decode_steps": 4, "tau_rule": "r", "tau_min": 0.5,
            "taus": taus, "ceilings": list(decode_tau_range.CEILINGS), "rows": [row]}
  table = decode_tau_range.render_markdown(result)
  assert "Over 2 heads of layers 3" in table
  assert "| 0.055 | 0.18 | 0.30 | 0.50 | 0.70 | 0.82 | 50% | 50% |" in table
  assert "| sparsity | 0.000 |" in table and "| 0.900 |" in table
