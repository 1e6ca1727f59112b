"""The device's dense peak, the denominator of model FLOP utilisation (MFU).

MFU is the achieved rate of the model's FLOPs (``FlopCounterMode``'s count divided by the time)
over the device's dense bf16 tensor-core peak from its vendor's datasheet. NVIDIA's datasheets
give the bf16 figure *with sparsity*; the dense peak is half of it. The CPU has no such figure
here: its MFU column stays empty unless ``--peak-tflops`` names one, and the measured matmul
rate (:mod:`.matmul_rate`) is the reference of the "% of matmul rate" column on every device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Peak:
    """A dense peak rate.

    Attributes:
        flops_per_s: the rate.
        source: where it comes from, in words.
    """

    flops_per_s: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvidia(model: str, sparse_tflops: float, form: str) -> tuple[float, str]:
    return (
        sparse_tflops / 2 * 1e12,
        f"NVIDIA {model} datasheet ({form}): {sparse_tflops:,.0f} TFLOP/s bf16 tensor core with "
        f"sparsity, {sparse_tflops / 2:,.1f} dense",
    )


#: Datasheet bf16 peaks by a part of ``torch.cuda.get_device_name``, most specific first.
DATASHEET_PEAKS: tuple[tuple[str, tuple[float, str]], ...] = (
    ("H200 NVL", _nvidia("H200", 1671, "NVL")),
    ("H200", _nvidia("H200", 1979, "SXM")),
    ("H100 NVL", _nvidia("H100", 1671, "NVL")),
    ("H100 PCIe", _nvidia("H100", 1513, "PCIe")),
    ("H100", _nvidia("H100", 1979, "SXM")),
    ("A100", _nvidia("A100", 624, "SXM and PCIe")),
)


def datasheet_peak(device_name: str) -> Peak | None:
    """The dense bf16 peak of a GPU named ``device_name`` (as CUDA names it), or None."""
    for part, (rate, source) in DATASHEET_PEAKS:
        if part.lower() in device_name.lower():
            return Peak(rate, source)
    return None


def device_peak(device: torch.device, peak_tflops: float | None) -> Peak | None:
    """``--peak-tflops`` when given, else the datasheet peak of a known GPU, else None."""
    if peak_tflops is not None:
        return Peak(peak_tflops * 1e12, f"--peak-tflops {peak_tflops:g}")
    if device.type == "cuda":
        return datasheet_peak(torch.cuda.get_device_name(device))
    return None
