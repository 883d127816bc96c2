"""Write tests/data/foreign/tia_zarr/CMU-1-Small-Region.zarr with TIAToolbox itself.

DeepFeatureExtractor (TIAToolbox 2.1.3) in WSI mode, 32 px patches at 4 µm/px on
../shared/data/slides/CMU-1-Small-Region.svs, with a model whose features are the
patch's mean R, G, B (0-1): the reader test checks the level-0 coordinates by
re-reading the slide there. Run from the repository root:
python tests/data/foreign/make_tia_zarr.py
and, for the objective-power fixture (32 px patches at 2.5x, ``tia_zarr_power/``):
python tests/data/foreign/make_tia_zarr.py power 2.5
"""

import sys
from pathlib import Path

import numpy as np
import torch
from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
from tiatoolbox.models.models_abc import ModelABC

SLIDE = (
    Path(__file__).parents[3]
    / ".."
    / "shared"
    / "data"
    / "slides"
    / "CMU-1-Small-Region.svs"
)
OUT = Path(__file__).parent / "tia_zarr"


class MeanColour(ModelABC):
    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2))

    @staticmethod
    def preproc(image: np.ndarray) -> np.ndarray:
        return (np.asarray(image)[..., :3] / 255.0).astype(np.float32)

    @staticmethod
    def infer_batch(model, batch_data, *, device):
        x = torch.as_tensor(batch_data).to(device)
        with torch.inference_mode():
            return [model(x).cpu().numpy()]


if __name__ == "__main__":
    units, resolution = (
        (sys.argv[1], float(sys.argv[2])) if len(sys.argv) > 2 else ("mpp", 4.0)
    )
    if units != "mpp":
        OUT = OUT.with_name(f"tia_zarr_{units}")
    ioconfig = IOPatchPredictorConfig(
        input_resolutions=[{"units": units, "resolution": resolution}],
        patch_input_shape=(32, 32),
        stride_shape=(32, 32),
    )
    engine = DeepFeatureExtractor(
        model=MeanColour(), batch_size=16, num_workers=0, device="cpu", verbose=False
    )
    out = engine.run(
        images=[SLIDE.resolve()],
        patch_mode=False,
        ioconfig=ioconfig,
        save_dir=OUT,
        output_type="zarr",
        auto_get_mask=True,
        overwrite=True,
    )
    print(out)
