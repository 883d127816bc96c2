"""CLAM (Lu et al., Nature Biomedical Engineering 2021): single- and multi-branch.

Clustering-constrained attention MIL: gated attention pooling of projected
instances plus, during training, an instance-level clustering loss on the most and
least attended instances, with one binary instance classifier per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tiahnm.heads.base import MILHead, MILOutput
from tiahnm.heads.options import KEY, HeadOptions
from tiahnm.utils.options import option, parse

INST_LOSSES = ("svm", "ce")


def smooth_top1_svm_loss(
    logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada, Zisserman and Kumar, ICLR 2018).

    The hard top-1 SVM is ``max_j (s_j + alpha [j != y]) - s_y``; its smooth version
    replaces the max by ``tau * logsumexp(. / tau)``::

        l(s, y) = tau * log sum_j exp((s_j + alpha [j != y]) / tau) - s_y

    With ``tau = alpha = 1`` this is the cross-entropy with a margin of 1 added to
    the wrong classes. CLAM uses this loss (``k = 1``, ``tau = alpha = 1``) for its
    instance classifiers.

    Args:
        logits (torch.Tensor): ``[B, K]`` scores.
        target (torch.Tensor): ``[B]`` long class indices.
        alpha (float): Margin.
        tau (float): Smoothing temperature (> 0).

    Returns:
        torch.Tensor: The mean loss over the batch (a scalar).
    """
    logits = logits.float()
    margin = torch.full_like(logits, alpha)
    margin.scatter_(1, target.view(-1, 1), 0.0)
    smooth_max = tau * torch.logsumexp((logits + margin) / tau, dim=1)
    true_score = logits.gather(1, target.view(-1, 1)).squeeze(1)
    return (smooth_max - true_score).mean()


class GatedAttention(nn.Module):
    """CLAM's gated attention net ``w^T (tanh(V h) * sigmoid(U h))``, B branches.

    Dropout (when > 0) follows the tanh and the sigmoid, as in CLAM.
    """

    def __init__(
        self, embed_dim: int, attn_dim: int, n_branches: int, dropout: float
    ) -> None:
        super().__init__()
        self.V = nn.Linear(embed_dim, attn_dim)
        self.U = nn.Linear(embed_dim, attn_dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.w = nn.Linear(attn_dim, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Raw attention scores ``[B, N]`` (before the softmax)."""
        a = self.drop(torch.tanh(self.V(h)))
        b = self.drop(torch.sigmoid(self.U(h)))
        return self.w(a * b).T


@dataclass(frozen=True)
class CLAMOptions(HeadOptions):
    """Options of :class:`CLAMSB` and :class:`CLAMMB` (``head.options``)."""

    attn_dim: int = option(
        256, low=1, help='Hidden width of the attention net (256, CLAM "small").'
    )
    k_sample: int = option(
        8, low=1, help="Instances sampled per side for the instance loss."
    )
    bag_weight: float = option(
        0.7,
        low=0,
        high=1,
        help="Weight of the bag loss; the instance loss gets 1 - bag_weight.",
    )
    inst_loss: str = option(
        "svm",
        choices=INST_LOSSES,
        help="svm (smooth top-1 SVM) or ce (cross-entropy).",
    )
    subtyping: bool = option(
        default=False, help="Also train out-of-class instance classifiers."
    )


class CLAM(MILHead):
    """CLAM head; use :class:`CLAMSB` or :class:`CLAMMB`.

    Bag prediction: ``A = softmax(gated_attention(h))`` ``[B, N]`` with one branch
    (SB) or one per class (MB). SB classifies ``A h`` with a ``Linear(E, C)``; MB
    gives class c the logit ``Linear_c(E, 1)(A_c h)``.

    Instance loss (train mode, label given): with ``k = max(1, min(k_sample, N //
    2))``, the instance classifier of the true class y (``Linear(E, 2)``) is trained
    on the top-k instances of branch y's attention (pseudo-label 1) and the
    bottom-k (pseudo-label 0). With ``subtyping=True`` the instance classifier of
    every other class c is also trained on the top-k of branch c's attention with
    pseudo-label 0, and the summed loss is divided by C. The loss is the smooth
    top-1 SVM (``inst_loss="svm"``) or cross-entropy (``"ce"``). It goes into
    ``aux_losses["instance"]`` already multiplied by ``1 - bag_weight``; :meth:`loss`
    weights the bag cross-entropy by ``bag_weight``. SB uses its single branch for
    every class.

    Instance logits ``[N, C]`` (for instance scores): for ``C = 2`` the two logits
    of the positive class's instance classifier (``softmax(.)[:, 1]`` is the
    probability that the instance is a class-1 instance); for ``C > 2`` the
    in-class log-odds ``z_c[:, 1] - z_c[:, 0]`` of every class's instance
    classifier, stacked over classes.

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        multi_branch (bool): CLAM-MB (True) or CLAM-SB (False).
        **options: The options of :class:`CLAMOptions` (dropout also applies in the
            attention net).
    """

    supported_scores = ("attention", "instance_prob", "class_aware", "instance_logit")
    default_eval_score = "instance_prob"
    needs_label_in_forward = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        multi_branch: bool = False,
        **options: Any,
    ) -> None:
        opts = parse(CLAMOptions, options, key=KEY)
        super().__init__(
            in_dim,
            n_classes,
            embed_dim=opts.embed_dim,
            dropout=opts.dropout,
            act=opts.act,
        )
        self.multi_branch = multi_branch
        self.n_branches = n_classes if multi_branch else 1
        embed_dim = opts.embed_dim
        self.attention_net = GatedAttention(
            embed_dim, opts.attn_dim, self.n_branches, opts.dropout
        )
        if multi_branch:
            self.bag_classifiers = nn.ModuleList(
                nn.Linear(embed_dim, 1) for _ in range(n_classes)
            )
        else:
            self.classifier = nn.Linear(embed_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(embed_dim, 2) for _ in range(n_classes)
        )
        self.k_sample = opts.k_sample
        self.bag_weight = opts.bag_weight
        self.inst_loss = opts.inst_loss
        self.subtyping = opts.subtyping

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.inst_loss == "svm":
            return smooth_top1_svm_loss(logits, target)
        return F.cross_entropy(logits.float(), target)

    def instance_loss(
        self, attention: torch.Tensor, h: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        """The unweighted instance clustering loss (see the class doc).

        Args:
            attention (torch.Tensor): ``[B, N]`` softmax attention.
            h (torch.Tensor): ``[N, E]`` projected instances.
            label (torch.Tensor): Bag label (one element).
        """
        n = h.shape[0]
        k = max(1, min(self.k_sample, n // 2))
        y = int(label.reshape(-1)[0])
        ones = torch.ones(k, dtype=torch.long, device=h.device)
        zeros = torch.zeros(k, dtype=torch.long, device=h.device)
        total = h.new_zeros((), dtype=torch.float32)
        for c, classifier in enumerate(self.instance_classifiers):
            branch = attention[c if self.multi_branch else 0].detach()
            top = torch.topk(branch, k).indices
            if c == y:
                bottom = torch.topk(branch, k, largest=False).indices
                idx = torch.cat([top, bottom])
                target = torch.cat([ones, zeros])
            elif self.subtyping:
                idx, target = top, zeros
            else:
                continue
            total = total + self._criterion(classifier(h.index_select(0, idx)), target)
        if self.subtyping:
            total = total / self.n_classes
        return total

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Gated attention pooling, bag logits, instance logits, instance loss."""
        attention = torch.softmax(self.attention_net(h), dim=-1)  # [B, N]
        pooled = attention @ h  # [B, E]
        if self.multi_branch:
            bag_logits = torch.cat(
                [clf(pooled[c : c + 1]) for c, clf in enumerate(self.bag_classifiers)],
                dim=1,
            )
            bag_embedding = pooled.unsqueeze(0)  # [1, C, E]
        else:
            bag_logits = self.classifier(pooled)
            bag_embedding = pooled
        if self.n_classes == 2:
            instance_logits = self.instance_classifiers[1](h)
        else:
            per_class = [clf(h) for clf in self.instance_classifiers]
            instance_logits = torch.stack([z[:, 1] - z[:, 0] for z in per_class], 1)
        aux: dict[str, torch.Tensor] = {}
        if self.training and label is not None:
            inst = self.instance_loss(attention, h, label)
            aux["instance"] = (1.0 - self.bag_weight) * inst
        return MILOutput(
            bag_logits=bag_logits,
            bag_embedding=bag_embedding,
            instance_embeddings=h,
            attention=attention,
            instance_logits=instance_logits,
            aux_losses=aux,
        )

    def loss_terms(self, out: MILOutput) -> list[tuple[float, torch.Tensor]]:
        """``bag_weight`` x the bag logits (the instance loss is an aux loss)."""
        return [(self.bag_weight, out.bag_logits)]


class CLAMSB(CLAM):
    """CLAM single-branch: one attention branch and a ``Linear(E, C)`` classifier.

    Takes the options of :class:`CLAMOptions`.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        super().__init__(in_dim, n_classes, multi_branch=False, **options)


class CLAMMB(CLAM):
    """CLAM multi-branch: one attention branch and one ``Linear(E, 1)`` per class.

    Takes the options of :class:`CLAMOptions`. ``bag_embedding`` is ``[1, C, E]``.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, **options: Any) -> None:
        super().__init__(in_dim, n_classes, multi_branch=True, **options)
