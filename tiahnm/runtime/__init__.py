"""Where and how the computation runs: devices, precision, processes, checkpoints.

The lowest layer above :mod:`tiahnm.errors` and :mod:`tiahnm.utils`: training,
extraction and prediction all use it, and it imports none of them.

* :mod:`tiahnm.runtime.device`: device names and mixed-precision (autocast) dtypes.
* :mod:`tiahnm.runtime.precision`: bf16 autocast on CPU, its detection and guard.
* :mod:`tiahnm.runtime.distributed`: ``torchrun`` process groups, sharding and the
  collective operations.
* :mod:`tiahnm.runtime.checkpoint`: atomic ``torch.save`` and safe ``torch.load``.
"""
