"""A sharding bug on purpose: the spawned ranks of `train_distributed` drop their gradients.

`services.trainer.distributed.train_distributed` runs rank 0 in the calling process and pickles
its arguments (the training rows among them) to the ranks it spawns. A `DropsGradientsOfItsRank`
row unpickles there as a plain row, after making every backward of that process produce zero
gradients: the all-reduce (DDP) or reduce-scatter (FSDP) then averages rank 0's gradient with
zeros, as if one rank's gradient had been lost, while the forward passes stay untouched. In the
calling process the row is only a row.
"""

from __future__ import annotations

import multiprocessing

import torch

_installed = False


def _zero_this_process_gradients() -> None:
    global _installed
    if _installed:
        return
    backward = torch.Tensor.backward

    def zero_backward(self: torch.Tensor, gradient=None, *args, **kwargs):
        return backward(self, torch.zeros_like(self), *args, **kwargs)

    torch.Tensor.backward = zero_backward
    _installed = True


def _unpickled(row: dict) -> dict:
    # unpickled by a spawned process (named at once; parent_process() is set only later),
    # never by the test process (a deepcopy there unpickles too)
    if multiprocessing.current_process().name != "MainProcess":
        _zero_this_process_gradients()
    return row


class DropsGradientsOfItsRank(dict):
    """A training row that, unpickled in a spawned process, zeroes that process's gradients."""

    def __reduce__(self):
        return _unpickled, (dict(self),)
