"""Cluster profiles: what the cost model knows about devices and networks, loaded from profiles.json (data).

A profile gives one device's throughput and memory and two links: inside a node (NVLink/NVSwitch) and between nodes
(InfiniBand, Ethernet), each as the alpha-beta model's latency alpha (seconds per message step) and bandwidth
(bytes/s per device, one direction; beta = 1 / bandwidth) (Hockney 1994; Thakur et al. 2005).

The GPU profiles are datasheet figures; "cpu-gloo" is this machine, measured (`benchmark.py --calibrate` prints the
values to write into profiles.json).

Usage:
    cluster = load_profile("a100-80gb-selene")
    cluster.achievable_flops, cluster.intra.bandwidth, cluster.num_devices
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

PROFILES_PATH = Path(__file__).with_name("profiles.json")


@dataclass(frozen=True, kw_only=True)
class Link:
    """alpha: seconds per message step; bandwidth: bytes/s per device in one direction."""

    alpha: float
    bandwidth: float

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.bandwidth <= 0:
            raise ValueError(f"Link needs alpha >= 0 and bandwidth > 0, got alpha={self.alpha}, "
                             f"bandwidth={self.bandwidth}")


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    """num_nodes nodes of gpus_per_node devices; every device has the same throughput and memory."""

    name: str
    gpus_per_node: int
    num_nodes: int
    peak_flops: float
    achievable_fraction: float
    memory_bytes: float
    intra: Link
    inter: Link
    layer_overhead_s: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.num_nodes < 1:
            raise ValueError(f"ClusterProfile {self.name!r}: gpus_per_node ({self.gpus_per_node}) and num_nodes "
                             f"({self.num_nodes}) must be >= 1")
        if self.peak_flops <= 0 or not 0 < self.achievable_fraction <= 1 or self.memory_bytes <= 0:
            raise ValueError(f"ClusterProfile {self.name!r}: need peak_flops > 0, achievable_fraction in (0, 1] "
                             "and memory_bytes > 0")
        if self.layer_overhead_s < 0:
            raise ValueError(f"ClusterProfile {self.name!r}: layer_overhead_s must be >= 0")

    @property
    def achievable_flops(self) -> float:
        """FLOP/s one device reaches on the model's GEMMs."""
        return self.peak_flops * self.achievable_fraction

    @property
    def num_devices(self) -> int:
        return self.gpus_per_node * self.num_nodes

    def with_devices(self, num_devices: int) -> "ClusterProfile":
        """The same hardware cut to `num_devices` (whole nodes, or a part of one node)."""
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        if num_devices <= self.gpus_per_node:
            return dataclasses.replace(self, gpus_per_node=num_devices, num_nodes=1)
        if num_devices % self.gpus_per_node:
            raise ValueError(f"{num_devices} devices are not whole nodes of {self.gpus_per_node}")
        return dataclasses.replace(self, num_nodes=num_devices // self.gpus_per_node)


def profile_names() -> list[str]:
    """The profiles profiles.json defines."""
    return sorted(name for name in json.loads(PROFILES_PATH.read_text()) if not name.startswith("_"))


def load_profile(name: str, **overrides) -> ClusterProfile:
    """The profile `name` of profiles.json, with any field overridden (`load_profile("cpu-gloo", num_nodes=1)`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    data = json.loads(PROFILES_PATH.read_text())
    if name.startswith("_") or name not in data:
        raise ValueError(f"unknown cluster profile {name!r}; known: {profile_names()}")
    fields = {**data[name], **overrides}
    for link in ("intra", "inter"):  # a link given as a dict (from the file or an override) becomes a Link
        if isinstance(fields[link], dict):
            fields[link] = Link(**fields[link])
    return ClusterProfile(name=name, **fields)
