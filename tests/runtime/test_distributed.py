"""The one-process behaviour of the distributed helpers (no process group started).

Two gloo processes training together: ``tests/training/test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch

from tiahnm.runtime.distributed import (
    DistContext,
    all_reduce_gradients,
    env_context,
    shard,
    unshard,
)


def test_shard_and_unshard_round_trip():
    items = list(range(7))
    parts = [shard(items, DistContext(r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert unshard(parts, 7) == items
    assert shard(items, DistContext()) == items


def test_env_context_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_context() == DistContext(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4 and WORLD_SIZE=4 are inconsistent"):
        env_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match=r"RANK='x' is not an integer"):
        env_context()


def test_all_reduce_gradients_is_a_no_op_in_one_process():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    all_reduce_gradients([p], DistContext())
    assert p.grad.tolist() == [1.0, 2.0, 3.0]
