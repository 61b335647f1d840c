"""One rank of the FSDP2 test (launched by test_fsdp.py with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set,
like torchrun): trains a few steps on the shared toy batch, saves a checkpoint, writes what rank 0 saw; then reloads the
checkpoint and writes each rank's first random draws after the save and after the load.

    python tests/learner/fsdp_worker.py OUT_DIR DTYPE COMPUTE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from learner_util import make_groups, run_config, tiny_model  # noqa: E402

from minirl_async.learner import Trainer, broadcast_groups  # noqa: E402
from minirl_async.learner.fsdp import init_distributed  # noqa: E402

STEPS = 3


def batches(model: torch.nn.Module) -> list:
    return [make_groups(model, num_groups=4, G=3, seed=100 + s) for s in range(STEPS)]


def overrides(compute: str) -> list[str]:
    return [f"learner.compute_dtype={compute}", "learner.groups_per_step=4", "learner.minibatch_groups=2",
            "learner.keep_last=1"]


def main() -> None:
    out, dtype, compute = Path(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rank, world = init_distributed("cpu")
    model = tiny_model(dtype=dtype)
    data = broadcast_groups(batches(model) if rank == 0 else None)   # as the learner service does
    tr = Trainer(run_config(*overrides(compute)), model)
    metrics = [tr.train_step(groups, ["none", "r2", "r3"][s % 3]) for s, groups in enumerate(data)]
    state = {name: t.clone() for name, t in tr.iter_full_state()}
    torch.manual_seed(1000 + rank)   # a different RNG stream per rank, as e.g. dropout would need
    tr.save_checkpoint(out / "ckpt", extra={"world": world})
    after_save = torch.rand(4)
    torch.manual_seed(0)
    tr.load_latest(out / "ckpt")     # each rank must get its OWN RNG state back
    torch.save({"after_save": after_save, "after_load": torch.rand(4)}, out / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({"metrics": metrics, "state": state}, out / "result.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
