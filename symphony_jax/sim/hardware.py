"""Accelerators for the simulator's roofline cost model.

The figures in ``GPUS`` are data-sheet peaks (dense bfloat16 tensor-core FLOP/s, HBM bandwidth,
nominal link rates), not measurements: the cost model scales them by efficiency factors, and a
calibrated model (``cost_model.fit``) replaces them with what a device actually does.
"""

from __future__ import annotations

import dataclasses

from symphony_jax.config import _check_positive_floats, _fail


@dataclasses.dataclass(frozen=True)
class GPU:
    """One accelerator and the links of its node."""

    name: str
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bandwidth: float  # B/s
    memory_bytes: float  # HBM capacity, bytes
    pcie_bandwidth: float  # B/s per direction, host <-> device
    nic_bandwidth: float  # B/s of the node's network interface

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            _fail(self, "name", self.name, "a non-empty string")
        _check_positive_floats(self, "peak_flops", "hbm_bandwidth", "memory_bytes",
                               "pcie_bandwidth", "nic_bandwidth")


GPUS: dict[str, GPU] = {
    # SYMPHONY's cluster: 2 nodes x 4 A100-80GB, 100 Gbit/s Ethernet between the nodes.
    # PCIe 4.0 x16 is 32 GB/s nominal per direction; pinned-memory copies reach ~25 GB/s.
    "A100-80GB": GPU("A100-80GB", peak_flops=312e12, hbm_bandwidth=2.039e12, memory_bytes=80e9,
                     pcie_bandwidth=32e9, nic_bandwidth=12.5e9),
    # SXM5; PCIe 5.0 x16; a 400 Gbit/s NIC.
    "H100-80GB": GPU("H100-80GB", peak_flops=989e12, hbm_bandwidth=3.35e12, memory_bytes=80e9,
                     pcie_bandwidth=64e9, nic_bandwidth=50e9),
    # The H100's compute with HBM3e; PCIe 5.0 x16; a 400 Gbit/s NIC.
    "H200": GPU("H200", peak_flops=989e12, hbm_bandwidth=4.8e12, memory_bytes=141e9,
                pcie_bandwidth=64e9, nic_bandwidth=50e9),
}


def gpu(name: str) -> GPU:
    """The accelerator registered under ``name`` (see ``GPUS``)."""
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)}") from None
