"""The learner hub's own step metrics (rewards of the batch), against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from minirl_async.proto.messages import Response, ScoredGroup
from minirl_async.services.learner import oldest_version, reward_metrics


def _group(rewards, versions=(3, 3)):
    responses = [Response(response_ids=np.array([5, 2], dtype=np.int32), logprobs=np.zeros(2, np.float32),
                          versions=np.array(versions, dtype=np.int32), routes=None, finish_reason="stop")
                 for _ in rewards]
    return ScoredGroup(group_id="g0", attempt=0, prompt_ids=np.array([1, 7], np.int32), meta={}, sampler_id="s",
                       responses=responses, rewards=np.array(rewards, np.float32))


def test_reward_metrics():
    m = reward_metrics([_group([1, 0, 0, 1]), _group([0, 0, 0, 0])])
    assert m["reward/mean"] == pytest.approx(0.25)
    assert m["reward/acc"] == pytest.approx(0.25)
    assert m["reward/std_in_group"] == pytest.approx((0.5 + 0.0) / 2)  # population std per group, averaged
    assert m["reward/zero_adv_groups"] == pytest.approx(0.5)  # the all-zero group teaches nothing


def test_oldest_version_is_the_oldest_token():
    assert oldest_version(_group([1, 0], versions=(4, 2)), current=5) == 2
