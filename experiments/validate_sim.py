"""Validation: the simulator, calibrated on the real engine, against the real cluster.

For 1 and 2 nodes (fake CPU devices, the ``tiny`` model) and the systems ``recompute`` and
``symphony``: mean and p90 TTFT, TPOT and end-to-end latency of the real cluster (the mean of
``real_check.REPEATS`` timed runs, and their spread) and of the simulator on the same
closed-loop chat schedule, and the simulator's relative error (method:
``symphony_jax.figures.real_check``). Target: within 10% on mean TTFT and TPOT.

Usage: ``python experiments/validate_sim.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import datetime  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "bench"))
import _report  # noqa: E402  (experiments/bench)
from symphony_jax.figures import real_check  # noqa: E402
from symphony_jax.figures.common import table  # noqa: E402


def report(quick: bool) -> str:
    rows, notes = real_check.compare(quick, progress=True)
    requests = real_check.schedule_of(0, quick).num_rows
    return "\n".join([
        f"JAX {jax.__version__}, {_report.machine()}, {datetime.date.today()}; tiny model, "
        f"{requests} requests "
        f"({'quick' if quick else 'full'} scale)", "", *notes, "",
        table(rows, real_check.COLUMNS)])


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
