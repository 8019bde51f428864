"""Test-suite settings: one intra-op thread per pytest worker.

`make test` runs two xdist workers on two cores; with torch's default of one thread per core each,
OpenMP threads oversubscribe the cores and tiny matmuls stall for milliseconds.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
