"""CONCH v1 / v1.5 presets against the authors' code (run by hand, not in CI).

Neither reference is on PyPI, so this script takes them from local checkouts:

* ``--conch-site``: a folder where the CONCH package (github.com/mahmoodlab/CONCH)
  and its extra imports are installed, e.g.
  ``pip install --no-deps --target /tmp/conch_site ./CONCH ftfy einops einops-exts``;
* ``--trident-file``: ``trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py``
  of a TRIDENT checkout (github.com/mahmoodlab/TRIDENT), imported as a file.

For each model a random-init reference network is saved in its published key layout,
loaded back the authors' way (CONCH: ``create_model_from_pretrained('conch_ViT-B-16',
checkpoint_path=...)`` then ``encode_image(x, proj_contrast=False, normalize=False)``,
as TRIDENT; v1.5: TRIDENT's ``CONCHVisionTower`` with its ``resize_pos_embed`` and a
strict load) and through the tiahnm preset (``--weights FOLDER``); the script records
parameter counts, output widths and the largest difference of the features on the same
448 px inputs. Result: ``benchmarks/results/conch_reference.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from tiahnm.encoders.build import build_encoder
from tiahnm.utils.provenance import write_result


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_conch_v1(folder: Path, x: torch.Tensor) -> dict:
    """CONCH v1 through the conch package and through the preset."""
    from conch.open_clip_custom import create_model_from_pretrained, factory
    from conch.open_clip_custom.coca_model import CoCa

    config = json.loads((Path(factory.CFG_DIR) / "conch_ViT-B-16.json").read_text())
    config.pop("custom_text", None)
    torch.manual_seed(0)
    torch.save(CoCa(**config).state_dict(), folder / "pytorch_model.bin")
    ref = create_model_from_pretrained(
        "conch_ViT-B-16",
        checkpoint_path=str(folder / "pytorch_model.bin"),
        return_transform=False,
    ).eval()
    ours = build_encoder("conch_v1", weights=str(folder)).module.eval()
    with torch.inference_mode():
        want = ref.encode_image(x, proj_contrast=False, normalize=False)
        got = ours.net(x)
    return {
        "params_visual": _count(ref.visual),
        "params_visual_trunk": _count(ref.visual.trunk),
        "params_coca_total": _count(ref),
        "out_dim": int(got.shape[1]),
        "max_abs_diff": float((got - want).abs().max()),
        "feature_max_abs": float(want.abs().max()),
    }


def check_conch_v15(trident_file: Path, folder: Path, x: torch.Tensor) -> dict:
    """TRIDENT's CONCH v1.5 tower and the timm-built preset on the same weights."""
    spec = importlib.util.spec_from_file_location("trident_conchv15", trident_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    ref = mod.CONCHVisionTower()
    state = ref.state_dict()
    # a checkpoint saved at the 448 px grid exercises the pos-embed resampling
    state["trunk.pos_embed"] = torch.randn(1, 1 + 28 * 28, 1024) * 0.02
    torch.save(state, folder / "pytorch_model_vision.bin")
    loaded = torch.load(folder / "pytorch_model_vision.bin", weights_only=True)
    loaded["trunk.pos_embed"] = mod.resize_pos_embed(
        ref.trunk, loaded["trunk.pos_embed"], verbose=False
    )
    ref.load_state_dict(loaded, strict=True)
    ref.eval()
    ours = build_encoder("conch_v15", weights=str(folder)).module.eval()
    with torch.inference_mode():
        want = ref(x)
        got = ours.net(x)
    return {
        "params": _count(ref),
        "params_trunk": _count(ref.trunk),
        "out_dim": int(got.shape[1]),
        "max_abs_diff": float((got - want).abs().max()),
        "feature_max_abs": float(want.abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    """Run both checks and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conch-site", type=Path, required=True)
    parser.add_argument("--trident-file", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/conch_reference.json")
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.conch_site))
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 448, 448)
    with tempfile.TemporaryDirectory() as tmp:
        v1_dir, v15_dir = Path(tmp, "v1"), Path(tmp, "v15")
        v1_dir.mkdir()
        v15_dir.mkdir()
        result = {
            "input": list(x.shape),
            "conch_v1": check_conch_v1(v1_dir, x),
            "conch_v15": check_conch_v15(args.trident_file, v15_dir, x),
        }
    write_result(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
