"""``timm:hf-hub:ORG/NAME`` from an already-filled Hugging Face cache, never a download.

The snapshot folder of ``ORG/NAME`` (``models--ORG--NAME/snapshots/<rev>/`` with timm's
``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``) is found with
``huggingface_hub.try_to_load_from_cache``, which only looks at the file system; timm
then builds the architecture from that ``config.json`` (``local-dir:``), so neither
the hub nor the network is contacted, whatever ``HF_HUB_OFFLINE`` says.
"""

from __future__ import annotations

from pathlib import Path

from tiahnm.errors import ConfigError

#: Weight files of a timm hub repository, preferred first.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def split_hub_name(model: str) -> tuple[str, str] | None:
    """``(repo_id, revision)`` of ``hf-hub:ORG/NAME[@REV]``, or None for other names."""
    for prefix in ("hf-hub:", "hf_hub:"):
        if model.startswith(prefix):
            repo, _, revision = model[len(prefix) :].partition("@")
            return repo, revision or "main"
    return None


def _fill_hint(repo: str, revision: str) -> str:
    return (
        "tiahnm never downloads: on a machine with internet run "
        f"`huggingface-cli download {repo} config.json model.safetensors"
        f"{'' if revision == 'main' else f' --revision {revision}'}` (or "
        f"timm.create_model('hf-hub:{repo}', pretrained=True) once), then copy its "
        "cache folder here (HF_HUB_CACHE, default ~/.cache/huggingface/hub) and "
        "run with HF_HUB_OFFLINE=1."
    )


def hub_snapshot(repo: str, revision: str = "main") -> Path:
    """The cached snapshot folder of ``repo`` holding timm's ``config.json``.

    Raises:
        ConfigError: Not in the cache (names the expected path and how to fill it).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    hit = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(hit, str):
        return Path(hit).parent
    expected = (
        Path(constants.HF_HUB_CACHE)
        / f"models--{repo.replace('/', '--')}"
        / "snapshots"
        / f"<{revision} commit>"
        / "config.json"
    )
    msg = (
        f"timm encoder 'hf-hub:{repo}': not in the Hugging Face cache (expected "
        f"{expected}, with refs/{revision} naming the commit). "
        f"{_fill_hint(repo, revision)}"
    )
    raise ConfigError(msg)


def hub_weights_file(snapshot: Path, repo: str, revision: str = "main") -> Path:
    """The weights file in a cached snapshot (safetensors preferred).

    Raises:
        ConfigError: The snapshot has ``config.json`` but no weights file.
    """
    for name in HUB_WEIGHT_FILES:
        if (snapshot / name).is_file():
            return snapshot / name
    msg = (
        f"timm encoder 'hf-hub:{repo}': {snapshot} has no "
        f"{' or '.join(HUB_WEIGHT_FILES)}. {_fill_hint(repo, revision)}"
    )
    raise ConfigError(msg)
