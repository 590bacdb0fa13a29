"""What a candidate costs on the hardware, and whether it fits the budgets.

* :mod:`nas.hardware.measure`: MACs, parameters and peak memory, without a runtime;
* :mod:`nas.hardware.runtimes`: the latency runtimes (:data:`RUNTIMES`), and the one place
  that makes ONNX Runtime sessions and times runs;
* :mod:`nas.hardware.latency_table`: per-piece latencies cached per machine, to predict a
  candidate's latency (noisy pieces and pieces measured under load are not stored; a
  prediction a measurement disagrees with has its pieces re-measured);
* :mod:`nas.hardware.budgets`: the budgets (:data:`BUDGETS`), checked cheapest first;
* :mod:`nas.hardware.profile`: ``nas space show`` and ``nas profile`` reports (imported
  from there: it needs the search spaces).

Dependencies point one way: measure <- runtimes <- latency_table <- budgets; the config is
imported for type hints only (it imports :mod:`nas.hardware.runtimes` to check names).
"""

from __future__ import annotations

from nas.hardware.budgets import BUDGETS, Budget, BudgetReport, Measurement, check_budgets, make_budgets
from nas.hardware.latency_table import LatencyTable
from nas.hardware.measure import count_mflops, count_params_m, measure_peak_memory_mb
from nas.hardware.runtimes import RUNTIMES, Runtime, measure_latency, measure_latency_of_input

__all__ = [
    "Budget",
    "BUDGETS",
    "BudgetReport",
    "Measurement",
    "make_budgets",
    "check_budgets",
    "count_mflops",
    "count_params_m",
    "measure_peak_memory_mb",
    "measure_latency",
    "measure_latency_of_input",
    "LatencyTable",
    "Runtime",
    "RUNTIMES",
]
