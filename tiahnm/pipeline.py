"""``tiahnm run``: every stage the config asks for, in order, each resumable.

Stages: ``extract`` (when ``extract.slides`` is set: slides to feature files; slides
already done with the same settings are skipped), then training and evaluation under
cross-validation (folds already done are skipped, an interrupted fold resumes from its
last epoch).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from tiahnm.config import Config

logger = logging.getLogger(__name__)


def run_extract_stage(config: Config) -> tuple[Config, Any]:
    """Extract features when the config names slides; point the data at them.

    Returns:
        tuple: The config to train with (``data`` set to the feature folder when the
        source is ``h5_folder`` without a ``features_dir``) and the extraction summary
        (None when there is no extract stage).
    """
    stage = config.extract
    if not stage.slides:
        return config, None
    from tiahnm.slides.extract import ExtractConfig, extract_features
    from tiahnm.slides.tiling import TilingConfig

    features_dir = Path(stage.features_dir or Path(config.output_dir) / "features")
    tiling = TilingConfig(
        resolution=stage.resolution,
        units=stage.units,
        patch_size=stage.patch_size,
        stride=stage.stride,
        masker=stage.masker,
        min_tissue=stage.min_tissue,
    )
    cfg = ExtractConfig(
        tiling=tiling,
        encoder=stage.encoder,
        weights=stage.weights,
        encoder_options=dict(stage.encoder_options),
        batch_size=stage.batch_size,
        num_workers=stage.num_workers,
        device=config.train.device,
        mpp=stage.mpp,
        power=stage.power,
        seed=config.seed,
        annotations=stage.annotations,
    )
    summary = extract_features(stage.slides, features_dir, cfg)
    failed = summary.failed
    if failed:
        logger.warning(
            "%d slide(s) failed extraction and are left out (see %s).",
            len(failed),
            features_dir / "failures.csv",
        )
    data = config.data
    if data.source == "h5_folder" and "features_dir" not in data.options:
        options = dict(data.options, features_dir=str(features_dir))
        if failed:
            options.setdefault("missing", "skip")
        config = replace(config, data=replace(data, options=options))
    return config, summary


def run_pipeline(config: Config) -> tuple[dict[str, Any], int]:
    """Run every configured stage; return the training summary and an exit code.

    The exit code is 0, or 3 when some slides failed (partial success).
    """
    from tiahnm.training.cv import run_training

    config, extract_summary = run_extract_stage(config)
    summary = run_training(config)
    partial = extract_summary is not None and bool(extract_summary.failed)
    return summary, 3 if partial else 0
