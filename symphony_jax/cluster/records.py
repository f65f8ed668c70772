"""What a cluster run produced, real or simulated: the tables of ``symphony_jax.metrics``."""

from __future__ import annotations

import dataclasses

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
