"""Learner: MiniRL train step with R2/R3 routing replay, FSDP2, checkpoint/resume, HF export.

    from minirl_async.learner import Group, Sample, Trainer, broadcast_groups, init_distributed

See `trainer.py` for the step, `fsdp.py` for multi-rank launch, `checkpoint.py` for the on-disk layout.
"""

from minirl_async.learner.batch import BatchError, Group, Sample
from minirl_async.learner.fsdp import broadcast_groups, init_distributed
from minirl_async.learner.trainer import Trainer

__all__ = ["BatchError", "Group", "Sample", "Trainer", "broadcast_groups", "init_distributed"]
