"""A patch encoder and a MIL head trained end to end on bags of small images."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tiahnm.errors import ConfigError
from tiahnm.heads.base import MILHead, MILOutput


class EncoderMIL(MILHead):
    """``encoder -> head``, trained together (Ilse et al. MNIST-bags / UCSB setting).

    Instances are images stored flattened in the bag (``[N, C*H*W]``, as the
    ``mnist_bags`` and image-patch sources give them), so every part of tiahnm that
    handles ``[N, D]`` bags works unchanged; the head reshapes them to
    ``[N, C, H, W]``, encodes them, and hands the features to the inner head.
    ``keep_idx`` drops instances before the encoder, so masking miners save encoder
    work too. Scores, attention and losses are the inner head's. (MHIM's recycle
    network projects raw instances, so it needs a feature head, not this one.)

    Between the encoder and the inner head sit two buffers, ``feature_mean`` and
    ``feature_std`` (identity until set with :meth:`set_feature_stats`): a miner that
    trains the inner head on extracted features (``hnm``) standardises them with
    training-set statistics and stores those here, so validation, test and a saved
    model see the features the head was trained on. Once set, they replace the
    ``feature_norm`` BatchNorm (a miner's own standardisation is never applied twice).

    With :meth:`enable_eval_cache` (the ``hnm`` miner turns it on: its encoder is
    frozen during MIL rounds), the encoder features of a whole bag computed in eval
    mode without autograd are kept and reused while neither the bag tensor nor any
    encoder parameter or buffer has changed in place (tracked by their version
    counters), so per-epoch validation does not re-encode the same images.

    Args:
        in_dim (int): ``C * H * W``.
        n_classes (int): Number of classes.
        image_shape (Sequence[int] | None): ``(C, H, W)``; default: one channel,
            square (``in_dim`` must then be a square number).
        encoder (str): Registered encoder (``small_cnn``, ``torchvision:resnet18``
            ...).
        encoder_options (Mapping | None): Options of the encoder.
        weights (str | None): Local weights file of the encoder (or ``random-init``).
        head (str): Registered MIL head on the encoder's features.
        head_options (Mapping | None): Options of that head.
        freeze_encoder (bool): Keep the encoder fixed (features only).
        feature_norm (str): ``batch`` (default): a ``BatchNorm1d`` over the
            instances of the bag standardises each encoder feature before the inner
            head (running statistics in eval mode); ``none``: the raw encoder
            features (the behaviour before issue 18; use it to load models saved
            then). Without it a randomly initialised ``small_cnn`` gives features
            that vary little between instances (std about a quarter of their mean)
            and end-to-end training stays at the prior (training loss 0.693; see
            docs/benchmarks.md, issue 18).
    """

    encodes_images = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        image_shape: Sequence[int] | None = None,
        encoder: str = "small_cnn",
        encoder_options: Mapping[str, Any] | None = None,
        weights: str | None = None,
        head: str = "abmil_gated",
        head_options: Mapping[str, Any] | None = None,
        freeze_encoder: bool = False,
        feature_norm: str = "batch",
    ) -> None:
        # no shared in_dim -> embed_dim layer: the encoder and inner head embed
        super().__init__(in_dim, n_classes, shared_embed=False)
        shape = tuple(image_shape) if image_shape is not None else _square(in_dim)
        if len(shape) != 3 or math.prod(shape) != in_dim:
            msg = (
                f"head.options.image_shape {list(shape)} does not match features of "
                f"width {in_dim} (C * H * W must equal it)."
            )
            raise ConfigError(msg)
        from tiahnm.encoders.build import build_encoder
        from tiahnm.plugins import get_registry

        opts = dict(encoder_options or {})
        if encoder == "small_cnn":
            opts.setdefault("in_channels", shape[0])
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        info = build_encoder(encoder, weights=weights, options=opts, seed=seed)
        self.encoder = info.module.train()
        self.encoder.requires_grad_(not freeze_encoder)
        self.image_shape = shape
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.head = get_registry("head").create(
            head,
            info.out_dim,
            n_classes,
            key="head.options.head_options",
            **dict(head_options or {}),
        )
        self.embed_dim = self.head.embed_dim
        self.supported_scores = self.head.supported_scores
        self.default_eval_score = self.head.default_eval_score
        self.needs_label_in_forward = self.head.needs_label_in_forward
        self.feature_dim = int(info.out_dim)
        if feature_norm not in ("batch", "none"):
            msg = (
                f"head.options.feature_norm must be 'batch' or 'none', not "
                f"{feature_norm!r}."
            )
            raise ConfigError(msg)
        self.feature_bn: torch.nn.Module = (
            torch.nn.BatchNorm1d(info.out_dim)
            if feature_norm == "batch"
            else torch.nn.Identity()
        )
        self.register_buffer("feature_mean", torch.zeros(info.out_dim))
        self.register_buffer("feature_std", torch.ones(info.out_dim))
        # set by set_feature_stats: the stored statistics replace feature_bn
        self.register_buffer("stats_set", torch.zeros((), dtype=torch.bool))
        self._eval_cache: dict[tuple, tuple] | None = None
        self._register_load_state_dict_pre_hook(_legacy_state, with_module=True)

    def enable_eval_cache(self, *, enabled: bool = True) -> None:
        """Reuse encoder features of unchanged bags in eval mode (see class doc).

        Enabling keeps an existing cache; disabling drops it.
        """
        if not enabled:
            self._eval_cache = None
        elif self._eval_cache is None:
            self._eval_cache = {}

    def _encoder_version(self) -> tuple[int, ...]:
        tensors = [*self.encoder.parameters(), *self.encoder.buffers()]
        return tuple(t._version for t in tensors)

    def _encode_bag(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features of all rows of ``x``, from the eval cache when valid."""
        usable = (
            self._eval_cache is not None
            and not self.training
            and not self.encoder.training
            and not torch.is_grad_enabled()
        )
        if not usable:
            return self.encoder(x.reshape(x.shape[0], *self.image_shape))
        assert self._eval_cache is not None
        # The entry holds ``x`` itself, so its storage cannot be freed and reused by
        # another tensor while the key (its address) is in the cache.
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
        version = self._encoder_version()
        hit = self._eval_cache.get(key)
        if hit is not None and hit[0] == version and hit[2] == x._version:
            return hit[3]
        feats = self.encoder(x.reshape(x.shape[0], *self.image_shape))
        self._eval_cache[key] = (version, x, x._version, feats)
        return feats

    def _feature_norm(self, feats: torch.Tensor) -> torch.Tensor:
        """``feature_bn``; a one-instance batch in training uses the running stats."""
        bn = self.feature_bn
        if isinstance(bn, torch.nn.BatchNorm1d) and bn.training and len(feats) < 2:
            return torch.nn.functional.batch_norm(
                feats, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps
            )
        return bn(feats)

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise encoder features as ``(f - mean) / std`` before the head."""
        self.feature_mean.copy_(mean.reshape(-1))
        self.feature_std.copy_(std.reshape(-1))
        self.stats_set.fill_(1)

    def normalize_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Apply the stored statistics to encoder output ``[N, D]`` (its device, dtype)."""
        return (feats - self.feature_mean.to(feats)) / self.feature_std.to(feats)

    def forward(
        self,
        x: torch.Tensor,
        *,
        keep_idx: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
    ) -> MILOutput:
        """Encode the (kept) images, then run the inner head on their features."""
        if x.dim() == 3 and x.shape[0] == 1:
            x = x[0]
        if keep_idx is not None:
            x = x.index_select(0, keep_idx)
        feats = self._encode_bag(x)
        if not bool(self.stats_set):
            feats = self._feature_norm(feats)
        feats = self.normalize_features(feats)
        return self.head(feats, extra_tokens=extra_tokens, label=label)

    def loss(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        """The inner head's loss."""
        return self.head.loss(out, label)

    def set_eval_score(self, kind: str) -> None:
        """Choose the evaluated score of the inner head (and of this wrapper)."""
        self.head.set_eval_score(kind)
        self.default_eval_score = kind

    def projection_parameters(self) -> list[torch.nn.Parameter]:
        """The encoder's parameters, then the inner head's projection."""
        return [*self.encoder.parameters(), *self.head.projection_parameters()]

    def loss_terms(self, out: MILOutput) -> list[tuple[float, torch.Tensor]]:
        """The inner head's loss streams."""
        return self.head.loss_terms(out)

    def instance_scores(
        self, out: MILOutput, kind: str | None = None, *, target: int = 1
    ) -> torch.Tensor:
        """The inner head's instance scores."""
        return self.head.instance_scores(out, kind, target=target)


def _legacy_state(
    module: EncoderMIL,
    state_dict: dict[str, Any],
    prefix: str,
    _metadata: Any,
    _strict: bool,  # noqa: FBT001 (torch calls the hook positionally)
    _missing: list[str],
    _unexpected: list[str],
    error_msgs: list[str],
) -> None:
    """Load models saved before ``feature_norm`` (no ``stats_set`` buffer)."""
    if prefix + "stats_set" in state_dict or prefix + "feature_mean" not in state_dict:
        return
    mean, std = state_dict[prefix + "feature_mean"], state_dict[prefix + "feature_std"]
    state_dict[prefix + "stats_set"] = torch.tensor(
        bool((mean != 0).any() or (std != 1).any())
    )
    if isinstance(module.feature_bn, torch.nn.BatchNorm1d):
        error_msgs.append(
            "this model was saved before head.options.feature_norm existed (its "
            "encoder features are not batch-normalised); load it with "
            "head.options.feature_norm: none"
        )


def _square(in_dim: int) -> tuple[int, int, int]:
    side = math.isqrt(in_dim)
    if side * side != in_dim:
        msg = (
            f"features of width {in_dim} are not a square one-channel image; give "
            "head.options.image_shape: [C, H, W]."
        )
        raise ConfigError(msg)
    return (1, side, side)
