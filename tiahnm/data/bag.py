"""The :class:`Bag` record and the :class:`BagSource` protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


@dataclass
class Bag:
    """One slide (or image, or classic MIL bag) with its instances.

    Attributes:
        slide_id (str): Unique identifier.
        label (int): Bag label (class index).
        features (torch.Tensor): ``[N, D]`` float32 instance features.
        coords (np.ndarray | None): ``[N, 2]`` patch coordinates (x, y), if any.
        instance_labels (np.ndarray | None): ``[N]`` ground truth for evaluation only;
            training code never reads it.
        origin (str): ``"real"`` or ``"generated"`` (bags made by a miner).
        split (str | None): ``"train"``, ``"val"`` or ``"test"`` when the source fixes
            the split.
        source (str): File the bag came from, for error messages.
        meta (dict): Source-specific extras.
        patient_id (str | None): Patient (case) the slide belongs to, if known;
            cross-validation keeps a patient's bags in one part of every fold.
        time (float | None): Follow-up time (survival tasks).
        event (int | None): 1 if the event was observed at ``time``, 0 if censored.
        target (float | None): Continuous target (regression tasks).
    """

    slide_id: str
    label: int
    features: torch.Tensor
    coords: np.ndarray | None = None
    instance_labels: np.ndarray | None = None
    origin: Literal["real", "generated"] = "real"
    split: str | None = None
    source: str = ""
    meta: dict[str, object] = field(default_factory=dict)
    patient_id: str | None = None
    time: float | None = None
    event: int | None = None
    target: float | None = None

    @property
    def n_instances(self) -> int:
        """Number of instances ``N``."""
        return int(self.features.shape[0])


@runtime_checkable
class BagSource(Protocol):
    """A dataset reader registered through ``tiahnm_register_bag_sources``."""

    def load(self) -> list[Bag]:
        """Read every bag. Errors name the file and the row or key at fault."""
        ...
