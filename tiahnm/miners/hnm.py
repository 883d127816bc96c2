"""HNM-WSI: hard-negative encoder fine-tuning between MIL rounds (Huang et al. 2024).

Built on ItS2CLR's iterative loop (design notes, algorithms.md sec. 1). The head must
be ``encoder_mil`` (a patch encoder + a MIL head on image bags, instances stored as
flattened images ``[N, C*H*W]``); this miner manages its encoder:

* **MIL rounds** (the shared loop's ``train.rounds``): the encoder is frozen; its
  features of every training bag are extracted once per encoder version (in memory,
  keyed by a hash of the encoder state, and on disk under ``cache_dir/r<round>_<hash>``
  when given) and the inner MIL head trains on them, optionally on (positive,
  negative) bag pairs for the ``mirank`` loss. Validation and test bags go through the
  whole ``encoder_mil`` head, so the saved model is the encoder + head pair.
* **Between rounds** (``on_round_end``, the loop has loaded the round's best state):
  the inner head scores every training patch (``score``, default the instance
  probability); the scores become the pseudo-scores only when the round's validation
  score (``train.monitor``) is at least the best of the rounds before
  (``accept_if_improved``, as the official code; always without validation bags).
  Then the encoder is fine-tuned for ``finetune_epochs`` epochs with SupCon on patches
  pseudo-labelled with ``threshold``: each epoch iterates over the negative pool
  (hard negatives ``H(neg_ratio)``, plus the uncertain negatives unless
  ``mask_uncertain_neg``) in batches of ``batch_size * (1 - posi_batch_ratio)``
  patches, each joined by ``batch_size * posi_batch_ratio`` confident positives
  (step A, pair mode ``neg``); after ``warmup`` fine-tuning epochs a second step per
  batch uses ``batch_size * posi_query_ratio`` self-paced positives (top ``r`` of the
  positives, ``r`` ramping from ``spl_start`` to ``spl_end`` over ``spl_epochs``) with
  the same negatives (step B, pair mode ``pos``). Two augmented views per patch pass
  through the encoder and a projection MLP (``D -> D -> ReLU -> proj_dim``); SGD,
  each step through ``ctx.sub`` (the run's autocast precision, an fp16 gradient
  scaler, gradients averaged over ``torchrun`` processes; every process takes the
  same contrastive batch, since the loss couples it). A run killed during a
  fine-tuning stage resumes from the checkpoint before it and repeats the stage
  exactly (its generator and projector are in the miner's state).
  Finally the inner head is reset to its initial weights (``reinit_head``), so the
  next round retrains it on the re-extracted features.

Fine-tuning time, pool sizes and acceptance are in :attr:`HNMMiner.log` and in the
history rows of the following round (``hnm_*`` columns).

Deviations from the official code (recorded on purpose): fine-tuning runs in stages
between MIL rounds instead of one 100-epoch run with a MIL round every 5 epochs; step
B reuses step A's negative batch instead of a separate 486-patch loader; only
training bags are scored and fine-tuned on (HNM also uses validation slides); the
learning rate is constant; augmentation is SimCLR-style on small patches (random
resized crop with scale 0.3-1, flip, brightness/contrast/saturation jitter 0.4 with
p 0.8, grayscale p 0.2; no hue jitter or blur).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.encoders.base import state_sha256
from tiahnm.errors import ConfigError
from tiahnm.losses.supcon import supcon_loss
from tiahnm.miners.base import FitContext, Miner
from tiahnm.miners.hnm_selection import (
    Pools,
    build_pools,
    hard_negative_mask,
    spl_ratio,
)
from tiahnm.miners.options import KEY
from tiahnm.runtime.checkpoint import cpu_state_dict
from tiahnm.utils.io import atomic_path
from tiahnm.utils.options import Options, option, parse

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.data.bag import Bag
    from tiahnm.heads.base import MILHead, MILOutput

logger = logging.getLogger(__name__)

PAIR_POLICIES = ("none", "min", "cycle")
AUGMENTS = ("simclr", "flip", "none")
#: Added to the loop's seed, so the miner's stream differs from the shuffling stream.
SEED_OFFSET = 5024


def augment(
    x: torch.Tensor, generator: torch.Generator, mode: str = "simclr"
) -> torch.Tensor:
    """One random view of a batch of images ``[B, C, H, W]`` in ``[0, 1]``.

    All random numbers come from ``generator`` (CPU), so views are reproducible.

    Args:
        x (torch.Tensor): Images.
        generator (torch.Generator): Source of randomness.
        mode (str): ``simclr``, ``flip`` or ``none``.
    """
    if mode == "none":
        return x
    b, c = x.shape[:2]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(x.device)

    flip = (rand(b) < 0.5).view(b, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    if mode == "flip":
        return x
    area = 0.3 + 0.7 * rand(b)
    log_ratio = (rand(b) * 2 - 1) * math.log(4 / 3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (rand(b) * 2 - 1) * (1 - sx)
    ty = (rand(b) * 2 - 1) * (1 - sy)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    jitter = (rand(b) < 0.8).view(b, 1, 1, 1)
    bright = (0.6 + 0.8 * rand(b)).view(b, 1, 1, 1)
    contrast = (0.6 + 0.8 * rand(b)).view(b, 1, 1, 1)
    sat = (0.6 + 0.8 * rand(b)).view(b, 1, 1, 1)
    y = x * bright
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * contrast + mean
    if c == 3:
        gray = y.mean(dim=1, keepdim=True)
        y = (y - gray) * sat + gray
    x = torch.where(jitter, y, x)
    if c == 3:
        to_gray = (rand(b) < 0.2).view(b, 1, 1, 1)
        x = torch.where(to_gray, x.mean(dim=1, keepdim=True).expand_as(x), x)
    return x.clamp(0.0, 1.0)


def _nonempty(value: Any) -> bool:
    return bool(value)


@dataclass(frozen=True)
class HNMOptions(Options):
    """Options of :class:`HNMMiner` (``miner.options``)."""

    neg_ratio: float = option(
        0.05,
        low=0,
        high=1,
        open_low=True,
        help="Fraction rho of negative-slide patches kept as hard negatives (top by "
        "score; 0.05 is the paper's headline, 1.0 = ItS2CLR).",
    )
    threshold: float = option(
        0.3, low=0, high=1, help="Pseudo-label threshold tau on the scores."
    )
    score: str = option(
        "instance_prob",
        check=_nonempty,
        expect="an instance score kind",
        help="Instance score kind of the inner head used as pseudo-score.",
    )
    accept_if_improved: bool = option(
        default=True,
        help="Adopt new pseudo-scores only when the round's best validation score is "
        ">= the best so far (official behaviour).",
    )
    pair_bags: str = option(
        "min",
        choices=PAIR_POLICIES,
        help="Bag batches of the MIL rounds: none (one bag per step), min (HNM: "
        "positive and negative bags shuffled and paired index-wise, min(#pos, #neg) "
        "steps) or cycle (the shorter list is cycled so every bag is used each "
        "epoch).",
    )
    finetune_epochs: int = option(
        5, low=0, help="Encoder epochs between two MIL rounds."
    )
    batch_size: int = option(512, low=2, help="Patches per SupCon batch.")
    posi_batch_ratio: float = option(
        0.2, low=0, high=0.9, help="Share of confident positives in step A."
    )
    posi_query_ratio: float = option(
        0.05, low=0, high=0.9, help="Share of self-paced positives in step B."
    )
    warmup: int = option(
        1, low=0, help="Fine-tuning epochs before step B and the self-paced ramp."
    )
    spl_start: float = option(
        0.2, low=0, high=1, help="Initial self-paced positive ratio."
    )
    spl_start_neg: float = option(
        0.2, low=0, high=1, help="Initial uncertain-negative ratio after warmup."
    )
    spl_end: float = option(0.8, low=0, high=1, help="Final ratio of both.")
    spl_epochs: int = option(
        10, low=1, help="Fine-tuning epochs of the ramp after warmup."
    )
    mask_uncertain_neg: bool = option(
        default=True,
        help="Keep uncertain negatives out of the step-A pool and out of step A's "
        "denominators (HNM: true).",
    )
    temperature: float = option(0.07, low=0, open_low=True, help="SupCon temperature.")
    proj_dim: int = option(256, low=1, help="Output width of the projection MLP.")
    lr: float = option(
        0.01, low=0, open_low=True, help="SGD learning rate of the encoder."
    )
    weight_decay: float = option(1e-4, low=0, help="SGD weight decay.")
    momentum: float = option(0.0, low=0, high=1, help="SGD momentum.")
    augment: str = option(
        "simclr", choices=AUGMENTS, help="Patch augmentation: simclr, flip or none."
    )
    extract_batch_size: int = option(
        512, low=1, help="Patches per encoder forward when extracting."
    )
    cache_dir: str | Path | None = option(
        None, help="Also keep extracted features on disk here."
    )
    reinit_head: bool = option(
        default=True, help="Reset the inner head before each new round."
    )
    standardize: bool = option(
        default=True,
        help="Standardise the features per dimension with the mean and standard "
        "deviation of the training patches of each encoder version (stored in the "
        "encoder_mil head, so evaluation uses them too). A randomly initialised "
        "encoder gives features of tiny spread (std ~0.003 per dimension for "
        "small_cnn on MNIST) on which the MIL head does not train; standardised, a "
        "linear probe on them reaches AUC 0.93.",
    )


class HNMMiner(Miner):
    """Hard-negative SupCon fine-tuning of the patch encoder between MIL rounds.

    Use with ``head.name: encoder_mil`` (inner head ``dsmil``), ``train.rounds >= 2``
    (round 1 trains the MIL head on the initial encoder, each later round on the
    fine-tuned one) and, for HNM's full recipe, ``losses: [{name: mirank, weight:
    0.1}]``.

    Takes the keyword options of :class:`HNMOptions` (``miner.options``), each also an
    attribute of the miner (``cache_dir`` as a :class:`~pathlib.Path` or None).
    """

    name = "hnm"
    #: Hard negatives are instances of negative (label 0) bags: binary only.
    supported_tasks = ("binary",)

    def __init__(self, **options: Any) -> None:
        opts = parse(HNMOptions, options, key=KEY)
        for f in fields(opts):
            setattr(self, f.name, getattr(opts, f.name))
        self.cache_dir = Path(opts.cache_dir) if opts.cache_dir else None

        self.generator: torch.Generator | None = None
        self.projector: nn.Module | None = None
        self.scores: dict[str, torch.Tensor] | None = None
        self.best_val: tuple[float, ...] | None = None
        self.finetune_epoch = 0
        self.log: list[dict[str, float]] = []
        self.extract_seconds = 0.0
        self._init_head: dict[str, torch.Tensor] | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_version = ""
        self._stats_version = ""

    # -------------------------------------------------------------- loop hooks
    def on_fit_start(self, ctx: FitContext) -> None:
        """Check the head, freeze its encoder, seed, build the projection MLP."""
        head = ctx.head
        if not head.encodes_images:
            msg = (
                f"miner hnm needs head encoder_mil (a patch encoder + MIL head on image "
                f"bags); got {type(head).__name__}."
            )
            raise ConfigError(msg)
        if self.score not in head.supported_scores:
            msg = (
                f"{KEY}.score {self.score!r} is not given by head "
                f"{type(head.head).__name__}; it supports "
                f"{', '.join(head.supported_scores)}."
            )
            raise ConfigError(msg)
        head.encoder.requires_grad_(requires_grad=False)
        # Frozen between fine-tuning stages: validation need not re-encode each epoch.
        head.enable_eval_cache()
        if self.generator is None:
            base = ctx.generator.initial_seed() if ctx.generator is not None else 0
            self.generator = torch.Generator().manual_seed((base + SEED_OFFSET) % 2**63)
        if self._init_head is None:
            self._init_head = cpu_state_dict(head.head)
        if self.projector is None:
            dim = _out_dim(head)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            torch_state = torch.get_rng_state()
            torch.manual_seed(seed)
            self.projector = nn.Sequential(
                nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, self.proj_dim)
            )
            torch.set_rng_state(torch_state)

    def n_steps(self, bags: Sequence[Bag]) -> int:
        """Bag pairs (as :meth:`batches` forms them) or bags per epoch."""
        n_pos = sum(1 for b in bags if b.label == 1)
        n_neg = sum(1 for b in bags if b.label == 0)
        if self.pair_bags == "none" or not n_pos or not n_neg:
            return len(bags)
        return max(n_pos, n_neg) if self.pair_bags == "cycle" else min(n_pos, n_neg)

    def batches(
        self, ctx: FitContext, bags: Sequence[Bag], generator: torch.Generator
    ) -> Iterator[list[Bag]]:
        """Feature bags of the current encoder: single, or (positive, negative) pairs."""
        feats = self.mil_features(ctx, bags)
        fbags = [replace(b, features=feats[b.slide_id]) for b in bags]
        pos = [b for b in fbags if b.label == 1]
        neg = [b for b in fbags if b.label == 0]
        if self.pair_bags == "none" or not pos or not neg:
            yield from super().batches(ctx, fbags, generator)
            return
        pos_order = torch.randperm(len(pos), generator=generator).tolist()
        neg_order = torch.randperm(len(neg), generator=generator).tolist()
        n = min(len(pos), len(neg))
        if self.pair_bags == "cycle":
            n = max(len(pos), len(neg))
        for i in range(n):
            yield [pos[pos_order[i % len(pos)]], neg[neg_order[i % len(neg)]]]

    def forward(
        self, ctx: FitContext, features: torch.Tensor, label: torch.Tensor, step: int
    ) -> tuple[MILOutput, dict[str, torch.Tensor]]:
        """The inner head on the encoder features :meth:`batches` yields."""
        inner = ctx.head.head
        out = inner(features, label=label if inner.needs_label_in_forward else None)
        return out, {}

    def on_round_end(self, ctx: FitContext, train_bags: Sequence[Bag]) -> list[Bag]:
        """Score, accept pseudo-scores, fine-tune the encoder, reset the inner head."""
        if self.generator is None:  # called without on_fit_start (direct use)
            self.on_fit_start(ctx)
        real = [b for b in train_bags if b.origin != "generated"]
        new_scores = self.score_instances(ctx, real)
        val = ctx.round_best_score
        monitored = ctx.monitor is not None and val is not None
        accepted = (
            self.scores is None
            or not self.accept_if_improved
            or not monitored
            or self.best_val is None
            or tuple(val) >= self.best_val
        )
        if accepted:
            self.scores = new_scores
            if monitored:
                self.best_val = tuple(float(v) for v in val)
        assert self.scores is not None
        self._record_hard_negatives(ctx, real)
        stats = self.finetune(ctx, real, self.scores)
        ctx.head.encoder.requires_grad_(requires_grad=False)
        if self.reinit_head and self._init_head is not None:
            ctx.head.head.load_state_dict(self._init_head)
        row = {"hnm_round": float(ctx.round), "hnm_accepted": float(accepted), **stats}
        row["hnm_finetune_seconds_total"] = sum(
            r["hnm_finetune_seconds"] for r in self.log
        ) + float(stats["hnm_finetune_seconds"])
        self.log.append(row)
        logger.info(
            "hnm: round %d: pseudo-scores %s, %d hard negatives, %d positives, "
            "%d SupCon steps in %.2f s.",
            ctx.round,
            "accepted" if accepted else "kept",
            int(stats["hnm_hard_negatives"]),
            int(stats["hnm_positives"]),
            int(stats["hnm_finetune_steps"]),
            stats["hnm_finetune_seconds"],
        )
        return []

    def _record_hard_negatives(
        self, ctx: FitContext, bags: Sequence[Bag], per_round: int = 24
    ) -> None:
        """Record the round's top hard negatives ``H(neg_ratio)`` by score (report)."""
        assert self.scores is not None
        neg = [b for b in bags if b.label == 0 and b.slide_id in self.scores]
        if not neg:
            return
        s_all = np.concatenate([self.scores[b.slide_id].double().numpy() for b in neg])
        keep = hard_negative_mask(s_all, np.zeros(len(s_all)), self.neg_ratio)
        starts = np.cumsum([0] + [b.n_instances for b in neg])
        top = np.flatnonzero(keep)[np.argsort(-s_all[keep], kind="stable")][:per_round]
        for b_i, bag in enumerate(neg):
            mine = top[(top >= starts[b_i]) & (top < starts[b_i + 1])]
            if mine.size:
                self.record_mined(
                    "hard negatives (encoder fine-tuning)",
                    bag,
                    (mine - starts[b_i]).tolist(),
                    step=f"round {ctx.round}",
                    scores=s_all[mine].tolist(),
                )

    def epoch_stats(self) -> dict[str, float]:
        """The last fine-tuning stage's numbers and the extraction time so far."""
        row = dict(self.log[-1]) if self.log else {}
        row["hnm_extract_seconds"] = self.extract_seconds
        return row

    def state_dict(self) -> dict[str, Any]:
        """Generator, pseudo-scores, projection MLP, counters (checkpointed)."""
        return {
            "generator": self.generator.get_state() if self.generator else None,
            "projector": self.projector.state_dict() if self.projector else None,
            "scores": dict(self.scores) if self.scores is not None else None,
            "best_val": list(self.best_val) if self.best_val is not None else None,
            "finetune_epoch": self.finetune_epoch,
            "log": [dict(r) for r in self.log],
            "init_head": self._init_head,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`on_fit_start`)."""
        if state.get("generator") is not None:
            self.generator = self.generator or torch.Generator()
            self.generator.set_state(state["generator"])
        if state.get("projector") is not None and self.projector is not None:
            self.projector.load_state_dict(state["projector"])
        scores = state.get("scores")
        self.scores = dict(scores) if scores is not None else None
        best = state.get("best_val")
        self.best_val = tuple(best) if best is not None else None
        self.finetune_epoch = int(state.get("finetune_epoch", 0))
        self.log = [dict(r) for r in state.get("log", [])]
        if state.get("init_head") is not None:
            self._init_head = state["init_head"]

    # -------------------------------------------------------------- features
    @torch.no_grad()
    def features(self, ctx: FitContext, bags: Sequence[Bag]) -> dict[str, torch.Tensor]:
        """Encoder features of ``bags`` (``slide_id -> [N, D]``), cached per version.

        The version is a hash of the encoder's state, so a changed encoder (fine-tuned,
        or restored from a checkpoint) is always re-extracted.
        """
        encoder = ctx.head.encoder
        version = state_sha256(encoder)[:16]
        if version != self._cache_version:
            self._cache, self._cache_version = {}, version
        missing = [b for b in bags if b.slide_id not in self._cache]
        if not missing:
            return self._cache
        t0 = time.perf_counter()
        folder = self.cache_dir / f"r{ctx.round}_{version}" if self.cache_dir else None
        was_training = encoder.training
        encoder.eval()
        try:
            for bag in missing:
                path = folder / f"{_safe(bag.slide_id)}.pt" if folder else None
                if path is not None and path.is_file():
                    feats = torch.load(path, map_location="cpu", weights_only=True)
                else:
                    feats = self._encode(ctx, bag.features)
                    if path is not None:
                        with atomic_path(path) as tmp:
                            torch.save(feats, tmp)
                self._cache[bag.slide_id] = feats
        finally:
            encoder.train(was_training)
        self.extract_seconds += time.perf_counter() - t0
        return self._cache

    @torch.no_grad()
    def mil_features(
        self, ctx: FitContext, bags: Sequence[Bag]
    ) -> dict[str, torch.Tensor]:
        """Features the inner head sees: :meth:`features`, standardised if asked.

        The statistics are taken once per encoder version, from the bags of the
        first call of that version (the training bags: :meth:`batches` runs before
        any scoring in a round), and stored in the head for evaluation.
        """
        feats = self.features(ctx, bags)
        if not self.standardize:
            return {b.slide_id: feats[b.slide_id] for b in bags}
        if self._stats_version != self._cache_version:
            rows = [feats[b.slide_id] for b in bags if b.n_instances]
            if rows:
                flat = torch.cat(rows)
                std = flat.std(dim=0) if flat.shape[0] > 1 else torch.ones_like(flat[0])
                ctx.head.set_feature_stats(flat.mean(dim=0), std.clamp_min(1e-6))
                self._stats_version = self._cache_version
        return {
            b.slide_id: ctx.head.normalize_features(feats[b.slide_id]) for b in bags
        }

    def _encode(self, ctx: FitContext, rows: torch.Tensor) -> torch.Tensor:
        shape = ctx.head.image_shape
        out = []
        for start in range(0, rows.shape[0], self.extract_batch_size):
            chunk = rows[start : start + self.extract_batch_size].to(ctx.device)
            out.append(ctx.head.encoder(chunk.reshape(-1, *shape)).float().cpu())
        if not out:
            return torch.zeros(0, _out_dim(ctx.head))
        return torch.cat(out)

    @torch.no_grad()
    def score_instances(
        self, ctx: FitContext, bags: Sequence[Bag]
    ) -> dict[str, torch.Tensor]:
        """Pseudo-scores ``[N]`` of every bag from the inner head in eval mode."""
        feats = self.mil_features(ctx, bags)
        inner = ctx.head.head
        was_training = inner.training
        inner.eval()
        try:
            scores = {}
            for bag in bags:
                if bag.n_instances == 0:
                    scores[bag.slide_id] = torch.zeros(0)
                    continue
                out = inner(feats[bag.slide_id].to(ctx.device))
                s = inner.instance_scores(out, self.score)[: bag.n_instances]
                scores[bag.slide_id] = s.float().cpu()
        finally:
            inner.train(was_training)
        return scores

    # -------------------------------------------------------------- fine-tuning
    def pools(
        self, bags: Sequence[Bag], scores: dict[str, torch.Tensor], epoch: int
    ) -> tuple[Pools, np.ndarray, np.ndarray, np.ndarray]:
        """Pools of fine-tuning epoch ``epoch`` over the flat patch table.

        Returns:
            tuple: ``(pools, bag index [M], instance index [M], bag labels [M])``.
        """
        s_all = np.concatenate(
            [np.zeros(0)] + [scores[b.slide_id].double().numpy() for b in bags]
        )
        sizes = [b.n_instances for b in bags]
        y_all = np.repeat(np.asarray([b.label for b in bags], dtype=np.int64), sizes)
        b_all = np.repeat(np.arange(len(bags), dtype=np.int64), sizes)
        i_all = np.concatenate(
            [np.zeros(0, dtype=np.int64)]
            + [np.arange(n, dtype=np.int64) for n in sizes]
        )
        r_pos = spl_ratio(
            epoch,
            start=self.spl_start,
            end=self.spl_end,
            warmup=self.warmup,
            ramp_epochs=self.spl_epochs,
        )
        r_neg = 0.0
        if epoch >= self.warmup:
            r_neg = spl_ratio(
                epoch,
                start=self.spl_start_neg,
                end=self.spl_end,
                warmup=self.warmup,
                ramp_epochs=self.spl_epochs,
            )
        pools = build_pools(
            s_all,
            y_all,
            threshold=self.threshold,
            neg_ratio=self.neg_ratio,
            pos_ratio=r_pos,
            uncertain_ratio=r_neg,
            include_uncertain=not self.mask_uncertain_neg,
        )
        return pools, b_all, i_all, y_all

    def finetune(
        self, ctx: FitContext, bags: Sequence[Bag], scores: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        """``finetune_epochs`` SupCon epochs of the encoder; returns the stage's numbers."""
        assert self.generator is not None and self.projector is not None
        encoder, g = ctx.head.encoder, self.generator
        self.projector.to(ctx.device)
        encoder.requires_grad_(requires_grad=True)
        params = [*encoder.parameters(), *self.projector.parameters()]
        opt = torch.optim.SGD(
            params, lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum
        )
        n_pos_b = int(self.batch_size * self.posi_batch_ratio)
        n_neg_b = self.batch_size - n_pos_b
        n_query = int(self.batch_size * self.posi_query_ratio)
        steps, loss_sum, last = 0, 0.0, None
        was_training = encoder.training
        encoder.train()
        self.projector.train()
        t0 = time.perf_counter()
        try:
            for _ in range(self.finetune_epochs):
                epoch = self.finetune_epoch
                last, b_all, i_all, y_all = self.pools(bags, scores, epoch)
                negs = last.negatives[_perm(len(last.negatives), g)]
                pos_a = _Cycle(last.positives, g)
                pos_b = _Cycle(last.spl_positives, g)
                for start in range(0, len(negs), n_neg_b):
                    chunk = negs[start : start + n_neg_b]
                    idx = np.concatenate([chunk, pos_a.take(n_pos_b)])
                    loss_sum += self._step(
                        ctx, opt, bags, idx, last.labels, y_all, b_all, i_all, "neg"
                    )
                    steps += 1
                    if epoch >= self.warmup and n_query and len(pos_b):
                        idx = np.concatenate([pos_b.take(n_query), chunk])
                        loss_sum += self._step(
                            ctx, opt, bags, idx, last.labels, y_all, b_all, i_all, "pos"
                        )
                        steps += 1
                self.finetune_epoch += 1
        finally:
            # no stale SupCon gradients reach the next MIL round
            opt.zero_grad(set_to_none=True)
            encoder.train(was_training)
            encoder.requires_grad_(requires_grad=False)
        seconds = time.perf_counter() - t0
        return {
            "hnm_finetune_seconds": seconds,
            "hnm_finetune_steps": float(steps),
            "hnm_supcon_loss": loss_sum / steps if steps else math.nan,
            "hnm_hard_negatives": float(len(last.hard_negatives)) if last else 0.0,
            "hnm_negatives": float(len(last.negatives)) if last else 0.0,
            "hnm_positives": float(len(last.positives)) if last else 0.0,
            "hnm_spl_positives": float(len(last.spl_positives)) if last else 0.0,
            "hnm_finetune_epoch": float(self.finetune_epoch),
        }

    def _step(
        self,
        ctx: FitContext,
        opt: torch.optim.Optimizer,
        bags: Sequence[Bag],
        idx: np.ndarray,
        labels: np.ndarray,
        bag_labels: np.ndarray,
        bag_of: np.ndarray,
        inst_of: np.ndarray,
        pair_mode: str,
    ) -> float:
        assert self.generator is not None and self.projector is not None
        shape = ctx.head.image_shape
        images = torch.stack(
            [bags[int(bag_of[i])].features[int(inst_of[i])] for i in idx]
        ).reshape(-1, *shape)
        images = images.to(ctx.device, dtype=torch.float32)
        views = torch.cat(
            [augment(images, self.generator, self.augment) for _ in range(2)]
        )
        with ctx.sub.autocast():
            z = self.projector(ctx.head.encoder(views))
        z = torch.stack(z.float().split(len(idx)), dim=1)
        loss = supcon_loss(
            z,
            torch.as_tensor(labels[idx], device=ctx.device),
            bag_labels=torch.as_tensor(bag_labels[idx], device=ctx.device),
            pair_mode=pair_mode,
            mask_uncertain_neg=self.mask_uncertain_neg and pair_mode == "neg",
            temperature=self.temperature,
            base_temperature=self.temperature,
        )
        params = [p for group in opt.param_groups for p in group["params"]]
        return ctx.sub.step(opt, params, loss)


class _Cycle:
    """Endless reshuffled pass over an index array."""

    def __init__(self, items: np.ndarray, generator: torch.Generator) -> None:
        self.items = np.asarray(items, dtype=np.int64)
        self.generator = generator
        self.order = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def take(self, n: int) -> np.ndarray:
        """Next ``n`` items (none when the array is empty)."""
        if not len(self.items) or n <= 0:
            return np.zeros(0, dtype=np.int64)
        while len(self.order) < n:
            perm = self.items[_perm(len(self.items), self.generator)]
            self.order = np.concatenate([self.order, perm])
        out, self.order = self.order[:n], self.order[n:]
        return out


def _perm(n: int, generator: torch.Generator) -> np.ndarray:
    return torch.randperm(n, generator=generator).numpy()


def _out_dim(head: MILHead) -> int:
    """Width of the patch encoder's features (declared by image heads)."""
    return head.feature_dim


def _safe(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}_{digest}"


__all__ = ["AUGMENTS", "PAIR_POLICIES", "HNMMiner", "augment"]
