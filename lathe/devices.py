"""GPUs ``lathe estimate`` and ``lathe plan`` can size a job for: memory, peak FLOPs, links.

Peak bf16 dense FLOP/s come from the datasheet table that MFU uses (``lathe.metrics``), read
through ``_peak_table`` only. Memory and bandwidths are added here, from NVIDIA's datasheets:

- memory: the datasheet capacity. HBM and GDDR capacities are binary, so "80GB" is 80 GiB;
  ``torch.cuda.get_device_properties().total_memory`` reports 0.5-2% less (driver reservations;
  more with ECC on GDDR cards), which ``USABLE_FRACTION`` covers.
- intra-node: GB/s per GPU per direction to the other GPUs of its node: NVLink for SXM parts (half
  the datasheet's bidirectional total: H100/H200 900 GB/s -> 450, A100 600 -> 300, B200 1.8 TB/s
  -> 900), else PCIe x16 per direction (Gen4 32 GB/s, Gen5 64 GB/s; an H100 NVL / H200 NVL pair
  bridge is not assumed).
- inter-node: GB/s per GPU per direction across nodes, for the network such systems ship with:
  one 400 Gb/s NDR InfiniBand/RoCE NIC per GPU for Hopper/Blackwell HGX (DGX H100/H200/B200 user
  guides), one 200 Gb/s HDR NIC per GPU for A100 HGX (DGX A100), and 100 Gb/s per node shared by
  its GPUs for PCIe servers (12.5 GB/s / 8 GPUs, about 1.5 GB/s each; set --inter-node-bw for yours).

``lathe plan --intra-node-bw / --inter-node-bw`` override the links; ``--device-memory`` the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lathe.errors import ConfigError

GIB = 2**30
USABLE_FRACTION = 0.97  # of the datasheet capacity: what torch reports, minus a little


def _peak_table() -> dict[str, float]:
    """Datasheet bf16 dense peak FLOP/s by GPU name: the table MFU uses (one place for it)."""
    from lathe.metrics import PEAK_BF16_DENSE_FLOPS

    return PEAK_BF16_DENSE_FLOPS


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_flops: float | None  # bf16 dense FLOP/s; None when unknown (a device given by its memory only)
    intra_node_gbps: float  # GB/s per GPU per direction inside a node
    inter_node_gbps: float  # GB/s per GPU per direction between nodes

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * USABLE_FRACTION)


# name -> (key of the peak-FLOPs table, memory GiB, intra-node GB/s, inter-node GB/s), per GPU
_SPECS: dict[str, tuple[str, float, float, float]] = {
    "A100 40GB": ("A100", 40, 300, 25),  # SXM4: NVLink 3, 600 GB/s total; HDR 200 Gb/s per GPU
    "A100 80GB": ("A100", 80, 300, 25),
    "A100 PCIe 80GB": ("A100", 80, 32, 1.5),  # PCIe Gen4 x16
    "A40": ("A40", 48, 32, 1.5),
    "RTX A6000": ("RTX A6000", 48, 32, 1.5),
    "L40": ("L40", 48, 32, 1.5),  # PCIe Gen4 x16, no NVLink
    "L40S": ("L40S", 48, 32, 1.5),
    "H100 SXM": ("H100 SXM", 80, 450, 50),  # NVLink 4, 900 GB/s total; NDR 400 Gb/s per GPU
    "H100 PCIe": ("H100 PCIe", 80, 64, 1.5),  # PCIe Gen5 x16
    "H100 NVL": ("H100 NVL", 94, 64, 1.5),
    "H200": ("H200", 141, 450, 50),  # H200 SXM: 141 GB HBM3e, NVLink 4
    "H200 NVL": ("H200 NVL", 141, 64, 1.5),
    "GH200": ("GH200", 96, 450, 50),  # the 96 GB HBM3 version
    "B200": ("B200", 180, 900, 50),  # HGX B200: NVLink 5, 1.8 TB/s total; 400 Gb/s per GPU
}
ALIASES = {"a100": "A100 80GB", "h100": "H100 SXM", "h200 sxm": "H200", "h100 80gb hbm3": "H100 SXM"}


def device_names() -> list[str]:
    return list(_SPECS)


def get_device(name: str, option: str = "--device") -> Device:
    """The table entry for ``name`` (case-insensitive; A100 and H100 mean the SXM 80 GB parts)."""
    key = ALIASES.get(name.lower(), name)
    for known, (peak_key, memory, intra, inter) in _SPECS.items():
        if known.lower() == key.lower():
            return Device(known, memory, _peak_table()[peak_key], intra, inter)
    raise ConfigError(option, "unknown GPU", f"choose one of: {', '.join(_SPECS)}; or describe it with "
                      "--device-memory GiB (and --peak-tflops for lathe plan)", name)


def resolve_device(name: str | None, memory_gib: float | None = None, peak_tflops: float | None = None,
                   intra_node_gbps: float | None = None, inter_node_gbps: float | None = None) -> Device | None:
    """The device the flags describe: a table entry, with any of its numbers overridden, or one
    given by its numbers alone. None when no flag describes a device."""
    if name is None and memory_gib is None and peak_tflops is None:
        return None
    for option, value in (("--device-memory", memory_gib), ("--peak-tflops", peak_tflops),
                          ("--intra-node-bw", intra_node_gbps), ("--inter-node-bw", inter_node_gbps)):
        if value is not None and value <= 0:
            raise ConfigError(option, "must be a positive number", "e.g. --device-memory 80", value)
    dev = get_device(name) if name is not None else Device("custom", 0, None, 32, 1.5)
    if memory_gib is None and name is None:
        raise ConfigError("--device-memory", "needed when --device is not given", "e.g. --device-memory 80", None)
    return replace(dev, memory_gib=memory_gib if memory_gib is not None else dev.memory_gib,
                   peak_flops=peak_tflops * 1e12 if peak_tflops is not None else dev.peak_flops,
                   intra_node_gbps=intra_node_gbps or dev.intra_node_gbps,
                   inter_node_gbps=inter_node_gbps or dev.inter_node_gbps)
