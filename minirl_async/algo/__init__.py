"""MiniRL algorithms (ALGORITHM.md): group advantages, the loss registry of §4, chunked log-probs and the
§7 metrics the learner computes. Pure tensor functions: no model, no distribution.

    from minirl_async.algo.advantages import group_advantages      # rewards [num_groups, G] -> advantages
    from minirl_async.algo.losses import LossConfig, compute_policy_loss
    from minirl_async.algo.logprobs import chunked_logprobs
    from minirl_async.algo.metrics import routing_agreement, staleness_kl, train_infer_kl
"""
