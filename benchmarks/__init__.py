"""Benchmarks of the running service: EER (`benchmarks.eer`), throughput (`benchmarks.throughput`).

Importing the package pins numpy's OpenBLAS and OpenMP to one thread (unless already set) before
any benchmark imports numpy: their spinning threads fight ONNX Runtime for the cores.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
