"""Any tiahnm encoder as a TIAToolbox ``ModelABC``, for TIAToolbox's own engines.

``DeepFeatureExtractor`` (TIAToolbox 2.1.3) calls ``model.preproc_func`` on each patch
in its dataset and ``model.infer_batch(model, batch, device=...)`` on each batch. In
WSI mode it keeps ``batch_output[0]`` of each batch (a plain array would silently keep
only the first row: see docs/tiatoolbox-notes 3.4), so :meth:`TIAEncoderModel.infer_batch`
returns a one-element LIST holding the ``[B, D]`` features.

Patches stay uint8 through the loader (``preproc`` only makes them RGB); conversion,
resizing and normalisation run batched on the device, exactly as in ``tiahnm extract``,
so both pipelines give the same features for the same patches.

Example::

    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig

    model = TIAEncoderModel.from_name("small_cnn")
    engine = DeepFeatureExtractor(model=model, batch_size=32, device="cpu")
    engine.run(images=["slide.svs"], patch_mode=False, save_dir="out",
               ioconfig=IOPatchPredictorConfig(
                   input_resolutions=[{"units": "mpp", "resolution": 0.5}],
                   patch_input_shape=(224, 224), stride_shape=(224, 224)))
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tiatoolbox.models.models_abc import ModelABC
from torch import nn

from tiahnm.encoders.base import Preprocessing, describe_encoder, pool_output


class TIAEncoderModel(ModelABC):
    """Wraps a ``[B, 3, H, W] -> [B, D]`` encoder for TIAToolbox engines.

    Args:
        encoder (nn.Module): The encoder.
        preprocessing (Preprocessing | None): Its preprocessing (default: what the
            encoder declares, see :func:`tiahnm.encoders.base.describe_encoder`).
        amp_dtype (torch.dtype | None): Autocast dtype on CUDA (None: full precision).

    Attributes:
        out_dim (int): Feature width.
        infer_seconds (float): Time spent in :meth:`infer_batch` (for benchmarks).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        preprocessing: Preprocessing | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_dim, declared = describe_encoder(encoder)
        # channels-last weights match the channels-last batches of Preprocessing
        self.encoder = encoder.to(memory_format=torch.channels_last)
        self.out_dim = out_dim
        self.preprocessing = preprocessing or declared
        self.amp_dtype = amp_dtype
        self.infer_seconds = 0.0

    @classmethod
    def from_name(
        cls, name: str, *, weights: str | None = None, **options: Any
    ) -> TIAEncoderModel:
        """Build a registered encoder (see :func:`tiahnm.encoders.build.build_encoder`)."""
        from tiahnm.encoders.build import build_encoder

        info = build_encoder(name, weights=weights, options=options)
        return cls(info.module, preprocessing=info.preprocessing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[B, 3, H, W]`` float images to ``[B, D]`` features."""
        return pool_output(self.encoder(x))

    @staticmethod
    def preproc(image: np.ndarray) -> np.ndarray:
        """Per patch (in the engine's dataset): ``[H, W, 3]`` uint8, nothing else."""
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr[..., :3]).astype(np.uint8, copy=False)

    @staticmethod
    def infer_batch(
        model: nn.Module, batch_data: torch.Tensor | np.ndarray, *, device: str
    ) -> list[np.ndarray]:
        """``[B, H, W, 3]`` uint8 batch to ``[features [B, D]]`` (a one-element list).

        Args:
            model (nn.Module): This model (possibly wrapped in DataParallel).
            batch_data (torch.Tensor | np.ndarray): A batch from the engine's loader.
            device (str): Where to run.

        Returns:
            list[np.ndarray]: ``[features]``, float32 ``[B, D]``.
        """
        start = time.perf_counter()
        inner = getattr(model, "module", model)
        x = torch.as_tensor(batch_data).to(device, non_blocking=True)
        x = inner.preprocessing(x)
        dev = torch.device(device)
        model.eval()
        with torch.inference_mode():
            if dev.type == "cuda" and inner.amp_dtype is not None:
                with torch.autocast(device_type="cuda", dtype=inner.amp_dtype):
                    feats = model(x)
            else:
                feats = model(x)
            out = feats.float().cpu().numpy()
        inner.infer_seconds += time.perf_counter() - start
        return [out]
