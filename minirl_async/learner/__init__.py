"""Learner: MiniRL train step with R2/R3 routing replay, FSDP2, checkpoint/resume, HF export.

    from minirl_async.learner import Group, Sample, Trainer
"""

from minirl_async.learner.batch import BatchError, Group, Sample
from minirl_async.learner.trainer import Trainer

__all__ = ["BatchError", "Group", "Sample", "Trainer"]
