"""Task-parallel and plain DDP training on the CPU (gloo, spawned processes): the gradients every
rank applies equal those computed in one process from the same data, and the trunk stays
identical on all ranks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from toy_tasks import Brightness

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.distributed import TaskParallelStrategy
from mtssl_lightning.trunks import ResNetV2

pytestmark = pytest.mark.slow


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)  # a module-level function: spawned processes unpickle it


def _model(combine: str = "sum", mixing: str = "lasso") -> MultiTaskSSL:
    torch.manual_seed(0)
    tasks = {"a": Brightness(batch_size=3, image_size=32), "b": Brightness(batch_size=2, image_size=32, input_mode="lab_gray")}
    return MultiTaskSSL(tasks=tasks, trunk=ResNetV2("tiny", width=0.125), combine=combine, mixing=mixing,
                        optimizer=_sgd)


def _close(got: torch.Tensor, expected: torch.Tensor, what: str, floor: float) -> None:
    """Equal up to float32 summation order: ‖got − expected‖ ≤ 1e-4 ‖expected‖ + ``floor``.

    The ranks and the reference sum the same terms in different orders (threads, DDP buckets);
    ``floor`` (1e-5 of the whole model's gradient norm) covers gradients that are zero up to
    rounding (e.g. a bias followed by BatchNorm). A wrong averaging (over the wrong ranks) is off
    by a factor like 2 and fails by far."""
    error = torch.linalg.vector_norm(got - expected).item()
    scale = torch.linalg.vector_norm(expected).item()
    assert error <= 1e-4 * scale + floor, f"{what}: ‖diff‖ {error:.3g} vs ‖expected‖ {scale:.3g} (floor {floor:.3g})"


def _floor(reference: dict[str, torch.Tensor]) -> float:
    return 1e-5 * torch.linalg.vector_norm(torch.stack([g.norm() for g in reference.values()])).item()


class Record(pl.Callback):
    """Per rank: the start state, the built batch and the gradients at each optimizer step, the end state."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, module) -> None:
        torch.save(module.state_dict(), Path(self.out) / f"start{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.save(batch, Path(self.out) / f"batch{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})

    def on_fit_end(self, trainer, module) -> None:
        torch.save({"grads": self.grads, "end": module.state_dict(), "tasks": module.active_tasks()},
                   Path(self.out) / f"rank{trainer.global_rank}.pt")


def _run(tmp_path: Path, world: int, strategy, combine: str = "sum") -> list[dict]:
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Record(str(tmp_path))],
    )
    trainer.fit(_model(combine), MultiTaskDataModule(steps_per_epoch=2 * world, val_samples=4, num_workers=0))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _reference(tmp_path: Path, world: int, tasks_of: list[list[str]], task: str | None = None) -> dict[str, torch.Tensor]:
    """Gradients in one process: per rank and task, the task's loss on that rank's batch; trunk
    summed over a rank's tasks and averaged over all ranks, a task's own parameters averaged
    over its ranks (``task`` given: alternate mode, everything averaged over that task's ranks)."""
    model = _model(mixing="lasso")
    model.load_state_dict(torch.load(tmp_path / "start0.pt"))
    model.train()
    model.log = model.log_dict = lambda *a, **k: None
    per_rank = []
    for r in range(world):
        batch = torch.load(tmp_path / f"batch{r}.pt", weights_only=False)
        names = [t for t in tasks_of[r] if task is None or t == task]
        model.zero_grad(set_to_none=False)
        for name in names:
            loss = model.tasks[name].loss(model.task_forward(name, batch[name]), batch[name])
            (loss + model.penalty([name])).backward()
        per_rank.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    out = {}
    for n, _ in model.named_parameters():
        owner = next((t for t in model.tasks if n.startswith((f"tasks.{t}.", f"mixers.{t}."))), None)
        group = task or owner
        ranks = [r for r in range(world) if group is None or group in tasks_of[r]]
        out[n] = sum(per_rank[r][n] for r in ranks) / len(ranks)
    return out


@pytest.mark.parametrize("world,task_ranks", [
    (2, {"a": [0], "b": [1]}),
    (4, {"a": [0, 1, 2], "b": [2, 3]}),
], ids=["2-procs", "4-procs"])
def test_task_parallel_gradients_equal_single_process_reference(tmp_path, world, task_ranks) -> None:
    ranks = _run(tmp_path, world, TaskParallelStrategy(task_ranks, start_method="spawn"))
    tasks_of = [sorted(r["tasks"]) for r in ranks]
    assert tasks_of == [sorted(t for t, rs in task_ranks.items() if r in rs) for r in range(world)]
    starts = [torch.load(tmp_path / f"start{r}.pt") for r in range(world)]
    reference = _reference(tmp_path, world, tasks_of)
    for r, result in enumerate(ranks):
        for k in starts[0]:
            assert torch.equal(starts[0][k], starts[r][k]), k  # every rank starts from rank 0's weights
        (grads,) = result["grads"]
        assert set(grads) == set(reference)
        for name, g in grads.items():
            _close(g, reference[name], f"rank {r}: {name}", _floor(reference))
        for k, v in result["end"].items():
            if k.startswith("trunk.") or v.is_floating_point():
                # after the step (and the buffer sync) every rank holds the same model
                torch.testing.assert_close(v, ranks[0]["end"][k], atol=0, rtol=0, msg=f"rank {r}: {k}")


def test_alternate_mode_task_parallel_steps_each_task_with_its_ranks_gradients(tmp_path) -> None:
    world, task_ranks = 2, {"a": [0], "b": [0, 1]}
    ranks = _run(tmp_path, world, TaskParallelStrategy(task_ranks, start_method="spawn"), combine="alternate")
    tasks_of = [sorted(r["tasks"]) for r in ranks]
    # the reference for b's step starts from the weights after a's step: check a's step, then
    # that b's trunk gradient is averaged over both ranks (identical everywhere)
    reference_a = _reference(tmp_path, world, tasks_of, task="a")
    for result in ranks:
        grads_a, grads_b = result["grads"]
        for name in grads_a:
            _close(grads_a[name], reference_a[name], name, _floor(reference_a))
        for name, g in grads_b.items():
            torch.testing.assert_close(g, ranks[0]["grads"][1][name], atol=0, rtol=0)
        for k, v in result["end"].items():
            torch.testing.assert_close(v, ranks[0]["end"][k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("world", [2, 4])
def test_plain_ddp_gradients_equal_single_process_reference(tmp_path, world) -> None:
    ranks = _run(tmp_path, world, DDPStrategy(start_method="spawn", find_unused_parameters=True))
    reference = _reference(tmp_path, world, [["a", "b"]] * world)
    for r, result in enumerate(ranks):
        (grads,) = result["grads"]
        for name, g in grads.items():
            _close(g, reference[name], f"rank {r}: {name}", _floor(reference))
        for k, v in result["end"].items():
            if k.startswith("trunk.") and "running" not in k:
                torch.testing.assert_close(v, ranks[0]["end"][k], atol=0, rtol=0)
