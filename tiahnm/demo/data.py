"""The demo's data set: synthetic slides, tumour annotations and a labels CSV.

Written under ``<root>/data``: ``slides/demo_NN.tif``, ``annotations/demo_NN.geojson``
(tumour outlines; empty for normal slides, whose patches are all negative) and ``labels.csv`` (``slide_id,label`` with ``normal``/``tumour``).
``data.json`` records the spec that made them; when it matches and every file is there,
nothing is drawn again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tiahnm.demo.slides import (
    SlideSpec,
    draw_slide,
    write_annotation,
    write_pyramid_tiff,
)
from tiahnm.errors import ConfigError
from tiahnm.utils.io import atomic_open, write_json

CLASSES = ("normal", "tumour")


@dataclass(frozen=True)
class DemoDataSpec:
    """Size of the demo data set.

    Attributes:
        n_slides (int): Slides; half of them (rounded down) have tumour regions.
        width (int): Level-0 width of every slide in pixels.
        height (int): Level-0 height in pixels.
        mpp (float): Level-0 microns per pixel.
        seed (int): Seed of the whole data set.
    """

    n_slides: int = 12
    width: int = 2048
    height: int = 1536
    mpp: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_slides < 4:
            msg = f"the demo needs at least 4 slides, got n_slides={self.n_slides}."
            raise ConfigError(msg)
        if min(self.width, self.height) < 512:
            msg = f"demo slides must be at least 512 px a side, got {self.width}x{self.height}."
            raise ConfigError(msg)

    def slides(self) -> list[SlideSpec]:
        """One :class:`SlideSpec` per slide; tumour and normal slides alternate."""
        return [
            SlideSpec(
                slide_id=f"demo_{i:02d}",
                width=self.width,
                height=self.height,
                tumour=i % 2 == 1,
                seed=self.seed * 1000 + i,
                mpp=self.mpp,
            )
            for i in range(self.n_slides)
        ]


@dataclass
class DemoData:
    """Where the demo data is.

    Attributes:
        slides_dir (Path): Folder of ``demo_NN.tif``.
        annotations_dir (Path): Folder of ``demo_NN.geojson``.
        labels_csv (Path): ``slide_id,label``.
        generated (bool): False when the files were already there.
    """

    slides_dir: Path
    annotations_dir: Path
    labels_csv: Path
    generated: bool


def make_demo_data(
    root: str | Path,
    spec: DemoDataSpec | None = None,
    *,
    on_slide: Callable[[str], None] | None = None,
) -> DemoData:
    """Write the demo data under ``root/data`` (skipped when already there).

    Args:
        root (str | Path): The demo folder.
        spec (DemoDataSpec | None): Size and seed (default: the full demo).
        on_slide (Callable[[str], None] | None): Called with each slide id drawn.

    Returns:
        DemoData: The folders and the labels CSV.

    Raises:
        ConfigError: ``root`` holds demo data made with another spec (its results
            would not match the new slides).
    """
    spec = spec or DemoDataSpec()
    data = Path(root) / "data"
    out = DemoData(
        slides_dir=data / "slides",
        annotations_dir=data / "annotations",
        labels_csv=data / "labels.csv",
        generated=False,
    )
    slides = spec.slides()
    wanted = [out.slides_dir / f"{s.slide_id}.tif" for s in slides]
    wanted += [out.annotations_dir / f"{s.slide_id}.geojson" for s in slides]
    wanted.append(out.labels_csv)
    record = data / "data.json"
    recorded = _recorded(record)
    if recorded is not None and recorded != asdict(spec):
        msg = (
            f"{record}: this folder holds a demo made with other settings "
            f"({recorded}); use another output folder or delete {Path(root)}."
        )
        raise ConfigError(msg)
    if recorded is not None and all(p.is_file() for p in wanted):
        return out
    for s in slides:
        if on_slide is not None:
            on_slide(s.slide_id)
        drawn = draw_slide(s)
        write_pyramid_tiff(
            out.slides_dir / f"{s.slide_id}.tif",
            drawn.image,
            mpp=s.mpp,
            levels=s.levels,
        )
        # normal slides get an empty annotation: every patch is known negative
        write_annotation(
            out.annotations_dir / f"{s.slide_id}.geojson", drawn.tumour_regions
        )
    with atomic_open(out.labels_csv, "w", encoding="utf-8", newline="") as fh:
        fh.write("slide_id,label\n")
        for s in slides:
            fh.write(f"{s.slide_id},{CLASSES[int(s.tumour)]}\n")
    write_json(record, asdict(spec))
    out.generated = True
    return out


def _recorded(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


__all__ = ["CLASSES", "DemoData", "DemoDataSpec", "make_demo_data"]
