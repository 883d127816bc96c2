"""The ``topk_mean`` head: mean of the ``k`` highest instance logits of each class."""

from __future__ import annotations

import torch
from torch import nn

from tiahnm.errors import ConfigError
from tiahnm.heads.base import MILHead, MILOutput


class TopKMeanMIL(MILHead):
    """Instance classifier on projected instances, pooled by a per-class top-k mean.

    The bag logit of class ``c`` is the mean of the ``k`` highest instance logits of
    class ``c`` (``k`` clipped to the bag size): between max pooling (``k = 1``) and
    mean pooling (``k >= N``).

    Args:
        in_dim (int): Instance feature width ``D``.
        n_classes (int): Number of classes ``C``.
        k (int): Instances averaged per class (at least 1).
        embed_dim (int): Projection width ``E``.
        dropout (float): Dropout after the projection.
        act (str): ``relu`` or ``gelu``.

    Raises:
        ConfigError: If ``k`` is smaller than 1.
    """

    supported_scores = ("instance_prob", "class_aware", "instance_logit")
    default_eval_score = "instance_prob"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        k: int = 3,
        embed_dim: int = 512,
        dropout: float = 0.25,
        act: str = "relu",
    ) -> None:
        super().__init__(
            in_dim, n_classes, embed_dim=embed_dim, dropout=dropout, act=act
        )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            msg = f"head.options.k must be an integer >= 1, got {k!r}."
            raise ConfigError(msg)
        self.k = k
        self.classifier = nn.Linear(embed_dim, n_classes)

    def aggregate(
        self, h: torch.Tensor, *, label: torch.Tensor | None = None
    ) -> MILOutput:
        """Pool the instance logits of ``h`` by a per-class top-k mean.

        Args:
            h (torch.Tensor): ``[N, E]`` projected instances.
            label (torch.Tensor | None): Unused.

        Returns:
            MILOutput: Bag logits ``[1, C]``, bag embedding ``[1, E]`` (mean of the
            instances) and instance logits ``[N, C]``.
        """
        logits = self.classifier(h)
        k = min(self.k, logits.shape[0])
        bag_logits = logits.topk(k, dim=0).values.mean(0, keepdim=True)
        return MILOutput(
            bag_logits=bag_logits,
            bag_embedding=h.mean(0, keepdim=True),
            instance_embeddings=h,
            instance_logits=logits,
        )
