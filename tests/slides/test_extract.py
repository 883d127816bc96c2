from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tiahnm.cli import cli
from tiahnm.data.h5_features import read_feature_file

# small patches keep the small_cnn forward passes cheap
FAST = ["--resolution", "1.0", "--patch-size", "64", "--num-workers", "0"]


def run(args):
    return CliRunner().invoke(cli, ["extract", *args], catch_exceptions=False)


@pytest.fixture
def one_slide(slide_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slide_dir / "syn_a.tif", folder / "syn_a.tif")
    return folder


def test_round_trip_attributes_and_skip(one_slide, tmp_path):
    out = tmp_path / "out"
    res = run([str(one_slide), "--output-path", str(out), *FAST])
    assert res.exit_code == 0, res.output
    assert "1 done, 0 skipped, 0 failed" in res.output
    h5 = out / "syn_a.h5"
    feats, coords = read_feature_file(h5)
    # tissue 512 x 384 level-0 px at 1.0 mpp = 256 x 192 px = 4 x 3 patches of 64
    assert feats.shape == (12, 128) and feats.dtype == np.float32
    assert coords.dtype == np.int64 and (coords % 128 == 0).all()  # level-0 pixels
    with h5py.File(h5) as f:
        attrs = dict(f.attrs)
        assert f["coords"].attrs["coord_space"] == "level0"
        assert f["coords"].attrs["patch_size_level0"].tolist() == [128.0, 128.0]
    assert attrs["encoder"] == "small_cnn"
    assert attrs["encoder_weights_sha256"] == "random-init"
    assert attrs["resolution"] == 1.0 and attrs["units"] == "mpp"
    assert attrs["patch_size"] == 64 and attrs["stride"] == 64
    assert attrs["tiatoolbox_version"] == "2.1.3"
    assert attrs["tiahnm_version"] and attrs["level0_mpp"] == pytest.approx(0.5)
    with (out / "failures.csv").open() as fh:
        assert list(csv.reader(fh)) == [["slide", "error"]]
    summary = json.loads((out / "extract_summary.json").read_text())
    assert summary["done"] == 1 and summary["patches_encoded"] == 12

    mtime = h5.stat().st_mtime_ns
    res = run([str(one_slide), "--output-path", str(out), *FAST])
    assert res.exit_code == 0 and "skipped syn_a" in res.output
    assert h5.stat().st_mtime_ns == mtime
    # another setting -> recomputed; the same seed gives the same encoder
    res = run([str(one_slide), "--output-path", str(out), *FAST, "--min-tissue", "0.9"])
    assert "1 done" in res.output and h5.stat().st_mtime_ns != mtime
    new_feats, new_coords = read_feature_file(h5)
    old = {tuple(c): f for c, f in zip(coords.tolist(), feats, strict=True)}
    for c, f in zip(new_coords.tolist(), new_feats, strict=True):
        np.testing.assert_allclose(f, old[tuple(c)], atol=1e-5)


def test_failures_are_isolated(slide_dir, nompp_slide, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slide_dir / "syn_b.tif", folder / "syn_b.tif")
    shutil.copy(nompp_slide, folder / "syn_nompp.tif")
    (folder / "corrupt.svs").write_bytes(np.random.default_rng(0).bytes(10_000))
    out = tmp_path / "out"
    res = run(
        [
            str(folder),
            "--output-path",
            str(out),
            *FAST,
            "--num-workers",
            "1",
            "--batch-size",
            "4",
        ]
    )
    assert res.exit_code == 3, res.output
    assert "1 done, 0 skipped, 2 failed" in res.output
    assert (out / "syn_b.h5").is_file()
    with (out / "failures.csv").open() as fh:
        rows = {r["slide"]: r["error"] for r in csv.DictReader(fh)}
    assert set(rows) == {str(folder / "corrupt.svs"), str(folder / "syn_nompp.tif")}
    assert "corrupt.svs: cannot open as a slide" in rows[str(folder / "corrupt.svs")]
    assert (
        "syn_nompp.tif: no resolution metadata" in rows[str(folder / "syn_nompp.tif")]
    )
    assert not list(out.glob(".*.tmp"))  # no partial files left behind

    # --mpp rescues the slide without metadata; the done one is skipped
    res = run([str(folder), "--output-path", str(out), *FAST, "--mpp", "0.5"])
    assert res.exit_code == 3 and "1 done, 1 skipped, 1 failed" in res.output
    with h5py.File(out / "syn_nompp.h5") as f:
        assert f.attrs["mpp_source"] == "user"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside TIAToolbox
def test_engine_wrapper_runs_deep_feature_extractor(slide_dir, tmp_path):
    """TIAToolbox's DeepFeatureExtractor with our ModelABC wrapper, WSI mode."""
    from tiatoolbox import rcParam
    from tiatoolbox.models.engine.deep_feature_extractor import DeepFeatureExtractor
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig

    from tiahnm.encoders.build import build_encoder
    from tiahnm.encoders.tia_model import TIAEncoderModel
    from tiahnm.slides.dataset import SlidePatchDataset
    from tiahnm.slides.reader import open_slide
    from tiahnm.slides.tiling import TilingConfig, tile_slide

    rcParam["torch_compile_mode"] = "disable"
    info = build_encoder("small_cnn", options={"out_dim": 16, "width": 8})
    model = TIAEncoderModel(info.module)
    engine = DeepFeatureExtractor(
        model=model, batch_size=5, device="cpu", verbose=False
    )
    out = engine.run(
        images=[slide_dir / "syn_a.tif"],
        patch_mode=False,
        ioconfig=IOPatchPredictorConfig(
            input_resolutions=[{"units": "mpp", "resolution": 2.0}],
            patch_input_shape=(64, 64),
            stride_shape=(64, 64),
        ),
        save_dir=tmp_path / "engine",
        output_type="zarr",
        auto_get_mask=False,
        overwrite=True,
    )
    import zarr

    group = zarr.open_group(str(next(iter(out.values()))), mode="r")
    feats = np.asarray(group["features"])
    assert feats.shape == (16, 16)  # 256 px at 2 mpp: 4 x 4, all rows kept
    # the same patches through our dataset and the same module give the same features
    slide = open_slide(slide_dir / "syn_a.tif")
    tiling = tile_slide(
        slide, TilingConfig(resolution=2.0, patch_size=64, masker="none")
    )
    np.testing.assert_array_equal(np.asarray(group["coordinates"]), tiling.bounds)
    ds = SlidePatchDataset(slide.source, tiling.bounds, 2.0, "mpp", reader=slide.reader)
    import torch

    batch = torch.stack([ds[i] for i in range(len(ds))])
    ours = TIAEncoderModel.infer_batch(model, batch, device="cpu")[0]
    np.testing.assert_allclose(ours, feats, atol=1e-5)
    slide.close()


@pytest.mark.shared_data
def test_real_slides_extract(shared_data, tmp_path):
    slides = shared_data / "slides"
    out = tmp_path / "out"
    args = ["--resolution", "2.0", "--patch-size", "112", "--num-workers", "0"]
    res = run(
        [
            str(slides / "CMU-1-Small-Region.svs"),
            str(slides / "tcga-cr-7395-01a-01-ts1.svs"),
            "--output-path",
            str(out),
            *args,
        ]
    )
    assert res.exit_code == 3  # the TCGA slide has no mpp
    assert "tcga-cr-7395-01a-01-ts1.svs: no resolution metadata" in res.output
    res = run(
        [
            str(slides / "tcga-cr-7395-01a-01-ts1.svs"),
            "--output-path",
            str(out),
            *args,
            "--mpp",
            "0.25",
        ]
    )
    assert res.exit_code == 0, res.output
    for sid, dims in (
        ("CMU-1-Small-Region", (2220, 2967)),
        ("tcga-cr-7395-01a-01-ts1", (4443, 3567)),
    ):
        feats, coords = read_feature_file(out / f"{sid}.h5")
        assert feats.shape[1] == 128 and len(feats) > 0
        assert (coords >= 0).all() and (coords < dims).all()


def test_help_is_light():
    import subprocess
    import sys

    code = (
        "import sys\nfrom tiahnm.cli import cli\ntry:\n"
        "    cli(['extract', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'tiatoolbox' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "--img-input" in out.stdout and "--min-tissue" in out.stdout
    assert out.stdout.strip().endswith("False False")


def test_default_workers():
    import torch

    from tiahnm.slides.extract import resolve_workers

    assert resolve_workers(None, torch.device("cpu")) == 0
    assert 1 <= resolve_workers(None, torch.device("cuda")) <= 8
    assert resolve_workers(3, torch.device("cpu")) == 3
