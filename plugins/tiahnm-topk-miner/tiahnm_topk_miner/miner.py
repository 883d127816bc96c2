"""The ``topk`` miner: train on bags whose highest-scored instances are masked out."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tiahnm.errors import ConfigError
from tiahnm.miners.base import FitContext, Miner

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.heads.base import MILHead, MILOutput

# Odd 64-bit constant (golden ratio) mixed into the seed so that the miner's stream
# differs from the loop's shuffling stream and from one round to the next.
_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


class TopKMiner(Miner):
    """Hard-instance masking with the student itself as the scorer.

    At every training step the current head scores the bag's instances (no gradient,
    eval mode; attention when the head has attention, else its default instance
    score). With probability ``p`` the ``ceil(drop_ratio * N)`` highest-scored
    instances are masked out, and ``floor(random_ratio * N)`` of the remaining ones
    are masked at random; the head is then trained on the instances left. At least
    one instance is always kept. This is MHIM-MIL's masking without the EMA teacher.

    Randomness comes from the miner's own generator, seeded in :meth:`on_fit_start`
    from the loop's seed and the round, and saved with the checkpoint.

    Args:
        drop_ratio (float): Fraction of instances masked among the highest scored,
            in ``[0, 1)``.
        p (float): Probability of masking the top instances at a step, in ``[0, 1]``.
        random_ratio (float): Fraction of instances masked at random, in ``[0, 1)``.

    Raises:
        ConfigError: If an option is out of range.
    """

    name = "topk"

    def __init__(
        self, *, drop_ratio: float = 0.1, p: float = 0.5, random_ratio: float = 0.0
    ) -> None:
        checks = (
            ("drop_ratio", drop_ratio, 0.0 <= drop_ratio < 1.0, "in [0, 1)"),
            ("p", p, 0.0 <= p <= 1.0, "in [0, 1]"),
            ("random_ratio", random_ratio, 0.0 <= random_ratio < 1.0, "in [0, 1)"),
        )
        for key, value, ok, allowed in checks:
            if not ok:
                msg = f"miner.options.{key} must be {allowed}, got {value!r}."
                raise ConfigError(msg)
        self.drop_ratio = float(drop_ratio)
        self.p = float(p)
        self.random_ratio = float(random_ratio)
        self._generator: torch.Generator | None = None

    def on_fit_start(self, ctx: FitContext) -> None:
        """Seed the miner's generator from the loop's seed and the round.

        Args:
            ctx (FitContext): The loop's state.
        """
        base = ctx.generator.initial_seed() if ctx.generator is not None else 0
        seed = (base + _SEED_MIX * (ctx.round + 1)) & _SEED_MASK
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def generator(self) -> torch.Generator:
        """The miner's CPU generator (seeded with 0 if used outside the loop)."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(_SEED_MIX & _SEED_MASK)
        return self._generator

    @staticmethod
    def score_kind(head: MILHead) -> str | None:
        """``attention`` when ``head`` gives it, else ``None`` (its default score)."""
        return "attention" if "attention" in head.supported_scores else None

    @torch.no_grad()
    def scores(self, head: MILHead, features: torch.Tensor) -> torch.Tensor:
        """Instance scores ``[N]`` of the bag under ``head`` in eval mode.

        Args:
            head (MILHead): The head being trained (its mode is restored).
            features (torch.Tensor): ``[N, D]`` instance features.

        Returns:
            torch.Tensor: Float scores, higher meaning more salient.
        """
        was_training = head.training
        head.eval()
        try:
            out = head(features)
            return head.instance_scores(out, self.score_kind(head)).float()
        finally:
            head.train(was_training)

    def keep_indices(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (ascending, on the CPU) of the instances to keep.

        Args:
            scores (torch.Tensor): ``[N]`` instance scores.

        Returns:
            torch.Tensor: ``[M]`` long indices with ``1 <= M <= N``.
        """
        n = int(scores.shape[0])
        drop = torch.zeros(n, dtype=torch.bool)
        budget = n - 1  # always keep one instance
        coin = float(torch.rand((), generator=self.generator))
        n_top = min(math.ceil(self.drop_ratio * n), budget)
        if coin < self.p and n_top > 0:
            top = torch.topk(scores.detach().float().cpu(), n_top).indices
            drop[top] = True
            budget -= n_top
        n_random = min(math.floor(self.random_ratio * n), budget)
        if n_random > 0:
            candidates = (~drop).nonzero().squeeze(1)
            order = torch.randperm(candidates.numel(), generator=self.generator)
            drop[candidates[order[:n_random]]] = True
        return (~drop).nonzero().squeeze(1)

    def forward(
        self, ctx: FitContext, features: torch.Tensor, label: torch.Tensor, step: int
    ) -> tuple[MILOutput, dict[str, torch.Tensor]]:
        """Score the bag, mask its top instances and forward the rest.

        Args:
            ctx (FitContext): The loop's state (``ctx.head`` is trained).
            features (torch.Tensor): ``[N, D]`` or ``[1, N, D]`` instance features.
            label (torch.Tensor): ``[1]`` bag label.
            step (int): Optimiser step (unused).

        Returns:
            tuple: The head's output on the kept instances and no extra losses.
        """
        head = ctx.head
        x = features[0] if features.dim() == 3 else features
        label_arg = label if head.needs_label_in_forward else None
        if x.shape[0] < 2:
            return head(x, label=label_arg), {}
        keep = self.keep_indices(self.scores(head, x)).to(x.device)
        self.record_masked(ctx, keep, int(x.shape[0]), step)
        return head(x, keep_idx=keep, label=label_arg), {}

    def record_masked(
        self, ctx: FitContext, keep: torch.Tensor, n: int, step: int
    ) -> None:
        """Record the masked instances of 2 sample bags: the report's own gallery.

        ``Miner.record_mined`` is all a plugin needs: each ``kind`` it records becomes
        one gallery of ``report.html``.

        Args:
            ctx (FitContext): The loop's state (``ctx.bag`` is the bag forwarded).
            keep (torch.Tensor): Indices kept.
            n (int): Instances in the bag.
            step (int): Optimiser step.
        """
        bag = ctx.bag
        samples = self.__dict__.setdefault("_samples", [])
        if bag is None or (bag.slide_id not in samples and len(samples) >= 2):
            return
        if bag.slide_id not in samples:
            samples.append(bag.slide_id)
        kept = set(keep.tolist())
        masked = [i for i in range(n) if i not in kept]
        if masked:
            self.record_mined(
                "masked instances (topk)", bag, masked, step=f"step {step}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The generator state, so that a resumed run masks the same instances."""
        state = super().state_dict()
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state (dict): A :meth:`state_dict`.
        """
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
