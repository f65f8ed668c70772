"""What a cluster run produced, real or simulated: the tables of ``symphony_jax.metrics``."""

from __future__ import annotations

import dataclasses

import numpy as np

from symphony_jax import metrics


@dataclasses.dataclass(frozen=True)
class ClusterRecords:
    """Per-request, per-token (real runs), per-step and per-migration tables, and each
    request's generated tokens (real runs)."""

    requests: metrics.RequestRecords
    tokens: metrics.TokenRecords | None
    steps: metrics.StepRecords
    transfers: metrics.TransferRecords
    output_ids: tuple[tuple[int, ...], ...] = ()  # generated tokens of each row of ``requests``

    def summary(self, slo: metrics.SLO | None = None, bin_s: float = 1.0) -> dict[str, float]:
        return metrics.summarize(self.requests, tokens=self.tokens, steps=self.steps,
                                 transfers=self.transfers, slo=slo, bin_s=bin_s)


def step_records(samples) -> metrics.StepRecords:
    """From (time, node, load, device bytes, host bytes) samples."""
    steps = np.asarray(samples, np.float64).reshape(-1, 5)
    return metrics.StepRecords(time_s=steps[:, 0], node=steps[:, 1], load=steps[:, 2],
                               device_bytes=steps[:, 3], host_bytes=steps[:, 4])


def transfer_records(moves) -> metrics.TransferRecords:
    """From migrations (each with ``session_id, request_id, src, dst, nbytes, start_s,
    end_s``)."""
    return metrics.TransferRecords(
        session_id=[m.session_id for m in moves], request_id=[m.request_id for m in moves],
        src_node=[m.src for m in moves], dst_node=[m.dst for m in moves],
        bytes=[m.nbytes for m in moves], start_s=[m.start_s for m in moves],
        end_s=[m.end_s for m in moves])
