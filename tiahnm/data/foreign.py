"""Bag sources for the feature files other tools write (CLAM, STAMP, slide2vec, TIAToolbox).

Every reader takes a labels CSV (``slide_id,label[,split]``, as ``h5_folder``) and
returns bags whose ``coords`` are level-0 pixel positions of the patches' top-left
corners, so heatmaps align with the slides:

* ``clam_pt``: CLAM / MHIM-MIL ``pt_files/<slide>.pt`` (``torch.save`` of the
  ``[N, D]`` tensor) with the coordinates from ``h5_files/<slide>.h5`` beside them
  (``coords``, already level-0 pixels);
* ``stamp_h5``: STAMP ``<slide>.h5`` (``feats`` float16, ``coords`` in micrometres,
  attributes ``unit: um``, ``tile_size_um``, ``extractor``); micrometres become
  level-0 pixels by dividing by the slide's level-0 µm/px (``mpp`` or read from
  ``slides_dir``);
* ``slide2vec``: a slide2vec output folder (``tile_embeddings/<slide>.pt`` or
  ``.npz`` with its ``.meta.json``, and hs2p's ``tiles/<slide>.coordinates.npz``
  with level-0 ``x``/``y`` by ``tile_index``);
* ``tia_zarr``: TIAToolbox ``DeepFeatureExtractor`` output ``<slide>.zarr``
  (``features``, ``coordinates`` ``[x0, y0, x1, y1]`` in pixels of the read
  resolution, no attributes); scaled to level 0 with the ``resolution``/``units``
  the extraction used and the slide's level-0 µm/px.

Each bag also records the patch size in level-0 pixels (``meta["patch_size_level0"]``,
``[width, height]``, as ``h5_folder`` files carry it on ``coords``) where the layout
says it: CLAM/TRIDENT ``coords`` attributes, STAMP's ``tile_size_um``, slide2vec's
``tile_size_lv0``, TIAToolbox's boxes; heatmaps then draw patches at their true size
instead of the coordinate step.

A folder that mixes encoders or feature widths is an error naming the files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.data.h5_features import read_labels_csv
from tiahnm.data.uniform import FeatureOrigin, check_uniform
from tiahnm.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class SlideFeatures:
    """One slide's features as read from a foreign file."""

    features: np.ndarray
    coords: np.ndarray | None
    encoder: str | None
    path: Path
    patch_size_level0: tuple[float, float] | None = None


def _check_arrays(path: Path, feats: np.ndarray, coords: np.ndarray | None) -> None:
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
        msg = f"{path}: features must be a non-empty [N, D] array, got shape {feats.shape}."
        raise DataError(msg)
    if not np.isfinite(feats).all():
        msg = f"{path}: features contain NaN or infinite values."
        raise DataError(msg)
    if coords is not None and coords.shape != (feats.shape[0], 2):
        msg = (
            f"{path}: {coords.shape[0]} coordinates for {feats.shape[0]} feature rows "
            f"(coordinates shape {coords.shape})."
        )
        raise DataError(msg)


class ForeignFeatureFolder:
    """Shared logic: labels, per-slide reading, the uniformity check.

    Subclasses implement :meth:`read_slide` (None when the slide has no file).

    Args:
        features_dir (str): The tool's output folder.
        labels_csv (str): ``slide_id,label[,split]`` CSV.
        classes (list[str] | None): Class names in index order.
        missing (str): ``"error"`` or ``"skip"`` for slides without a file.
    """

    tool = ""

    def __init__(
        self,
        features_dir: str,
        labels_csv: str,
        *,
        classes: list[str] | None = None,
        missing: str = "error",
    ) -> None:
        self.features_dir = Path(features_dir)
        self.labels_csv = Path(labels_csv)
        self.classes = classes
        if missing not in ("error", "skip"):
            msg = f"data.options.missing must be 'error' or 'skip', got {missing!r}."
            raise DataError(msg)
        self.missing = missing

    def read_slide(self, sid: str) -> SlideFeatures | None:
        """Read one slide (None: no file for it)."""
        raise NotImplementedError

    def load(self) -> list[Bag]:
        """Read every labelled slide."""
        labels, splits, _ = read_labels_csv(self.labels_csv, classes=self.classes)
        if not self.features_dir.is_dir():
            msg = f"{self.features_dir}: {self.tool} output folder not found."
            raise DataError(msg)
        bags, origins = [], []
        for sid, label in labels.items():
            got = self.read_slide(sid)
            if got is None:
                if self.missing == "skip":
                    continue
                msg = (
                    f"{self.labels_csv}: slide {sid!r} has no {self.tool} feature file "
                    f"in {self.features_dir} (set data.options.missing: skip to ignore)."
                )
                raise DataError(msg)
            _check_arrays(got.path, got.features, got.coords)
            origins.append(
                FeatureOrigin(str(got.path), got.encoder, got.features.shape[1])
            )
            meta: dict[str, object] = {}
            if got.patch_size_level0 is not None:
                meta["patch_size_level0"] = [float(v) for v in got.patch_size_level0]
            bags.append(
                Bag(
                    slide_id=sid,
                    label=label,
                    features=torch.from_numpy(np.ascontiguousarray(got.features)),
                    coords=got.coords,
                    split=splits.get(sid),
                    source=str(got.path),
                    meta=meta,
                )
            )
        if not bags:
            msg = f"{self.features_dir}: no feature files for the slides in {self.labels_csv}."
            raise DataError(msg)
        check_uniform(origins)
        return bags


def _torch_array(path: Path) -> np.ndarray:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = f"{path}: not a tensor file readable with torch.load(weights_only=True) ({type(exc).__name__})."
        raise DataError(msg) from None
    if not isinstance(obj, torch.Tensor):
        msg = f"{path}: expected a saved tensor, got {type(obj).__name__}."
        raise DataError(msg)
    return obj.detach().float().numpy()


class ClamPtFolder(ForeignFeatureFolder):
    """CLAM / MHIM-MIL ``pt_files`` with coordinates from ``h5_files`` beside them.

    Args:
        features_dir (str): The ``pt_files`` folder.
        labels_csv (str): Labels CSV.
        h5_dir (str | None): Folder of ``<slide>.h5`` with ``coords`` (default: the
            sibling ``h5_files``; CLAM's ``patches/`` folder works too); slides
            without one get no coordinates.
        classes (list[str] | None): Class names.
        missing (str): ``"error"`` or ``"skip"``.
    """

    tool = "CLAM pt_files"

    def __init__(
        self,
        features_dir: str,
        labels_csv: str,
        *,
        h5_dir: str | None = None,
        classes: list[str] | None = None,
        missing: str = "error",
    ) -> None:
        super().__init__(features_dir, labels_csv, classes=classes, missing=missing)
        self.h5_dir = Path(h5_dir) if h5_dir else self.features_dir.parent / "h5_files"

    def read_slide(self, sid: str) -> SlideFeatures | None:
        """``<sid>.pt`` and the ``coords`` of ``<h5_dir>/<sid>.h5``."""
        path = self.features_dir / f"{sid}.pt"
        if not path.is_file():
            return None
        feats = _torch_array(path)
        h5 = self.h5_dir / f"{sid}.h5"
        coords, size = None, None
        if h5.is_file():
            coords, size = _h5_coords(h5)
        else:
            logger.warning("%s: no %s; the bag has no coordinates.", path, h5)
        return SlideFeatures(feats, coords, None, path, size)


def _clam_patch_size(attrs: Any) -> tuple[float, float] | None:
    """Level-0 patch size from CLAM / TRIDENT ``coords`` attributes, if recorded.

    TRIDENT writes ``patch_size_level0``; CLAM's patching writes ``patch_size`` at
    ``patch_level`` and that level's ``downsample``.
    """
    if "patch_size_level0" in attrs:
        size = np.atleast_1d(np.asarray(attrs["patch_size_level0"], dtype=np.float64))
        return (float(size[0]), float(size[-1]))
    if "patch_size" not in attrs:
        return None
    side = float(np.asarray(attrs["patch_size"]).reshape(-1)[0])
    if "downsample" in attrs:
        down = np.atleast_1d(np.asarray(attrs["downsample"], dtype=np.float64))
        return (side * float(down[0]), side * float(down[-1]))
    if int(attrs.get("patch_level", -1)) == 0:
        return (side, side)
    return None


def _h5_coords(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """``coords`` of a CLAM h5 (``h5_files/`` or ``patches/``) and the patch size."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                msg = f"{path}: no 'coords' dataset (keys: {', '.join(f.keys())})."
                raise DataError(msg)
            coords = np.asarray(f["coords"][()], dtype=np.float64)
            size = _clam_patch_size(f["coords"].attrs)
    except OSError as exc:
        msg = f"{path}: unreadable HDF5 file ({exc})."
        raise DataError(msg) from None
    if coords.ndim != 2 or coords.shape[1] != 2:
        msg = f"{path}: 'coords' must be [N, 2], got shape {coords.shape}."
        raise DataError(msg)
    return coords, size


def _slide_info(sid: str, slides_dir: str) -> tuple[Path, Any]:
    """The slide ``<slides_dir>/<sid>.*`` and its TIAToolbox metadata.

    Raises:
        DataError: No such slide.
    """
    from tiatoolbox.wsicore.wsireader import WSIReader

    hits = sorted(Path(slides_dir).glob(f"{sid}.*"))
    if not hits:
        msg = f"{slides_dir}: no slide {sid}.* to read the level-0 resolution from."
        raise DataError(msg)
    return hits[0], WSIReader.open(hits[0]).info


def level0_power(sid: str, power: float | None, slides_dir: str | None) -> float:
    """Level-0 objective power: ``power`` if given, else read from the slide.

    Raises:
        DataError: No slide, or the slide records no objective power.
    """
    if power is not None:
        return float(power)
    if slides_dir is None:
        msg = "tia_zarr with units 'power' needs data.options.power or slides_dir."
        raise DataError(msg)
    path, info = _slide_info(sid, slides_dir)
    if not info.objective_power:
        msg = f"{path}: no objective power in the slide metadata; give data.options.power."
        raise DataError(msg)
    return float(info.objective_power)


def level0_mpp(sid: str, mpp: float | None, slides_dir: str | None) -> float | None:
    """Level-0 µm/px: ``mpp`` if given, else read from ``<slides_dir>/<sid>.*``.

    Raises:
        DataError: ``slides_dir`` has no slide ``sid`` or the slide has no mpp.
    """
    if mpp is not None:
        return float(mpp)
    if slides_dir is None:
        return None
    path, info = _slide_info(sid, slides_dir)
    if info.mpp is None:
        msg = f"{path}: no µm/px in the slide metadata; give data.options.mpp."
        raise DataError(msg)
    return float(info.mpp[0])


class StampH5Folder(ForeignFeatureFolder):
    """STAMP feature files: ``feats`` (fp16) and ``coords`` in micrometres.

    Args:
        features_dir (str): Folder of ``<slide>.h5``.
        labels_csv (str): Labels CSV.
        mpp (float | None): Level-0 µm/px of every slide.
        slides_dir (str | None): Folder of the slides, to read each one's µm/px.
            Without ``mpp`` or ``slides_dir`` the bags have no coordinates.
        classes (list[str] | None): Class names.
        missing (str): ``"error"`` or ``"skip"``.
    """

    tool = "STAMP"

    def __init__(
        self,
        features_dir: str,
        labels_csv: str,
        *,
        mpp: float | None = None,
        slides_dir: str | None = None,
        classes: list[str] | None = None,
        missing: str = "error",
    ) -> None:
        super().__init__(features_dir, labels_csv, classes=classes, missing=missing)
        self.mpp, self.slides_dir = mpp, slides_dir

    def read_slide(self, sid: str) -> SlideFeatures | None:
        """``feats``/``coords`` of ``<sid>.h5``; µm to level-0 pixels."""
        import h5py

        path = self.features_dir / f"{sid}.h5"
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                if "feats" not in f:
                    msg = f"{path}: no 'feats' dataset (keys: {', '.join(f.keys())}); not a STAMP file."
                    raise DataError(msg)
                feats = np.asarray(f["feats"][()], dtype=np.float32)
                coords_um = (
                    np.asarray(f["coords"][()], dtype=np.float64)
                    if "coords" in f
                    else None
                )
                unit = f.attrs.get("unit", "um")
                extractor = f.attrs.get("extractor")
                tile_um = f.attrs.get("tile_size_um")
                feat_type = f.attrs.get("feat_type", "tile")
        except OSError as exc:
            msg = f"{path}: unreadable HDF5 file ({exc})."
            raise DataError(msg) from None
        if feat_type != "tile":
            msg = f"{path}: STAMP feat_type {feat_type!r}; bags need tile features."
            raise DataError(msg)
        if unit != "um":
            msg = f"{path}: coordinates unit {unit!r}; this reader knows STAMP's 'um'."
            raise DataError(msg)
        mpp = level0_mpp(sid, self.mpp, self.slides_dir)
        coords, size = None, None
        if coords_um is not None and mpp is not None:
            coords = coords_um / mpp
        elif coords_um is not None:
            logger.warning(
                "%s: no level-0 µm/px (mpp or slides_dir); no coordinates.", path
            )
        if tile_um is not None and mpp is not None:
            side = float(tile_um) / mpp
            size = (side, side)
        name = str(extractor) if extractor else None
        return SlideFeatures(feats, coords, name, path, size)


class Slide2VecFolder(ForeignFeatureFolder):
    """A slide2vec output folder: ``tile_embeddings/`` and hs2p's ``tiles/``.

    hs2p's coordinates npz holds level-0 ``x`` and ``y`` (hs2p 1-2) or a
    ``coordinates`` ``[N, 2]`` array (format 2); both are read.

    Args:
        features_dir (str): slide2vec's ``output_dir``.
        labels_csv (str): Labels CSV.
        annotation (str | None): Read the per-class output of an annotation run
            (``tile_embeddings/<annotation>/``); None: the tissue output.
        classes (list[str] | None): Class names.
        missing (str): ``"error"`` or ``"skip"``.
    """

    tool = "slide2vec"

    def __init__(
        self,
        features_dir: str,
        labels_csv: str,
        *,
        annotation: str | None = None,
        classes: list[str] | None = None,
        missing: str = "error",
    ) -> None:
        super().__init__(features_dir, labels_csv, classes=classes, missing=missing)
        if annotation is not None and (
            not str(annotation) or Path(str(annotation)).name != str(annotation)
        ):
            msg = f"data.options.annotation must be a class folder name, got {annotation!r}."
            raise DataError(msg)
        # slide2vec keeps "tissue" (and no annotation) in the flat folder
        self.annotation = None if annotation in (None, "tissue") else str(annotation)

    def read_slide(self, sid: str) -> SlideFeatures | None:
        """Features by tile index, level-0 ``x``/``y`` from the coordinates npz."""
        emb = self.features_dir / "tile_embeddings"
        if self.annotation:
            emb = emb / self.annotation
        meta_path = emb / f"{sid}.meta.json"
        pt, npz = emb / f"{sid}.pt", emb / f"{sid}.npz"
        if pt.is_file():
            feats, index, path = _torch_array(pt), None, pt
        elif npz.is_file():
            with np.load(npz) as z:
                feats = np.asarray(z["features"], dtype=np.float32)
                index = np.asarray(z["tile_index"]) if "tile_index" in z else None
            path = npz
        else:
            return None
        meta = (
            json.loads(meta_path.read_text(encoding="utf-8"))
            if meta_path.is_file()
            else {}
        )
        coords = self._coords(sid, meta, path)
        if coords is not None and index is not None:
            coords = coords[index]
        tiling = self._tiling_meta(sid, meta) if not meta.get("tile_size_lv0") else {}
        side = (
            meta.get("tile_size_lv0")
            or tiling.get("tile_size_lv0")
            or tiling.get("tiling", {}).get("tile_size_lv0")  # hs2p format 2
        )
        size = (float(side), float(side)) if side else None
        return SlideFeatures(feats, coords, meta.get("encoder_name"), path, size)

    def _tiling_meta(self, sid: str, meta: dict[str, Any]) -> dict[str, Any]:
        """hs2p's ``<sid>.coordinates.meta.json`` beside the coordinates (or ``{}``)."""
        npz = self._tiles_npz(sid, meta)
        path = npz.with_name(f"{sid}.coordinates.meta.json")
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def _coords(self, sid: str, meta: dict[str, Any], path: Path) -> np.ndarray | None:
        tiles = self._tiles_npz(sid, meta)
        if not tiles.is_file():
            logger.warning("%s: no %s; the bag has no coordinates.", path, tiles)
            return None
        with np.load(tiles) as z:
            order = np.argsort(z["tile_index"], kind="stable")
            if "coordinates" in z:
                xy = np.asarray(z["coordinates"]).reshape(-1, 2)[order]
            elif "x" in z and "y" in z:
                xy = np.stack([z["x"], z["y"]], axis=1)[order]
            else:
                msg = f"{tiles}: neither 'coordinates' nor 'x'/'y' (keys: {', '.join(z.files)})."
                raise DataError(msg)
        return xy.astype(np.float64)

    def _tiles_npz(self, sid: str, meta: dict[str, Any]) -> Path:
        """hs2p's coordinates file: ``tiles/[<class>/]<sid>``, else the one recorded."""
        name = f"{sid}.coordinates.npz"
        recorded = (
            [Path(meta["coordinates_npz_path"])]
            if meta.get("coordinates_npz_path")
            else []
        )
        tiles = self.features_dir / "tiles"
        local = [tiles / self.annotation / name] if self.annotation else []
        for candidate in [*local, tiles / name, *recorded]:
            if candidate.is_file():
                return candidate
        return (local or [tiles / name])[0]


class TiaZarrFolder(ForeignFeatureFolder):
    """TIAToolbox ``DeepFeatureExtractor`` zarr output, one ``<slide>.zarr`` each.

    The files record neither the read resolution nor the slide's, so give the
    ``resolution``/``units`` the extraction used (its ``ioconfig``) and, for
    ``units: mpp``, the level-0 µm/px (``mpp`` or ``slides_dir``), for
    ``units: power``, the level-0 objective power (``power`` or ``slides_dir``):
    level-0 pixels are read pixels times ``level-0 power / resolution``.

    Args:
        features_dir (str): The engine's ``save_dir``.
        labels_csv (str): Labels CSV.
        resolution (float): ``input_resolutions[0]["resolution"]`` of the run.
        units (str): ``"mpp"``, ``"power"`` or ``"baseline"``.
        mpp (float | None): Level-0 µm/px of every slide (``units: mpp``).
        power (float | None): Level-0 objective power of every slide
            (``units: power``).
        slides_dir (str | None): Folder of the slides to read each one's µm/px.
        classes (list[str] | None): Class names.
        missing (str): ``"error"`` or ``"skip"``.
    """

    tool = "TIAToolbox DeepFeatureExtractor"

    def __init__(
        self,
        features_dir: str,
        labels_csv: str,
        *,
        resolution: float,
        units: str = "mpp",
        mpp: float | None = None,
        power: float | None = None,
        slides_dir: str | None = None,
        classes: list[str] | None = None,
        missing: str = "error",
    ) -> None:
        super().__init__(features_dir, labels_csv, classes=classes, missing=missing)
        if units not in ("mpp", "power", "baseline"):
            msg = f"data.options.units must be 'mpp', 'power' or 'baseline', got {units!r}."
            raise DataError(msg)
        if units == "mpp" and mpp is None and slides_dir is None:
            msg = "tia_zarr with units 'mpp' needs data.options.mpp or slides_dir (level-0 µm/px)."
            raise DataError(msg)
        if units == "power" and power is None and slides_dir is None:
            msg = "tia_zarr with units 'power' needs data.options.power or slides_dir (level-0 objective power)."
            raise DataError(msg)
        self.resolution, self.units = float(resolution), units
        self.mpp, self.power, self.slides_dir = mpp, power, slides_dir

    def read_slide(self, sid: str) -> SlideFeatures | None:
        """``features`` and ``coordinates[:, :2]`` scaled to level 0."""
        import zarr

        path = self.features_dir / f"{sid}.zarr"
        if not path.is_dir():
            return None
        try:
            group = zarr.open_group(str(path), mode="r")
            feats = np.asarray(group["features"][...], dtype=np.float32)
            boxes = np.asarray(group["coordinates"][...], dtype=np.float64)
        except Exception as exc:
            msg = f"{path}: not a DeepFeatureExtractor zarr group ({type(exc).__name__}: {exc})."
            raise DataError(msg) from None
        if self.units == "baseline":
            scale = 1.0 / self.resolution
        elif self.units == "power":
            scale = level0_power(sid, self.power, self.slides_dir) / self.resolution
        else:
            scale = self.resolution / float(level0_mpp(sid, self.mpp, self.slides_dir))
        extent = np.median(boxes[:, 2:] - boxes[:, :2], axis=0) * scale
        size = (float(extent[0]), float(extent[1])) if len(boxes) else None
        return SlideFeatures(feats, boxes[:, :2] * scale, None, path, size)
