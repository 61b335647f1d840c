"""Process entry points (imports as `minirl_async.services`): sampler, grader, learner, local launcher."""
