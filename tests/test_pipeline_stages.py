"""Stage manifest of ``tiahnm run``: skipping, resuming, refusing mixed settings."""

import json
import os
from types import SimpleNamespace

import pytest

from tests.synthetic import make_bags, write_mil_csv
from tiahnm.config import load_config
from tiahnm.errors import ConfigError
from tiahnm.pipeline import (
    MANIFEST,
    StageManifest,
    _pick_slides,
    extract_settings,
    run_pipeline,
    settings_hash,
    train_settings,
)


@pytest.fixture
def mil_config(tmp_path):
    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(12, 4, seed=1))

    def make(*overrides):
        return load_config(
            None,
            [
                f"output_dir={tmp_path / 'run'}",
                "data.source=mil_csv",
                f"data.options.path={csv}",
                "head.options={embed_dim: 8, attn_dim: 4}",
                "train.epochs=2",
                "train.progress=false",
                "cv.folds=2",
                "cv.val_fraction=0.0",
                "evaluation.bootstrap=0",
                *overrides,
            ],
        )

    return make


def test_second_run_skips_finished_stages(mil_config, tmp_path):
    lines = []
    first = run_pipeline(mil_config(), echo=lines.append)
    assert [(s.name, s.status) for s in first.stages] == [
        ("extract", "off"),
        ("train", "done"),
        ("heatmaps", "off"),
        ("report", "done"),
    ]
    assert first.exit_code == 0
    assert first.report == tmp_path / "run" / "report.md"
    assert "[extract] off: no extract.slides" in lines
    assert "[heatmaps] off: evaluation.heatmaps is 0" in lines
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())["stages"]
    assert manifest["train"]["status"] == "done"
    assert manifest["train"]["settings"]["head"]["options"] == {
        "embed_dim": 8,
        "attn_dim": 4,
    }

    lines.clear()
    # runtime-only keys (progress bars, threads) do not count as other settings
    second = run_pipeline(
        mil_config("train.num_threads=1", "train.progress=true"), echo=lines.append
    )
    assert [(s.name, s.status) for s in second.stages] == [
        ("extract", "off"),
        ("train", "skipped"),
        ("heatmaps", "off"),
        ("report", "skipped"),
    ]
    assert (
        f"[train] skipped (done with the same settings): {tmp_path / 'run' / 'summary.json'}"
        in lines
    )
    assert second.summary == first.summary


def test_other_training_settings_are_refused(mil_config, tmp_path):
    run_pipeline(mil_config())
    with pytest.raises(ConfigError) as info:
        run_pipeline(mil_config("head.options.embed_dim=16", "train.lr=0.001"))
    msg = str(info.value)
    assert "changed: head.options.embed_dim, train.lr)" in msg
    assert str(tmp_path / "run") in msg
    assert "use another --output-path" in msg


def test_interrupted_training_resumes_with_the_same_settings(mil_config, tmp_path):
    cfg = mil_config()
    manifest = StageManifest(tmp_path / "run" / MANIFEST)
    settings = train_settings(cfg, None)
    manifest.start("train", settings_hash(settings), settings)
    (tmp_path / "run" / "folds").mkdir(parents=True)
    result = run_pipeline(cfg)
    assert [s.status for s in result.stages][1] == "done"
    assert result.summary["n_folds"] == 2


def test_manifest_round_trip_and_unreadable_file(tmp_path):
    path = tmp_path / MANIFEST
    path.write_text("{not json")
    manifest = StageManifest(path)
    assert manifest.entry("train") is None
    manifest.start("train", "abc", {"x": 1})
    assert not manifest.is_done("train", "abc")
    manifest.finish("train", "abc", 1.23456, files=["a.png"])
    again = StageManifest(path)
    assert again.is_done("train", "abc")
    assert not again.is_done("train", "abd")
    entry = again.entry("train")
    assert entry["seconds"] == 1.235
    assert entry["files"] == ["a.png"]
    assert entry["settings"] == {"x": 1}


def test_settings_hash_ignores_key_order():
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})
    assert len(settings_hash({})) == 16


def test_extract_settings_change_with_the_slide_files(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.tif").write_bytes(b"x" * 10)
    cfg = load_config(None, [f"extract.slides=[{slides}]", "extract.batch_size=8"])
    first = extract_settings(cfg)
    assert first["slide_files"][0][:2] == [str((slides / "a.tif").resolve()), 10]
    assert "batch_size" not in first
    same = extract_settings(
        load_config(None, [f"extract.slides=[{slides}]", "extract.batch_size=64"])
    )
    assert settings_hash(same) == settings_hash(first)
    (slides / "a.tif").write_bytes(b"y" * 11)
    os.utime(slides / "a.tif", ns=(1, 1))
    assert settings_hash(extract_settings(cfg)) != settings_hash(first)


def test_heatmap_slides_alternate_between_labels():
    slides = [
        SimpleNamespace(slide_id=s, label=lab)
        for s, lab in [("n1", 0), ("t2", 1), ("n0", 0), ("t1", 1), ("n2", 0)]
    ]
    picked = [s.slide_id for s in _pick_slides(slides, 4)]
    assert picked == ["t1", "n0", "t2", "n1"]
    assert [s.slide_id for s in _pick_slides(slides, -1)] == [
        "t1",
        "n0",
        "t2",
        "n1",
        "n2",
    ]


def test_only_rank_zero_writes_the_manifest_and_prints(tmp_path, monkeypatch, capsys):
    from tiahnm.cli import _print_summary
    from tiahnm.pipeline import StageManifest

    summary = {"head": "abmil", "miner": "none", "n_folds": 2, "metrics": {}}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    StageManifest(tmp_path / "stages.json").start("train", "k", {})
    _print_summary(summary, str(tmp_path))
    assert not (tmp_path / "stages.json").exists()
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    StageManifest(tmp_path / "stages.json").start("train", "k", {})
    _print_summary(summary, str(tmp_path))
    assert (tmp_path / "stages.json").is_file()
    assert "abmil + miner none: 2 folds" in capsys.readouterr().out
