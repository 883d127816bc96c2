"""Deep instance-level hard negative mining (Li et al., MICCAI 2019).

After a training round (the loop has loaded the round's best state), the miner

1. predicts every real negative training bag with the head in eval mode; the *false
   positives* are those whose positive probability (``1 - p(class 0)``) is
   ``>= fp_threshold`` (0.5);
2. keeps, in each false-positive bag ``l``, the instances whose attention weight
   satisfies eq. 3, ``w_li >= mean_l + sigma_l`` (population standard deviation of
   the bag's weights; mean over branches for multi-branch attention), and pools them
   into the hard-negative set ``H = {h_1, ..., h_M}``;
3. generates new negative bags (label 0, ``origin="generated"``, ids
   ``generated_r{round}_{i:04d}`` with the 0-based index of the round just finished):

   * ``sb``: one bag holding all of ``H`` (the grouped bag of Sec. 3.0.2);
   * ``mb``: ``n_bags`` bags of random instances of ``H`` (without replacement while
     the bag is no larger than ``H``; beyond that every instance once and the rest
     drawn with replacement);
   * ``fmb``: K-means (scikit-learn) groups ``H`` into ``c = min(n_clusters, distinct
     rows)`` clusters of sizes ``N_j``; every slot of a new bag picks cluster ``j``
     with probability ``P_j = N_j / sum N`` and then a uniformly random member.

   MB/FMB bag sizes are drawn from a Gaussian with the mean and (population)
   standard deviation of the real training bag sizes, rounded and clipped to their
   ``[Z_min, Z_max]``. Clustering uses the ``input`` features (the paper embeds the
   hard negatives with a pre-trained CNN, which is what the extracted input features
   are) or the head's projected ``embedding``. Generated bags always carry input
   features;
4. with ``reinit`` (default), resets the head to the exact state it had when the fit
   started, so the next round *re-trains* the network on the augmented set (the
   paper: "new hard negative bags are generated for re-training the network", the
   bootstrapping of Dalal and Triggs it cites); ``reinit=False`` fine-tunes the best
   model of the round instead.

Where the false positives come from (``fp_source``):

* ``train`` (default, the paper): the round's best model predicts the training bags
  it was trained on (step 1 above);
* ``out_of_fold``: **a departure from the paper**, for when the model fits its
  training bags so that no training bag is a false positive and nothing would be
  generated. The real training bags are split into ``oof_folds`` stratified folds
  (miner generator); for each fold a copy of the head, reset to its state at fit
  start, is trained with the shared loop on the other folds' bags (``oof_epochs``
  fixed epochs, Adam with ``oof_lr`` / ``oof_weight_decay``, no scheduler, no
  validation bags) and steps 1-2 run on the fold's held-out negative bags with that
  model. The hard negatives of all folds are pooled; generation (step 3) and
  ``reinit`` (step 4) are unchanged, and the mined instances still come from real
  training bags only. A fold whose training part lacks a positive or a negative
  bag is mined with the round's model instead (with a warning).

The loop appends the returned bags to the training set only; validation and test
bags are never seen here. Only real bags are mined and used for the size statistics
(generated bags of earlier rounds are copies of real instances). All randomness comes
from the miner's own generator, seeded from the loop's seed, and is checkpointed.
With ``train.rounds: 2`` the schedule is the paper's: train, mine, re-train.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tiahnm.data.bag import Bag
from tiahnm.errors import ConfigError
from tiahnm.miners.base import FitContext, Miner
from tiahnm.miners.options import KEY
from tiahnm.utils.options import Options, option, parse

if TYPE_CHECKING:  # pragma: no cover
    from tiahnm.heads.base import MILHead

logger = logging.getLogger(__name__)

MODES = ("sb", "mb", "fmb")
FEATURE_SPACES = ("input", "embedding")
FP_SOURCES = ("train", "out_of_fold")
#: Added to the loop's seed, so the miner's stream differs from the shuffling stream.
SEED_OFFSET = 2019
#: Relative slack of the eq. 3 comparison (float32 weights; ``max == mean + std``
#: holds exactly for two distinct weights).
_REL_TOL = 1e-6


# ------------------------------------------------------------------ building blocks
def hard_negative_mask(weights: torch.Tensor, std_scale: float = 1.0) -> torch.Tensor:
    """Eq. 3: instances with ``w >= mean(w) + std_scale * std(w)`` within one bag.

    Args:
        weights (torch.Tensor): ``[N]`` attention weights of one bag.
        std_scale (float): Multiplier of the standard deviation (1 in the paper).

    Returns:
        torch.Tensor: ``[N]`` boolean mask of the hard instances.
    """
    w = weights.detach().double().flatten()
    if w.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    threshold = w.mean() + std_scale * w.std(correction=0)
    return w >= threshold - _REL_TOL * threshold.abs()


def sample_bag_sizes(
    sizes: Sequence[int], n: int, generator: torch.Generator
) -> list[int]:
    """Gaussian bag sizes with the mean and std of ``sizes``, rounded and clipped.

    Args:
        sizes (Sequence[int]): Training bag sizes (``Z_min``/``Z_max`` are their
            extremes).
        n (int): Number of sizes to draw.
        generator (torch.Generator): Source of randomness.

    Returns:
        list[int]: ``n`` sizes in ``[max(1, Z_min), Z_max]``.
    """
    if not sizes:
        msg = "sample_bag_sizes needs at least one training bag size."
        raise ValueError(msg)
    arr = np.asarray(sizes, dtype=np.float64)
    mu, sigma = float(arr.mean()), float(arr.std())
    low, high = max(1, int(arr.min())), max(1, int(arr.max()))
    draws = torch.randn(n, generator=generator, dtype=torch.float64) * sigma + mu
    return torch.round(draws).clamp(low, high).long().tolist()


def sample_uniform(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random indices into ``m`` items (MB).

    Without replacement while ``n <= m``; beyond that every item once plus ``n - m``
    drawn with replacement, in random order.
    """
    perm = torch.randperm(m, generator=generator)
    if n <= m:
        return perm[:n]
    extra = torch.randint(m, (n - m,), generator=generator)
    idx = torch.cat([perm, extra])
    return idx[torch.randperm(n, generator=generator)]


def sample_from_clusters(
    labels: torch.Tensor, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` instance indices: a cluster with ``P_j = N_j / sum N``, then a member.

    Args:
        labels (torch.Tensor): ``[M]`` cluster index of every hard negative.
        n (int): Number of instances to draw (with replacement).
        generator (torch.Generator): Source of randomness.

    Returns:
        torch.Tensor: ``[n]`` long indices into the ``M`` instances.
    """
    labels = labels.long()
    _, counts = torch.unique(labels, return_counts=True)
    probs = counts.double() / counts.sum()
    picked = torch.multinomial(probs, n, replacement=True, generator=generator)
    order = torch.argsort(labels, stable=True)  # members of each cluster, contiguous
    starts = torch.cumsum(counts, 0) - counts
    offsets = (
        torch.rand(n, generator=generator, dtype=torch.float64) * counts[picked]
    ).long()
    offsets = torch.minimum(offsets, counts[picked] - 1)
    return order[starts[picked] + offsets]


def kmeans_labels(features: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """K-means cluster of every row (``min(n_clusters, distinct rows)`` clusters).

    Args:
        features (np.ndarray): ``[M, F]`` features.
        n_clusters (int): Requested number of clusters ``c``.
        seed (int): K-means ``random_state``.

    Returns:
        np.ndarray: ``[M]`` int labels in ``[0, k)``.
    """
    m = features.shape[0]
    k = min(n_clusters, len(np.unique(features, axis=0)))
    if k <= 1:
        return np.zeros(m, dtype=np.int64)
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=10, random_state=seed)
        return km.fit_predict(features.astype(np.float64)).astype(np.int64)


def stratified_folds(
    labels: Sequence[int], n_folds: int, generator: torch.Generator
) -> list[list[int]]:
    """Stratified random folds: indices of each class shuffled and dealt in turn.

    The dealing continues from class to class, so fold sizes differ by at most one
    and so do the per-class counts.

    Args:
        labels (Sequence[int]): Label of every item.
        n_folds (int): Number of folds (some are empty when there are fewer items).
        generator (torch.Generator): Source of randomness.

    Returns:
        list[list[int]]: ``n_folds`` sorted lists of indices into ``labels``.
    """
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    slot = 0
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        for j in torch.randperm(len(members), generator=generator).tolist():
            folds[slot % n_folds].append(members[j])
            slot += 1
    return [sorted(f) for f in folds]


@dataclass
class HardNegatives:
    """Result of mining one round.

    Attributes:
        features (torch.Tensor): ``[M, D]`` input features of the hard negatives.
        embeddings (torch.Tensor): ``[M, E]`` the head's projections of them.
        n_negative_bags (int): Real negative training bags scored.
        n_false_positive_bags (int): Those predicted positive.
    """

    features: torch.Tensor
    embeddings: torch.Tensor
    n_negative_bags: int
    n_false_positive_bags: int

    @staticmethod
    def concat(parts: Sequence[HardNegatives], width: int) -> HardNegatives:
        """Pool the hard negatives (and add the counts) of several mining passes."""
        feats = [p.features for p in parts if p.features.shape[0]]
        embeds = [p.embeddings for p in parts if p.embeddings.shape[0]]
        return HardNegatives(
            features=torch.cat(feats) if feats else torch.zeros(0, width),
            embeddings=torch.cat(embeds) if embeds else torch.zeros(0, 0),
            n_negative_bags=sum(p.n_negative_bags for p in parts),
            n_false_positive_bags=sum(p.n_false_positive_bags for p in parts),
        )


# ------------------------------------------------------------------ options
@dataclass(frozen=True)
class Li2019Options(Options):
    """Options of :class:`Li2019Miner` (``miner.options``)."""

    mode: str = option("fmb", choices=MODES, help="sb, mb or fmb (the paper's best).")
    n_bags: int = option(
        10,
        low=1,
        help="Bags generated per round by mb/fmb (not given in the paper); sb always "
        "makes one.",
    )
    n_clusters: int = option(
        10,
        low=1,
        help="K-means c of fmb (not given in the paper), capped at the number of "
        "distinct hard negatives.",
    )
    feature_space: str = option(
        "input",
        choices=FEATURE_SPACES,
        help="Clustering space of fmb: input or the head's embedding.",
    )
    fp_threshold: float = option(
        0.5,
        low=0,
        high=1,
        help="A negative bag is a false positive when its positive probability is "
        ">= this.",
    )
    std_scale: float = option(
        1.0, low=0, help="Multiplier of sigma in eq. 3 (1.0 as in the paper)."
    )
    reinit: bool = option(
        default=True,
        help="Reset the head to its initial state before the next round (re-training) "
        "instead of fine-tuning the round's best model.",
    )
    fp_source: str = option(
        "train",
        choices=FP_SOURCES,
        help="Which model finds the false-positive bags: train (the paper: the "
        "round's best model on its own training bags) or out_of_fold (a departure "
        "from the paper: every real training bag is predicted by a copy of the head "
        "reset to its fit-start state and trained on the other oof_folds - 1 "
        "stratified folds).",
    )
    oof_folds: int = option(3, low=2, help="Folds of out_of_fold.")
    oof_epochs: int | None = option(
        None,
        low=1,
        help="Fixed training epochs of each out-of-fold model (default: the round's "
        "train.epochs).",
    )
    oof_lr: float = option(
        5e-4, low=0, open_low=True, help="Adam learning rate of the out-of-fold models."
    )
    oof_weight_decay: float = option(
        1e-4, low=0, help="Weight decay of the out-of-fold models."
    )


# ------------------------------------------------------------------ the miner
class Li2019Miner(Miner):
    """Hard-negative bag generation between training rounds (Li et al. 2019).

    Use with ``train.rounds: 2`` (train, mine, re-train) and a head with attention;
    the paper's model also sets ``head.options.adaptive_lambda: 2`` (eq. 2) and
    ``head.options.attn_act: softsign`` (eq. 1) on AB-MIL.

    Takes the keyword options of :class:`Li2019Options` (``miner.options``), each also
    an attribute of the miner.
    """

    name = "li2019"
    #: Hard-negative bags are built from false positives of class 0: binary only.
    supported_tasks = ("binary",)

    def __init__(self, **options: Any) -> None:
        opts = parse(Li2019Options, options, key=KEY)
        for f in fields(opts):
            setattr(self, f.name, getattr(opts, f.name))
        self.generator: torch.Generator | None = None
        self.log: list[dict[str, float]] = []
        self._init_state: dict[str, torch.Tensor] | None = None

    # -------------------------------------------------------------- loop hooks
    def on_fit_start(self, ctx: FitContext) -> None:
        """Check the head, seed the generator, remember the head's initial state."""
        supported = ctx.head.supported_scores
        if "attention" not in supported:
            msg = (
                f"miner li2019 needs a head with attention weights; "
                f"{type(ctx.head).__name__} gives only {', '.join(supported)}."
            )
            raise ConfigError(msg)
        if self.generator is None:
            base = ctx.generator.initial_seed() if ctx.generator is not None else 0
            self.generator = torch.Generator().manual_seed((base + SEED_OFFSET) % 2**63)
        keep_init = self.reinit or self.fp_source == "out_of_fold"
        if keep_init and self._init_state is None:
            # The first call sees the freshly built head (also on resume: the loop
            # loads the checkpoint after this hook).
            self._init_state = {
                k: v.detach().to("cpu", copy=True)
                for k, v in ctx.head.state_dict().items()
            }

    def on_round_end(self, ctx: FitContext, train_bags: Sequence[Bag]) -> list[Bag]:
        """Mine the false-positive bags, generate hard negative bags, reset the head."""
        if self.generator is None:  # called without on_fit_start (direct use)
            self.on_fit_start(ctx)
        assert self.generator is not None
        real = [b for b in train_bags if b.origin != "generated"]
        self._provenance: list[tuple[Bag, int]] = []  # (bag, index) of each hard one
        if self.fp_source == "out_of_fold":
            mined = self.mine_out_of_fold(ctx, real)
        else:
            mined = self.mine(ctx.head, real, ctx.device)
        sizes = [b.n_instances for b in real]
        new_bags = self.generate(mined, sizes, round_idx=ctx.round)
        stats = {
            "li2019_round": float(ctx.round),
            "li2019_negative_bags": float(mined.n_negative_bags),
            "li2019_fp_bags": float(mined.n_false_positive_bags),
            "li2019_hard_instances": float(mined.features.shape[0]),
            "li2019_generated_bags": float(len(new_bags)),
            "li2019_out_of_fold": float(self.fp_source == "out_of_fold"),
        }
        self.log.append(stats)
        if not new_bags:
            logger.info(
                "li2019: round %d: %d of %d negative training bags are false "
                "positives, %d hard negatives; no bags generated.",
                ctx.round,
                mined.n_false_positive_bags,
                mined.n_negative_bags,
                mined.features.shape[0],
            )
        else:
            logger.info(
                "li2019: round %d: %d false-positive bags, %d hard negatives, "
                "%d %s bags generated.",
                ctx.round,
                mined.n_false_positive_bags,
                mined.features.shape[0],
                len(new_bags),
                self.mode,
            )
        if self.reinit and self._init_state is not None:
            ctx.head.load_state_dict(self._init_state)
        return new_bags

    def epoch_stats(self) -> dict[str, float]:
        """The last mining round's counts (empty before the first round ends)."""
        return dict(self.log[-1]) if self.log else {}

    def state_dict(self) -> dict[str, Any]:
        """Generator state and the per-round mining counts."""
        return {
            "generator": self.generator.get_state()
            if self.generator is not None
            else None,
            "log": [dict(row) for row in self.log],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state.get("generator") is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(state["generator"])
        self.log = [dict(row) for row in state.get("log", [])]

    # -------------------------------------------------------------- mining
    @torch.inference_mode()
    def mine(
        self, head: MILHead, bags: Sequence[Bag], device: torch.device
    ) -> HardNegatives:
        """False-positive negative bags and their eq. 3 hard instances.

        Args:
            head (MILHead): The round's best head, or with ``out_of_fold`` a model
                that did not train on ``bags`` (put in eval mode here).
            bags (Sequence[Bag]): Real training bags.
            device (torch.device): Where the head lives.

        Returns:
            HardNegatives: Hard instances (input features and head embeddings).
        """
        was_training = head.training
        head.eval()
        feats, embeds = [], []
        n_neg = n_fp = 0
        try:
            for bag in bags:
                if bag.label != 0 or bag.n_instances == 0:
                    continue
                n_neg += 1
                hard = self._hard_instances(head, bag, device)
                if hard is None:
                    continue
                n_fp += 1
                feats.append(hard[0])
                embeds.append(hard[1])
        finally:
            head.train(was_training)
        width = bags[0].features.shape[1] if bags else 0
        return HardNegatives(
            features=torch.cat(feats) if feats else torch.zeros(0, width),
            embeddings=torch.cat(embeds) if embeds else torch.zeros(0, 0),
            n_negative_bags=n_neg,
            n_false_positive_bags=n_fp,
        )

    def _hard_instances(
        self, head: MILHead, bag: Bag, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Eq. 3 instances of one negative bag if it is a false positive, else None.

        Args:
            head (MILHead): Head in eval mode (called under inference mode).
            bag (Bag): A non-empty negative bag.
            device (torch.device): Where the head lives.

        Returns:
            tuple | None: ``(input features, head embeddings)`` of the kept instances.
        """
        out = head(bag.features.to(device))
        p_pos = 1.0 - float(out.bag_probabilities()[0])
        if p_pos < self.fp_threshold:
            return None
        weights = head.instance_scores(out, "attention")[: bag.n_instances]
        keep = hard_negative_mask(weights.cpu(), self.std_scale)
        self._record_false_positive(bag, keep, weights.float().cpu(), p_pos)
        return (
            bag.features[keep].float(),
            out.instance_embeddings[: bag.n_instances][keep.to(device)].float().cpu(),
        )

    def _record_false_positive(
        self, bag: Bag, keep: torch.Tensor, weights: torch.Tensor, p_pos: float
    ) -> None:
        """Remember a false-positive bag's hard instances (report, provenance)."""
        idx = torch.nonzero(keep).flatten()
        idx = idx[torch.argsort(weights[idx], descending=True)]
        self.__dict__.setdefault("_provenance", []).extend((bag, int(i)) for i in idx)
        self.record_mined(
            "false-positive bags: eq. 3 hard instances",
            bag,
            idx.tolist(),
            step=f"round {len(self.log)}, p = {p_pos:.2f}",
            scores=weights[idx].tolist(),
        )

    def _record_generated(
        self, index_sets: Sequence[torch.Tensor], round_idx: int, n_bags: int = 2
    ) -> None:
        """Where the instances of the first generated bags came from (report)."""
        prov = self.__dict__.get("_provenance", [])
        for i, idx in enumerate(index_sets[:n_bags]):
            by_bag: dict[str, tuple[Bag, list[int]]] = {}
            for j in idx.tolist()[:48]:
                if j < len(prov):
                    bag, k = prov[j]
                    by_bag.setdefault(bag.slide_id, (bag, []))[1].append(k)
            for bag, ks in by_bag.values():
                self.record_mined(
                    "generated hard-negative bags",
                    bag,
                    ks,
                    step=f"round {round_idx}, generated bag {i}",
                )

    def mine_out_of_fold(self, ctx: FitContext, bags: Sequence[Bag]) -> HardNegatives:
        """:meth:`mine` each fold's bags with a head trained on the other folds.

        A departure from the paper (see the module docstring): every bag is
        predicted by a model that did not train on it.

        Args:
            ctx (FitContext): The round's context (head, device, epochs).
            bags (Sequence[Bag]): Real training bags.

        Returns:
            HardNegatives: The pooled hard negatives and counts of all folds.
        """
        assert self.generator is not None
        assert self._init_state is not None, "on_fit_start keeps the initial state"
        folds = stratified_folds(
            [b.label for b in bags], self.oof_folds, self.generator
        )
        parts = []
        for k, held in enumerate(folds):
            if not held:
                continue
            seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
            train = [bags[i] for j, f in enumerate(folds) if j != k for i in f]
            held_bags = [bags[i] for i in held]
            labels = {b.label for b in train}
            if 0 in labels and len(labels) > 1:
                head = self._fit_out_of_fold(ctx, train, seed, key=f"oof{k}")
            else:
                logger.warning(
                    "li2019: out-of-fold fold %d of %d: the other folds lack a "
                    "positive or a negative bag; its %d bags are mined with the "
                    "round's model.",
                    k,
                    self.oof_folds,
                    len(held_bags),
                )
                head = ctx.head
            parts.append(self.mine(head, held_bags, ctx.device))
        width = bags[0].features.shape[1] if bags else 0
        return HardNegatives.concat(parts, width)

    def _fit_out_of_fold(
        self, ctx: FitContext, bags: Sequence[Bag], seed: int, *, key: str
    ) -> MILHead:
        """A copy of the head, reset to its initial state, trained on ``bags``.

        Trained through ``ctx.sub`` (the shared loop under the run's device,
        precision, processes and checkpoints); the torch RNG (dropout) is seeded
        with ``seed`` inside a fork, so the model is reproducible and the outer
        training's random stream is untouched.
        """
        assert self._init_state is not None
        head = copy.deepcopy(ctx.head)
        head.load_state_dict(self._init_state)
        epochs = self.oof_epochs if self.oof_epochs is not None else ctx.epochs
        ctx.sub.fit(
            head,
            bags,
            key=key,
            seed=seed,
            epochs=epochs,
            lr=self.oof_lr,
            weight_decay=self.oof_weight_decay,
            scheduler="none",
            patience=epochs,
        )
        return head

    def generate(
        self, mined: HardNegatives, sizes: Sequence[int], *, round_idx: int
    ) -> list[Bag]:
        """New negative bags from the hard negatives (none when there are none).

        Args:
            mined (HardNegatives): Output of :meth:`mine`.
            sizes (Sequence[int]): Real training bag sizes (Gaussian statistics).
            round_idx (int): Index of the round just finished (for the bag ids).

        Returns:
            list[Bag]: Label-0 bags with ``origin="generated"``.
        """
        assert self.generator is not None
        hard = mined.features
        m = int(hard.shape[0])
        if m == 0 or not sizes:
            return []
        g = self.generator
        if self.mode == "sb":
            index_sets = [torch.arange(m)]
        else:
            bag_sizes = sample_bag_sizes(sizes, self.n_bags, g)
            if self.mode == "mb":
                index_sets = [sample_uniform(m, n, g) for n in bag_sizes]
            else:
                space = (
                    mined.features
                    if self.feature_space == "input"
                    else (mined.embeddings)
                )
                seed = int(torch.randint(2**31 - 1, (1,), generator=g))
                labels = torch.from_numpy(
                    kmeans_labels(space.numpy(), self.n_clusters, seed)
                )
                index_sets = [sample_from_clusters(labels, n, g) for n in bag_sizes]
        self._record_generated(index_sets, round_idx)
        return [
            Bag(
                slide_id=f"generated_r{round_idx}_{i:04d}",
                label=0,
                features=hard[idx].clone(),
                origin="generated",
                source=f"li2019 {self.mode}",
                meta={"round": round_idx, "mode": self.mode},
            )
            for i, idx in enumerate(index_sets)
        ]


__all__ = [
    "HardNegatives",
    "Li2019Miner",
    "hard_negative_mask",
    "kmeans_labels",
    "sample_bag_sizes",
    "sample_from_clusters",
    "sample_uniform",
    "stratified_folds",
]
