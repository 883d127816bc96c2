"""``tiahnm run`` from slides: extract stage, then training, with one corrupt slide."""

import json

import yaml
from click.testing import CliRunner

from tests.slides.conftest import make_image, write_pyramid
from tiahnm.cli import cli


def test_run_from_slides_with_a_corrupt_one(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    rows = ["slide_id,label"]
    for i in range(6):
        write_pyramid(slides / f"s{i}.tif", make_image(seed=i))
        rows.append(f"s{i},{i % 2}")
    (slides / "broken.svs").write_bytes(b"\x00not a slide" * 100)
    rows.append("broken,1")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    config = {
        "output_dir": str(tmp_path / "out"),
        "extract": {
            "slides": [str(slides)],
            "encoder": "small_cnn",
            "encoder_options": {"out_dim": 16},
            "resolution": 2.0,
            "patch_size": 64,
            "masker": "none",
            "batch_size": 16,
        },
        "data": {"source": "h5_folder", "options": {"labels_csv": str(labels)}},
        "head": {"name": "abmil", "options": {"embed_dim": 16, "attn_dim": 8}},
        "train": {"epochs": 2, "progress": False},
        "cv": {"folds": 2, "val_fraction": 0.0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(cli, ["run", str(path)])
    assert res.exit_code == 3, res.output
    out = tmp_path / "out"
    failures = (out / "features" / "failures.csv").read_text()
    assert "broken" in failures
    assert sorted(p.stem for p in (out / "features").glob("*.h5")) == [
        f"s{i}" for i in range(6)
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_folds"] == 2
    assert sum(len(f["metrics"]) > 0 for f in summary["folds"]) == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["options"]["features_dir"] == str(out / "features")
    # A second run skips the slides already done and the folds already trained.
    mtime = (out / "features" / "s0.h5").stat().st_mtime_ns
    res = CliRunner().invoke(cli, ["run", str(path)])
    assert res.exit_code == 3
    assert (out / "features" / "s0.h5").stat().st_mtime_ns == mtime
