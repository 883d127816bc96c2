"""The common head interface: :class:`MILOutput` and :class:`MILHead`.

Every head returns the same :class:`MILOutput`, so miners, losses and evaluation work
with any of them. Heads work on one bag at a time (``[N, D]`` or ``[1, N, D]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.errors import ConfigError

SCORE_KINDS = ("attention", "instance_prob", "class_aware", "instance_logit")


@dataclass
class MILOutput:
    """What every head returns for one bag.

    Attributes:
        bag_logits (torch.Tensor): ``[1, C]``.
        bag_embedding (torch.Tensor): ``[1, E]`` (``[1, C, E]`` for class-wise heads).
        instance_embeddings (torch.Tensor): ``[N, E]`` projected instances (after
            ``extra_tokens`` were appended, those rows come last).
        attention (torch.Tensor | None): ``[H, N]`` attention weights (softmax over
            instances) for H heads / branches, if the head has attention.
        instance_logits (torch.Tensor | None): ``[N, C]`` instance classifier logits,
            if the head has an instance classifier.
        aux_losses (dict[str, torch.Tensor]): Weighted auxiliary losses the head adds
            to its own bag loss (already multiplied by their weights).
        extras (dict[str, torch.Tensor]): Head-specific tensors (e.g. DSMIL max-instance
            logits, DTFD tier-1 logits).
    """

    bag_logits: torch.Tensor
    bag_embedding: torch.Tensor
    instance_embeddings: torch.Tensor
    attention: torch.Tensor | None = None
    instance_logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def bag_probabilities(self) -> torch.Tensor:
        """``[C]`` class probabilities of the bag (softmax of the logits)."""
        return torch.softmax(self.bag_logits.float(), dim=-1)[0]


def make_activation(name: str) -> nn.Module:
    """``relu`` or ``gelu``."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    msg = f"head.options.act must be 'relu' or 'gelu', got {name!r}."
    raise ConfigError(msg)


class MILHead(nn.Module):
    """Base class of MIL heads.

    Subclasses build ``self.embed`` (instance projection ``D -> E``) and implement
    :meth:`aggregate`. The base class handles input shapes, instance selection
    (``keep_idx``, used by maskers) and appended tokens (``extra_tokens``, used by the
    MHIM-v2 recycle network), the loss, and instance scores.

    Class attributes:
        supported_scores (tuple[str, ...]): Instance score kinds this head can give.
        default_eval_score (str): The score used as instance probability in evaluation.
        needs_label_in_forward (bool): True when training uses the label in forward
            (CLAM's instance loss).
        encodes_images (bool): The head encodes image rows itself (``encoder_mil``).
    """

    supported_scores: tuple[str, ...] = ("attention", "class_aware", "instance_prob")
    default_eval_score: str = "instance_prob"
    needs_label_in_forward: bool = False
    #: True for heads that take images (flattened rows) and own a patch encoder
    #: (``encoder``, inner ``head``, ``image_shape``, ``feature_dim``).
    encodes_images: bool = False

    def mining_score(self) -> str:
        """The instance score a miner ranks by when told ``auto``.

        Attention where the head has it, else the class-aware score; heads with a
        better-suited score (DSMIL's instance classifier) override this.
        """
        return "attention" if "attention" in self.supported_scores else "class_aware"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        embed_dim: int = 512,
        dropout: float = 0.25,
        act: str = "relu",
        shared_embed: bool = True,
    ) -> None:
        super().__init__()
        if in_dim <= 0 or n_classes < 2:
            msg = f"in_dim must be > 0 and n_classes >= 2, got {in_dim}, {n_classes}."
            raise ConfigError(msg)
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.embed_dim = embed_dim
        if not shared_embed:  # a head that embeds otherwise (EncoderMIL: its encoder)
            return
        layers: list[nn.Module] = [nn.Linear(in_dim, embed_dim), make_activation(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.embed = nn.Sequential(*layers)

    def forward(
        self,
        x: torch.Tensor,
        *,
        keep_idx: torch.Tensor | None = None,
        extra_tokens: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
    ) -> MILOutput:
        """Run the head on one bag.

        Args:
            x (torch.Tensor): ``[N, D]`` or ``[1, N, D]`` instance features.
            keep_idx (torch.Tensor | None): Indices of the instances to keep (the
                others are masked out before the projection).
            extra_tokens (torch.Tensor | None): ``[k, E]`` (or ``[1, k, E]``) tokens
                appended after the projection.
            label (torch.Tensor | None): Bag label, used only by heads with
                ``needs_label_in_forward`` while training.

        Returns:
            MILOutput: The common output.
        """
        if x.dim() == 3:
            if x.shape[0] != 1:
                msg = f"Heads take one bag at a time; got a batch of {x.shape[0]}."
                raise ValueError(msg)
            x = x[0]
        if x.dim() != 2 or x.shape[-1] != self.in_dim:
            msg = f"Expected features [N, {self.in_dim}], got {tuple(x.shape)}."
            raise ValueError(msg)
        if keep_idx is not None:
            x = x.index_select(0, keep_idx)
        h = self.embed(x)
        if extra_tokens is not None:
            if extra_tokens.dim() == 3:
                extra_tokens = extra_tokens[0]
            h = torch.cat([h, extra_tokens.to(h.dtype)], dim=0)
        return self.aggregate(h, label=label)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Pool projected instances ``h`` ``[N, E]`` into a :class:`MILOutput`."""
        raise NotImplementedError

    def supports_padding(self) -> bool:
        """Whether :meth:`forward_padded` gives the same logits as per-bag forwards.

        Heads that return True let the loop train several bags in one padded forward.
        """
        return False

    def forward_padded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bag logits ``[B, C]`` of a zero-padded batch (only if :meth:`supports_padding`).

        Args:
            x (torch.Tensor): ``[B, N_max, D]`` features.
            mask (torch.Tensor): ``[B, N_max]`` bool, True for real instances.
        """
        msg = f"{type(self).__name__} does not support padded batches."
        raise NotImplementedError(msg)

    def loss_terms(self, out: MILOutput) -> list[tuple[float, torch.Tensor]]:
        """The ``(weight, [1, C] logits)`` streams the task's criterion trains.

        Task-agnostic: the task (:mod:`tiahnm.tasks`) applies its own criterion
        (cross-entropy, survival NLL, Cox ...) to each stream and adds
        ``out.aux_losses``. One stream, the bag logits, by default.
        """
        return [(1.0, out.bag_logits)]

    def loss(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of :meth:`loss_terms` plus the auxiliary losses.

        The training loop takes its loss from the task; this is the classification
        loss for direct use.

        Args:
            out (MILOutput): Output of :meth:`forward`.
            label (torch.Tensor): ``[1]`` long bag label.
        """
        loss: torch.Tensor | None = None
        for weight, logits in self.loss_terms(out):
            term = F.cross_entropy(logits.float(), label.view(1))
            term = term if weight == 1.0 else weight * term
            loss = term if loss is None else loss + term
        assert loss is not None
        for value in out.aux_losses.values():
            loss = loss + value
        return loss

    def set_eval_score(self, kind: str) -> None:
        """Make ``kind`` the score stored and evaluated (``evaluation.instance_score``).

        Raises:
            ConfigError: The head does not give ``kind`` scores (names the choices).
        """
        if kind not in self.supported_scores:
            msg = (
                f"evaluation.instance_score: {type(self).__name__} does not give "
                f"{kind!r} scores; choose one of {', '.join(self.supported_scores)}."
            )
            raise ConfigError(msg)
        self.default_eval_score = kind

    def instance_scores(
        self, out: MILOutput, kind: str | None = None, *, target: int = 1
    ) -> torch.Tensor:
        """Per-instance scores ``[N]`` of one kind.

        Args:
            out (MILOutput): Output of :meth:`forward`.
            kind (str | None): ``attention`` (mean over heads), ``instance_prob``
                (probability of ``target``), ``class_aware`` (max over classes of the
                class probability of the attention-weighted instance, MHIM-v2 /
                DTFD), ``instance_logit``; ``None`` for :attr:`default_eval_score`.
            target (int): Class whose probability ``instance_prob`` returns.
        """
        kind = kind or self.default_eval_score
        if kind not in self.supported_scores:
            msg = (
                f"{type(self).__name__} does not give {kind!r} scores; it supports "
                f"{', '.join(self.supported_scores)}."
            )
            raise ValueError(msg)
        if kind == "attention":
            if out.attention is None:  # pragma: no cover - guarded by supported_scores
                msg = f"{type(self).__name__} returned no attention."
                raise ValueError(msg)
            return out.attention.float().mean(0)
        if kind == "instance_logit":
            return self._instance_logits(out)[:, target]
        logits = self._instance_logits(out)
        probs = torch.softmax(logits.float(), dim=-1)
        if kind == "class_aware":
            return probs.max(dim=-1).values
        return probs[:, target]

    def projection_parameters(self) -> list[nn.Parameter]:
        """Parameters of the instance projection (``embed``), in a fixed order.

        MHIM's ``student_init: embed`` copies these from the teacher checkpoint;
        heads that encode instances before projecting them (``encoder_mil``) add the
        encoder's.
        """
        return list(self.embed.parameters())

    def _instance_logits(self, out: MILOutput) -> torch.Tensor:
        """Instance logits ``[N, C]``: the instance classifier if any, else the CAM.

        The CAM applies the bag classifier to each attention-weighted instance
        (``W (a_i h_i) + b``), as DTFD-MIL and MHIM-v2 do.
        """
        if out.instance_logits is not None:
            return out.instance_logits
        return self.cam_logits(out)

    def cam_logits(self, out: MILOutput) -> torch.Tensor:
        """Class activation logits ``[N, C]`` for heads with a linear classifier."""
        classifier = getattr(self, "classifier", None)
        if not isinstance(classifier, nn.Linear) or out.attention is None:
            msg = f"{type(self).__name__} has no instance classifier or CAM."
            raise ValueError(msg)
        weighted = (
            out.attention.float().mean(0, keepdim=True).T * out.instance_embeddings
        )
        return F.linear(weighted, classifier.weight.float(), classifier.bias.float())
