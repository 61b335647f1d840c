"""`make_prompt_source(cfg, split)`: the prompt stream the controller (train) and evaluation (eval) use.

    from minirl_async.config import load_config
    src = make_prompt_source(load_config("configs/tiny.toml"), "train")
    prompt = next(src)             # Prompt(text="347+85=", meta={"answer": "432", "task": "arith"}, ...)
    state = src.state_dict()       # saved in the learner checkpoint; src.load_state_dict(state) resumes
"""

from __future__ import annotations

from minirl_async.config import Config
from minirl_async.tasks.base import PromptSource, Split
from minirl_async.tasks.jsonl import JsonlSource
from minirl_async.tasks.synthetic import SyntheticSource, parse_task_names


def make_prompt_source(cfg: Config, split: Split = "train") -> PromptSource:
    """An endless deterministic prompt stream for `split` ('train' or 'eval') as configured in `cfg.data`."""
    data = cfg.data
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval' (got {split!r})")
    if data.task == "jsonl":
        path = data.jsonl_path if split == "train" else data.eval_jsonl_path
        if not path:
            key = "data.jsonl_path" if split == "train" else "data.eval_jsonl_path"
            raise ValueError(f"data.task = 'jsonl' needs {key} for the {split} split")
        return JsonlSource(path, data.bad_line_policy)
    return SyntheticSource(parse_task_names(data.task), data.difficulty, data.seed, split)
