"""MHIM-MIL: masked hard instance mining (Tang et al., ICCV 2023; v2 arXiv 2509.11526).

A momentum (EMA) teacher, a copy of the student head, scores every instance of the
full bag without autograd. The miner masks the most salient instances (high-score
masking, optionally "randomly HAM"), optionally the least salient ones and a large
random fraction, and the student is trained on the rest (kept in ascending index
order). A consistency loss pulls the student's bag embedding towards the teacher's:

``L_con = -sum_d softmax(F_t / tau_t)_d * log_softmax(F_s / tau_s)_d``

(mean over rows for class-wise ``[1, C, E]`` embeddings such as DSMIL's), added as
``consistency_weight * L_con`` to the head's own loss. After every optimiser step the
teacher follows the student: ``theta_T <- m * theta_T + (1 - m) * theta_S``.

v2 adds the class-aware instance probability as masking score (``score="class_aware"``)
and the Global Recycle Network (``recycle=True``, see
:mod:`tiahnm.miners.recycle`): after masking, a random ``recycle_ratio`` of the kept
instances stays in the student input and the others are summarised into
``recycle_tokens`` learnable tokens appended to it (training only).

Evaluation uses the student alone on the full bag (done by the loop).

Teacher start. The paper starts the teacher from a trained baseline
(``teacher_init``). Without one, the first ``teacher_warmup`` epochs of the first
round train the student plainly (no masking, no consistency, no EMA); the teacher is
then a copy of that student and follows it by EMA. The default (``teacher_warmup``
unset) is 20% of ``train.epochs`` (at least 1, at most ``epochs - 1``) without
``teacher_init`` and 0 with it: with momentum 0.9999 an EMA teacher started from a
random head stays nearly random for thousands of steps. What was done is logged.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tiahnm.errors import ConfigError, DataError
from tiahnm.miners.base import FitContext, Miner
from tiahnm.miners.mhim_masking import (
    FUSIONS,
    build_mask,
    cosine_schedule,
    floor_count,
)
from tiahnm.miners.options import KEY
from tiahnm.miners.recycle import GlobalRecycleNetwork
from tiahnm.utils.options import Options, defaults, option, parse

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.heads.base import MILHead, MILOutput


SCORES = ("auto", "attention", "class_aware", "instance_logit")
SCHEDULES = ("constant", "cosine")
TEACHER_MODES = ("eval", "train")
STUDENT_INITS = ("none", "embed", "all")

#: Published settings (algorithms.md sec. 2.4). v1 presets copy the projection of the
#: teacher checkpoint into the student (``student_init="embed"``, the official
#: ``init_stu_type=fc``) when ``teacher_init`` is given. The v2 values are the middle
#: of the README grid (the per-dataset choices are not published).
PRESETS: dict[str, dict[str, Any]] = {
    "c16_abmil": {
        "mask_ratio_r": 0.5,
        "mask_ratio_l": 0.0,
        "mask_ratio_h": 0.01,
        "mask_ratio_hr": 0.5,
        "mask_h_schedule": "cosine",
        "consistency_weight": 0.1,
        "momentum": 0.9999,
        "momentum_schedule": "constant",
        "score": "attention",
        "student_init": "embed",
    },
    "c16_transmil": {
        "mask_ratio_r": 0.0,
        "mask_ratio_l": 0.8,
        "mask_ratio_h": 0.03,
        "mask_ratio_hr": 0.5,
        "mask_h_schedule": "cosine",
        "consistency_weight": 0.1,
        "momentum": 0.9999,
        "momentum_schedule": "cosine",
        "score": "attention",
        "head_fusion": "vote",
        "student_init": "embed",
    },
    "c16_dsmil": {
        "mask_ratio_r": 0.5,
        "mask_ratio_l": 0.0,
        "mask_ratio_h": 0.01,
        "mask_ratio_hr": 0.5,
        "mask_h_schedule": "cosine",
        "consistency_weight": 0.1,
        "momentum": 0.9999,
        "momentum_schedule": "constant",
        "score": "instance_logit",
        "student_init": "embed",
    },
    "tcga_abmil": {
        "mask_ratio_r": 0.7,
        "mask_ratio_l": 0.2,
        "mask_ratio_h": 0.02,
        "mask_ratio_hr": 1.0,
        "mask_h_schedule": "cosine",
        "consistency_weight": 0.5,
        "momentum": 0.9999,
        "momentum_schedule": "cosine",
        "score": "attention",
        "student_init": "embed",
    },
    "tcga_transmil": {
        "mask_ratio_r": 0.6,
        "mask_ratio_l": 0.2,
        "mask_ratio_h": 0.02,
        "mask_ratio_hr": 1.0,
        "mask_h_schedule": "cosine",
        "consistency_weight": 0.5,
        "momentum": 0.9999,
        "momentum_schedule": "constant",
        "score": "attention",
        "head_fusion": "vote",
        "student_init": "embed",
    },
    "tcga_dsmil": {
        "mask_ratio_r": 0.7,
        "mask_ratio_l": 0.2,
        "mask_ratio_h": 0.02,
        "mask_ratio_hr": 1.0,
        "mask_h_schedule": "cosine",
        "consistency_weight": 0.5,
        "momentum": 0.9999,
        "momentum_schedule": "cosine",
        "score": "instance_logit",
        "student_init": "embed",
    },
    "v2": {
        "mask_ratio_r": 0.0,
        "mask_ratio_l": 0.0,
        "mask_ratio_h": 0.03,
        "mask_ratio_hr": 1.0,
        "mask_h_schedule": "constant",
        "consistency_weight": 0.5,
        "momentum": 0.9997,
        "momentum_schedule": "constant",
        "score": "class_aware",
        "student_init": "none",
        "recycle": True,
        "recycle_ratio": 0.8,
        "recycle_tokens": 5,
        "recycle_momentum": 0.9999,
    },
}
# v2 with a DSMIL head: the official v2 code scores DSMIL by its max instance logit.
PRESETS["v2_dsmil"] = {**PRESETS["v2"], "score": "instance_logit"}


def _is_path(value: Any) -> bool:
    return bool(str(value))


@dataclass(frozen=True)
class MHIMOptions(Options):
    """Options of :class:`MHIMMiner` (``miner.options``); ratios are fractions *dropped*.

    A value comes from the explicit option, else from ``preset``, else from the default
    here (the paper's C16 AB-MIL setting: R-HAM with randomly HAM, beta_h decay). An
    explicit ``null`` means "not set".
    """

    preset: str | None = option(
        None,
        choices=tuple(PRESETS),
        help="Published settings (PRESETS): c16_abmil, c16_transmil, c16_dsmil, "
        "tcga_abmil, tcga_transmil, tcga_dsmil, v2, v2_dsmil.",
    )
    mask_ratio_h: float = option(
        0.01, low=0, high=1, help="beta_h, high-score fraction masked."
    )
    mask_ratio_hr: float = option(
        0.5,
        low=0,
        high=1,
        open_low=True,
        help='rho_h, "randomly HAM": the candidates are the top beta_h / rho_h and a '
        "random rho_h of them are masked (1.0 = plain HAM).",
    )
    mask_ratio_l: float = option(
        0.0, low=0, high=1, help="beta_l, low-score fraction masked."
    )
    mask_ratio_r: float = option(
        0.5, low=0, high=1, help="beta_r, random fraction masked."
    )
    mask_h_schedule: str = option(
        "cosine",
        choices=SCHEDULES,
        help="cosine: beta_h decays to 0 over the round's optimiser steps.",
    )
    score: str = option(
        "auto",
        choices=SCORES,
        help="Teacher score used for masking: attention (v1; multi-head attention "
        "fused by head_fusion), class_aware (v2: max over classes of the class "
        "probability of the attention-weighted instance), instance_logit (max over "
        "classes of the instance logits, MHIM's DSMIL rule) or auto (instance_logit "
        "for DSMIL, else attention when the head has attention, else class_aware).",
    )
    head_fusion: str = option(
        "vote",
        choices=FUSIONS,
        help="vote: each attention head votes for its own top-k, the k most voted "
        "win; mean: top-k of the head-mean score.",
    )
    consistency_weight: float = option(
        0.1, low=0, help="alpha, weight of the consistency loss (0 disables it)."
    )
    tau_t: float = option(0.1, low=0, open_low=True, help="Teacher temperature.")
    tau_s: float = option(1.0, low=0, open_low=True, help="Student temperature.")
    momentum: float = option(
        0.9999, low=0, high=1, help="EMA momentum m of the teacher."
    )
    momentum_schedule: str = option(
        "constant",
        choices=SCHEDULES,
        help="cosine: m rises to 1 over the round's optimiser steps.",
    )
    teacher_mode: str = option(
        "eval",
        choices=TEACHER_MODES,
        help="eval: no dropout while scoring (the paper's pseudocode); train: dropout "
        "active (the official code).",
    )
    teacher_init: str | Path | None = option(
        None,
        check=_is_path,
        expect="a file path or null",
        help="Checkpoint to initialise the teacher from: a best.pt of a baseline run "
        "(state_dict entry), a last.pt or a raw head state dict; default: a copy of "
        "the student.",
    )
    student_init: str = option(
        "embed",
        choices=STUDENT_INITS,
        help="With teacher_init, also copy into the student: embed (the projection "
        "only, v1's init_stu_type=fc; for encoder_mil the encoder and the inner "
        "head's projection), all or none of the checkpoint.",
    )
    teacher_warmup: int | None = option(
        None,
        low=0,
        help="Epochs of plain training at the start of the first round, after which "
        "the teacher starts as a copy of the student (default: 20% of the epochs "
        "without teacher_init, 0 with it; must be 0 with teacher_init).",
    )
    recycle: bool = option(False, help="Enable the v2 Global Recycle Network.")
    recycle_ratio: float = option(
        0.8,
        low=0,
        high=1,
        open_low=True,
        help="Fraction of the instances kept after masking that stay in the student "
        "input; the rest are recycled.",
    )
    recycle_tokens: int = option(5, low=1, help="Number k of global tokens.")
    recycle_momentum: float = option(
        0.9999, low=0, high=1, help="EMA momentum of the global tokens."
    )
    recycle_heads: int = option(8, low=1, help="Cross-attention heads.")
    recycle_dropout: float = option(0.1, low=0, high=1, help="Cross-attention dropout.")
    embed_dim: int | None = option(
        None,
        low=1,
        help="Width of the recycle network; default the head's embed_dim, which it "
        "must equal when recycle is on.",
    )

    @classmethod
    def prepare(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The preset's values under the explicit ones; ``null`` means not set."""
        known = {f.name for f in fields(cls)}
        explicit = {k: v for k, v in given.items() if v is not None or k not in known}
        preset = explicit.get("preset")
        base = PRESETS.get(preset, {}) if isinstance(preset, str) else {}
        return {**base, **explicit}


#: Values used when neither an explicit option nor the preset sets a key.
DEFAULTS: dict[str, Any] = {
    k: v for k, v in defaults(MHIMOptions).items() if k != "preset"
}


def consistency_loss(
    student: torch.Tensor, teacher: torch.Tensor, tau_t: float = 0.1, tau_s: float = 1.0
) -> torch.Tensor:
    """Soft-target cross-entropy between bag embeddings.

    ``-sum_d softmax(teacher / tau_t)_d * log_softmax(student / tau_s)_d`` per row of
    the last dimension, averaged over rows (``[1, E]`` has one row, ``[1, C, E]`` has
    C). Computed in float32; the teacher side carries no gradient.

    Args:
        student (torch.Tensor): Student embedding ``[..., E]``.
        teacher (torch.Tensor): Teacher embedding of the same shape.
        tau_t (float): Teacher temperature.
        tau_s (float): Student temperature.

    Returns:
        torch.Tensor: Scalar loss.
    """
    if student.shape != teacher.shape:
        msg = (
            f"Student and teacher embeddings differ: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}."
        )
        raise ValueError(msg)
    target = torch.softmax(teacher.detach().float() / tau_t, dim=-1)
    log_p = torch.log_softmax(student.float() / tau_s, dim=-1)
    return -(target * log_p).sum(dim=-1).mean()


def _extract_state_dict(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Head weights from a ``best.pt`` (``state_dict``), a ``last.pt`` or a raw dict."""
    for key in ("state_dict", "head"):
        inner = obj.get(key)
        if isinstance(inner, dict) and all(
            isinstance(v, torch.Tensor) for v in inner.values()
        ):
            return inner
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    msg = (
        f"{KEY}.teacher_init: {path} holds no head state dict (expected a 'state_dict' "
        "entry or a raw state dict)."
    )
    raise ConfigError(msg)


@torch.no_grad()
def ema_update(
    teacher_params: list[torch.Tensor],
    student_params: list[torch.Tensor],
    momentum: float,
) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for matching tensor lists."""
    if not teacher_params:
        return
    students = [s.detach() for s in student_params]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, students, alpha=1.0 - momentum)


class MHIMMiner(Miner):
    """MHIM-MIL miner: EMA teacher, masked hard instances, consistency, (v2) GRN.

    Takes the keyword options of :class:`MHIMOptions` (``miner.options``), each also an
    attribute of the miner: ``MHIMMiner(preset="v2", mask_ratio_h=0.02)``.
    """

    name = "mhim"
    #: Masking needs only instance scores: every task (MHIM-MIL v2 trains survival).
    supported_tasks = ("binary", "multiclass", "survival")

    def __init__(self, **options: Any) -> None:
        opts = parse(MHIMOptions, options, key=KEY)
        self.preset = opts.preset
        #: The resolved option values (explicit, else preset, else default).
        self.options = {k: v for k, v in asdict(opts).items() if k != "preset"}
        for name, value in self.options.items():
            setattr(self, name, value)
        self.teacher_init = self._check_teacher_start(opts)
        # Built in on_fit_start (before the loop creates the optimiser), with the
        # head's width unless embed_dim is given.
        self.grn: GlobalRecycleNetwork | None = None
        self.teacher: MILHead | None = None
        self.generator = torch.Generator()
        self.last_stats: dict[str, int | float] = {}
        self._resolved_score = "attention"
        self._teacher_params: list[torch.Tensor] = []
        self._student_params: list[torch.Tensor] = []
        self._teacher_buffers: list[torch.Tensor] = []
        self._student_buffers: list[torch.Tensor] = []
        self._pending_tokens: list[torch.Tensor] = []
        self._warmup_epochs = 0
        self._teacher_ready = True

    @staticmethod
    def _check_teacher_start(opts: MHIMOptions) -> str | None:
        """``teacher_init`` as a string, after checking it and ``teacher_warmup``."""
        init = opts.teacher_init
        if init is None:
            return None
        if not Path(init).is_file():
            msg = f"{KEY}.teacher_init: checkpoint {init} not found."
            raise ConfigError(msg)
        if opts.teacher_warmup:
            msg = (
                f"{KEY}.teacher_warmup must be 0 with teacher_init (the teacher "
                f"starts from the checkpoint), got {opts.teacher_warmup}."
            )
            raise ConfigError(msg)
        return str(init)

    def warmup_epochs(self, epochs: int) -> int:
        """Plain-training epochs before the teacher starts (see the module doc)."""
        if self.teacher_warmup is not None:
            return min(self.teacher_warmup, epochs)
        if self.teacher_init is not None:
            return 0
        return max(0, min(max(1, math.ceil(0.2 * epochs)), epochs - 1))

    # ------------------------------------------------------------------ schedules
    def mask_ratio_h_at(self, step: int, total: int) -> float:
        """beta_h at optimiser ``step`` of ``total`` (cosine decay to 0 if enabled)."""
        if self.mask_h_schedule == "cosine":
            return cosine_schedule(self.mask_ratio_h, 0.0, step, total)
        return self.mask_ratio_h

    def momentum_at(self, step: int, total: int) -> float:
        """Teacher momentum at optimiser ``step`` (cosine rise to 1 if enabled)."""
        if self.momentum_schedule == "cosine":
            return cosine_schedule(self.momentum, 1.0, step, total)
        return self.momentum

    # ---------------------------------------------------------------------- hooks
    def on_fit_start(self, ctx: FitContext) -> None:
        """Build the teacher (round 0), check the head, seed the masking generator."""
        head = ctx.head
        self._resolved_score = self._resolve_score(head)
        if self.recycle and self.embed_dim is None:
            self.embed_dim = head.embed_dim
        if self.recycle and head.embed_dim != self.embed_dim:
            msg = (
                f"{KEY}.embed_dim ({self.embed_dim}) must equal the head's embed_dim "
                f"({head.embed_dim}) when recycle is on."
            )
            raise ConfigError(msg)
        if self.teacher is not None and ctx.round > 0:
            return
        seed = ctx.generator.initial_seed() if ctx.generator is not None else 0
        self.generator = torch.Generator().manual_seed(seed + 0x4D48494D)
        if self.recycle:
            if self.grn is None:
                self.grn = GlobalRecycleNetwork(
                    self.embed_dim,
                    self.recycle_tokens,
                    n_heads=self.recycle_heads,
                    dropout=self.recycle_dropout,
                    momentum=self.recycle_momentum,
                    key=KEY,
                )
            # Seeded by the fit seed so that runs do not depend on the global RNG.
            self.grn.reset_parameters(self.generator)
        teacher = copy.deepcopy(head)
        teacher.requires_grad_(requires_grad=False)
        for p in teacher.parameters():
            p.grad = None
        if self.teacher_init is not None:
            self._load_teacher(teacher, head)
        teacher.train(self.teacher_mode == "train")
        self.teacher = teacher
        self._teacher_params = list(teacher.parameters())
        self._student_params = list(head.parameters())
        self._teacher_buffers = list(teacher.buffers())
        self._student_buffers = list(head.buffers())
        self._pending_tokens = []
        self._warmup_epochs = self.warmup_epochs(ctx.epochs)
        self._teacher_ready = self._warmup_epochs == 0
        self._log_teacher_start()

    def _log_teacher_start(self) -> None:
        if self.teacher_init is not None:
            logger.info("mhim: teacher starts from %s.", self.teacher_init)
        elif self._warmup_epochs > 0:
            logger.info(
                "mhim: no teacher_init; %d epoch(s) of plain training, then the "
                "teacher starts as a copy of the student (teacher_warmup).",
                self._warmup_epochs,
            )
        else:
            logger.warning(
                "mhim: no teacher_init and no warm-up; the teacher starts as a copy "
                "of the untrained student (momentum %s).",
                self.momentum,
            )

    def on_epoch_start(self, ctx: FitContext, epoch: int) -> None:
        """At the end of the warm-up, start the teacher from the student."""
        if self._teacher_ready or self.teacher is None or epoch < self._warmup_epochs:
            return
        with torch.no_grad():
            for t, s in zip(self._teacher_params, self._student_params, strict=True):
                t.copy_(s.detach())
            for t, s in zip(self._teacher_buffers, self._student_buffers, strict=True):
                t.copy_(s)
        self._teacher_ready = True
        logger.info(
            "mhim: warm-up done after %d epoch(s); masking against the teacher.", epoch
        )

    def _load_teacher(self, teacher: MILHead, head: MILHead) -> None:
        from tiahnm.runtime.checkpoint import load_checkpoint

        path = Path(str(self.teacher_init))
        try:
            obj = load_checkpoint(path)
        except DataError as exc:
            msg = f"{KEY}.teacher_init: {exc}"
            raise ConfigError(msg) from None
        state = _extract_state_dict(obj, path)
        try:
            teacher.load_state_dict(state)
        except RuntimeError as exc:
            msg = f"{KEY}.teacher_init: {path} does not fit the head ({exc})."
            raise ConfigError(msg) from None
        if self.student_init == "all":
            head.load_state_dict(state)
        elif self.student_init == "embed":
            with torch.no_grad():
                for p, src in zip(
                    head.projection_parameters(),
                    teacher.projection_parameters(),
                    strict=True,
                ):
                    p.copy_(src)

    def _resolve_score(self, head: MILHead) -> str:
        kind = head.mining_score() if self.score == "auto" else self.score
        if kind not in head.supported_scores:
            msg = (
                f"{KEY}.score: {type(head).__name__} does not give {kind!r} scores "
                f"(it supports {', '.join(head.supported_scores)})."
            )
            raise ConfigError(msg)
        return kind

    def teacher_scores(self, teacher: MILHead, out: MILOutput) -> torch.Tensor:
        """Masking scores ``[H, N]`` or ``[N]`` from the teacher's output."""
        kind = self._resolved_score
        if kind == "attention":
            if out.attention is None:
                msg = f"{KEY}.score: {type(teacher).__name__} returned no attention."
                raise ConfigError(msg)
            return out.attention.float()
        if kind == "instance_logit":
            if out.instance_logits is not None:
                return out.instance_logits.float().max(dim=-1).values
            per_class = [
                teacher.instance_scores(out, "instance_logit", target=c)
                for c in range(teacher.n_classes)
            ]
            return torch.stack(per_class).float().max(dim=0).values
        return teacher.instance_scores(out, "class_aware").float()

    def forward(
        self, ctx: FitContext, features: torch.Tensor, label: torch.Tensor, step: int
    ) -> tuple[MILOutput, dict[str, torch.Tensor]]:
        """Teacher scoring, masking, (v2) recycling, student forward, consistency."""
        head = ctx.head
        if not head.training or self.teacher is None or not self._teacher_ready:
            return super().forward(ctx, features, label, step)
        x = features[0] if features.dim() == 3 else features
        teacher = self.teacher
        teacher.train(self.teacher_mode == "train")
        with torch.inference_mode():
            t_out = teacher(x)
            scores = self.teacher_scores(teacher, t_out)
            target = t_out.bag_embedding
        # Leave inference mode: the index and target must be usable by autograd.
        scores, target = scores.clone(), target.clone()
        ratio_h = self.mask_ratio_h_at(step, ctx.total_steps)
        with torch.no_grad():
            mask = build_mask(
                scores,
                ratio_h=ratio_h,
                ratio_hr=self.mask_ratio_hr,
                ratio_l=self.mask_ratio_l,
                ratio_r=self.mask_ratio_r,
                generator=self.generator,
                fusion=self.head_fusion,
            )
        self._record_masked(ctx, mask.high_idx, scores, step)
        keep = mask.keep_idx
        extra_tokens = None
        n_recycled = 0
        if self.grn is not None:
            keep, extra_tokens, n_recycled = self._recycle(head, x, keep)
        out = head(
            x,
            keep_idx=keep,
            extra_tokens=extra_tokens,
            label=label if head.needs_label_in_forward else None,
        )
        self.last_stats = {
            "n": int(x.shape[0]),
            "n_kept": int(keep.numel()),
            "n_high": int(mask.high_idx.numel()),
            "n_low": int(mask.low_idx.numel()),
            "n_random": int(mask.random_idx.numel()),
            "n_recycled": n_recycled,
            "restored": mask.restored,
            "mask_ratio_h": ratio_h,
        }
        extra: dict[str, torch.Tensor] = {}
        if self.consistency_weight > 0:
            loss = consistency_loss(out.bag_embedding, target, self.tau_t, self.tau_s)
            extra["consistency"] = self.consistency_weight * loss
        return out, extra

    def _record_masked(
        self, ctx: FitContext, high: torch.Tensor, scores: torch.Tensor, step: int
    ) -> None:
        """Record the masked high-score instances of 3 positive sample bags (report).

        About 10 epochs per round are recorded (the first, every tenth, the last).
        """
        bag, n = ctx.bag, int(high.numel())
        if bag is None or n == 0 or bag.label < 1 or bag.origin == "generated":
            return
        sample = self.__dict__.setdefault("_sample_bags", [])
        if bag.slide_id not in sample:
            if len(sample) >= 3:
                return
            sample.append(bag.slide_id)
        epoch = step // max(ctx.steps_per_epoch, 1)
        if epoch % max(1, ctx.epochs // 10) and epoch != ctx.epochs - 1:
            return
        idx = high[high < bag.n_instances].cpu()
        flat = scores.detach().float().cpu()
        picked = flat.reshape(-1, flat.shape[-1]).max(0).values[idx]
        order = torch.argsort(picked, descending=True)
        self.record_mined(
            "masked high-score instances",
            bag,
            idx[order].tolist(),
            step=f"round {ctx.round} epoch {epoch}" if ctx.round else f"epoch {epoch}",
            scores=picked[order].tolist(),
        )

    def _recycle(
        self, head: MILHead, x: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Split ``keep`` into student instances and recycled ones summarised by GRN."""
        assert self.grn is not None
        n_keep = int(keep.numel())
        n_main = max(1, floor_count(self.recycle_ratio, n_keep))
        if n_main >= n_keep:
            return keep, None, 0
        perm = torch.randperm(n_keep, generator=self.generator).to(keep.device)
        main = keep.index_select(0, perm[:n_main]).sort().values
        recycled = keep.index_select(0, perm[n_main:])
        tokens = self.grn(head.embed(x.index_select(0, recycled)))
        self._pending_tokens.append(tokens.detach())
        return main, tokens, int(recycled.numel())

    def after_step(self, ctx: FitContext, step: int) -> None:
        """EMA update of the teacher (and of the recycle network's global tokens)."""
        if self.teacher is None or not self._teacher_ready:
            return
        m = self.momentum_at(step, ctx.total_steps)
        ema_update(self._teacher_params, self._student_params, m)
        with torch.no_grad():
            for t, s in zip(self._teacher_buffers, self._student_buffers, strict=True):
                t.copy_(s)
        if self.grn is not None and self._pending_tokens:
            z = torch.stack(self._pending_tokens).mean(0)
            self.grn.update_queries(z)
        self._pending_tokens = []

    # --------------------------------------------------------------- persistence
    def modules(self) -> dict[str, torch.nn.Module]:
        """The teacher (no trainable parameters) and the recycle network."""
        mods: dict[str, torch.nn.Module] = {}
        if self.teacher is not None:
            mods["teacher"] = self.teacher
        if self.grn is not None:
            mods["recycle"] = self.grn
        return mods

    def state_dict(self) -> dict[str, Any]:
        """Teacher and recycle weights plus the masking generator state."""
        state = super().state_dict()
        state["generator"] = self.generator.get_state()
        state["teacher_ready"] = self._teacher_ready
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (call after :meth:`on_fit_start`)."""
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._teacher_ready = bool(state.get("teacher_ready", True))


__all__ = [
    "DEFAULTS",
    "PRESETS",
    "MHIMMiner",
    "consistency_loss",
    "ema_update",
]
