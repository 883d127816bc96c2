"""bf16 autocast on CPU: hardware detection, the setting and its accuracy guard.

On CUDA the ``amp`` settings apply (:func:`tiahnm.runtime.device.amp_dtype`). On a
CPU, ``cpu_precision`` (``train.cpu_precision``, ``extract.cpu_precision``,
``tiahnm extract/predict --cpu-precision``) chooses:

- ``fp32`` (default): full precision, exactly the computation of earlier versions.
- ``bf16``: ``torch.autocast("cpu", bfloat16)``; matrix products and convolutions run
  in bf16 on AMX / AVX-512 bf16 units. On a CPU without them it is a
  :class:`~tiahnm.errors.ConfigError`: without those units there is no bf16 matrix
  hardware to gain from, so it is refused rather than run unmeasured.
- ``auto``: bf16 when the CPU has the units **and** the accuracy guard passes, else fp32
  (logged). The guard runs one probe (a bag through the head, or a batch through the
  encoder) in fp32 and in bf16 and keeps bf16 only when the mean cosine similarity of
  the output rows is at least :data:`MIN_COSINE`. The probes of a head
  (:mod:`tiahnm.training.precision`) and of an encoder
  (:class:`tiahnm.slides.extract.Extractor`) live with those.

Support is read from torch's CPU capability report (``torch.cpu.get_capabilities``:
the ``amx_bf16`` / ``avx512_bf16`` CPUID flags) and oneDNN's own bf16 check; it is never
assumed from the architecture name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tiahnm.errors import ConfigError

logger = logging.getLogger(__name__)

#: What a guard probe returns: one output, or several (each ``[rows, ...]``).
Outputs = torch.Tensor | tuple[torch.Tensor, ...]

#: Values of the ``cpu_precision`` settings.
CPU_PRECISIONS = ("fp32", "bf16", "auto")
#: Mean row cosine similarity (bf16 vs fp32) that ``auto`` requires.
MIN_COSINE = 0.999
#: CPUID flags (torch's names) of hardware bf16 matrix units, best first.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_support() -> str | None:
    """The CPU's bf16 matrix unit (``amx_bf16`` or ``avx512_bf16``), or None.

    Both torch's CPUID report and oneDNN (which runs the bf16 kernels) must agree.
    """
    try:
        caps = torch.cpu.get_capabilities()
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older or CPU-feature-less builds
        return None
    if not onednn:
        return None
    for flag in BF16_FLAGS:
        if caps.get(flag):
            return flag
    return None


def check_cpu_precision(value: str, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value`` is a known setting."""
    if value not in CPU_PRECISIONS:
        msg = f"{key}: {value!r} is not one of {', '.join(CPU_PRECISIONS)}."
        raise ConfigError(msg)


def requested_dtype(value: str, device: torch.device, key: str) -> torch.dtype | None:
    """The CPU autocast dtype ``value`` asks for on ``device``, before the guard.

    Returns None (full precision) for ``fp32``, for non-CPU devices, and for ``auto``
    on a CPU without bf16 units (logged).

    Raises:
        ConfigError: ``bf16`` on a CPU without bf16 units, or an unknown value.
    """
    check_cpu_precision(value, key)
    if device.type != "cpu" or value == "fp32":
        return None
    if cpu_bf16_support() is None:
        if value == "bf16":
            msg = (
                f"{key}: bf16 needs a CPU with AMX or AVX-512 bf16 units; this one "
                f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()}) "
                "has neither. Use fp32 or auto."
            )
            raise ConfigError(msg)
        logger.info("%s auto: fp32 (no AMX / AVX-512 bf16 on this CPU).", key)
        return None
    return torch.bfloat16


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (float64) of each row (first axis) of ``a`` and ``b``.

    Two all-zero rows (e.g. an instance the ReLU silences in both) agree: 1.
    """
    a2 = a.detach().double().reshape(a.shape[0] if a.dim() > 1 else 1, -1)
    b2 = b.detach().double().reshape(a2.shape)
    cos = torch.nn.functional.cosine_similarity(a2, b2, dim=1, eps=1e-12)
    both_zero = (a2 == 0).all(dim=1) & (b2 == 0).all(dim=1)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def row_cosine(a: Outputs, b: Outputs) -> float:
    """Mean row cosine similarity of ``a`` and ``b`` (tensors or tuples of them)."""
    pairs = zip(_as_tuple(a), _as_tuple(b), strict=True)
    return float(torch.cat([row_cosines(x, y) for x, y in pairs]).mean())


def _as_tuple(value: Outputs) -> tuple[torch.Tensor, ...]:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


@dataclass(frozen=True)
class Precision:
    """A resolved CPU precision.

    Attributes:
        dtype (torch.dtype | None): Autocast dtype (None: full precision).
        cosine (float | None): The guard's cosine (None when it did not run).
    """

    dtype: torch.dtype | None
    cosine: float | None = None

    @property
    def name(self) -> str:
        """``bf16`` or ``fp32``."""
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"


def resolve(
    value: str,
    device: torch.device,
    key: str,
    probe: Callable[[torch.dtype | None], Outputs] | None = None,
    min_cosine: float | None = None,
) -> Precision:
    """Resolve ``value`` on ``device``; for ``auto``, run the guard on ``probe``.

    Args:
        value (str): ``fp32``, ``bf16`` or ``auto``.
        device (torch.device): Where the computation runs.
        key (str): The setting's name, for messages.
        probe (Callable | None): ``probe(dtype)`` returns the output(s) ``[R, ...]``
            of the computation under autocast ``dtype`` (None: fp32); without it
            ``auto`` takes bf16 unguarded.
        min_cosine (float | None): Mean row cosine ``auto`` requires (default
            :data:`MIN_COSINE`).

    Returns:
        Precision: The dtype and, for ``auto``, the measured cosine.
    """
    dtype = requested_dtype(value, device, key)
    if dtype is None or value == "bf16" or probe is None:
        return Precision(dtype)
    with torch.random.fork_rng(devices=[]):
        ref = probe(None)
        low = probe(dtype)
    cosine = row_cosine(ref, low)
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    if not cosine >= min_cosine:
        logger.warning(
            "%s auto: fp32 (bf16 output cosine %.6f < %.4f on the probe).",
            key,
            cosine,
            min_cosine,
        )
        return Precision(None, cosine)
    logger.info("%s auto: bf16 (output cosine %.6f on the probe).", key, cosine)
    return Precision(dtype, cosine)


__all__ = [
    "BF16_FLAGS",
    "CPU_PRECISIONS",
    "MIN_COSINE",
    "Precision",
    "check_cpu_precision",
    "cpu_bf16_support",
    "requested_dtype",
    "resolve",
    "row_cosine",
    "row_cosines",
]
