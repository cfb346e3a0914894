"""Task-parallel and plain DDP training on the CPU (gloo, spawned processes): the gradients every
rank applies and the parameters after the step equal those computed in one process from the
same per-rank batches, every rank ends bit-identical, and the bytes the step hands to
torch.distributed's collectives match the README's formula."""

from __future__ import annotations

import traceback
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


def _rmsprop(params) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=1e-3, momentum=0.9)


def _model(combine: str = "sum", mixing: str = "lasso", optimizer=_sgd) -> MultiTaskSSL:
    torch.manual_seed(0)
    tasks = {"a": Brightness(batch_size=3, image_size=32), "b": Brightness(batch_size=2, image_size=32, input_mode="lab_gray")}
    return MultiTaskSSL(tasks=tasks, trunk=ResNetV2("tiny", width=0.125), combine=combine, mixing=mixing,
                        optimizer=optimizer)


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
    """Per rank: the start state, the built batch and the gradients at each optimizer step, the end
    state, and the bytes of every tensor this package handed to a torch.distributed collective
    during the first training step (``all_reduce`` / ``broadcast`` wrapped; the call's stack says
    whether it came from ``mtssl_lightning``)."""

    COLLECTIVES = ("all_reduce", "broadcast")

    def __init__(self, out: str) -> None:
        self.out = out
        self.grads: list[dict[str, torch.Tensor]] = []
        self.sent: list[tuple[str, int, str]] = []  # (collective, bytes, dtype)
        self._originals: dict[str, object] = {}

    def on_fit_start(self, trainer, module) -> None:
        torch.save(module.state_dict(), Path(self.out) / f"start{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.save(batch, Path(self.out) / f"batch{trainer.global_rank}.pt")
        if trainer.world_size > 1 and not self._originals:
            for name in self.COLLECTIVES:
                self._originals[name] = original = getattr(torch.distributed, name)
                setattr(torch.distributed, name, self._counting(name, original))

    def _counting(self, name: str, original):
        def collective(tensor, *args, **kwargs):
            if any("mtssl_lightning" in frame.filename for frame in traceback.extract_stack()[:-1]):
                self.sent.append((name, tensor.numel() * tensor.element_size(), str(tensor.dtype)))
            return original(tensor, *args, **kwargs)
        return collective

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})

    def on_train_end(self, trainer, module) -> None:
        for name, original in self._originals.items():
            setattr(torch.distributed, name, original)

    def on_fit_end(self, trainer, module) -> None:
        torch.save({"grads": self.grads, "end": module.state_dict(), "tasks": module.active_tasks(), "sent": self.sent},
                   Path(self.out) / f"rank{trainer.global_rank}.pt")


def _trainer(tmp_path: Path, world: int, strategy, steps: int = 1, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False, **{"enable_checkpointing": False, **kwargs},
    )


def _run(tmp_path: Path, world: int, strategy, combine: str = "sum") -> list[dict]:
    trainer = _trainer(tmp_path, world, strategy, callbacks=[Record(str(tmp_path))])
    trainer.fit(_model(combine), MultiTaskDataModule(steps_per_epoch=2 * world, val_samples=4, num_workers=0))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _owner(name: str, tasks) -> str | None:
    """The task a parameter belongs to (its head or lasso mixer), ``None`` for the trunk."""
    return next((t for t in tasks if name.startswith((f"tasks.{t}.", f"mixers.{t}."))), None)


def _task_means(tmp_path: Path, world: int, tasks_of: list[list[str]]) -> tuple[MultiTaskSSL, dict[str, dict[str, torch.Tensor]]]:
    """In one process, from the recorded start weights and per-rank batches: for each task t,
    ``mean over the ranks that ran t of ∇(loss_t + penalty_t)`` on its optimizer's parameters
    (trunk, t's head, t's α; zeros elsewhere). Returns the start model and ``{task: {param: grad}}``."""
    model = _model(mixing="lasso")
    model.load_state_dict(torch.load(tmp_path / "start0.pt"))
    model.train()
    model.log = model.log_dict = lambda *a, **k: None
    batches = [torch.load(tmp_path / f"batch{r}.pt", weights_only=False) for r in range(world)]
    means = {}
    for task in model.tasks:
        ranks = [r for r in range(world) if task in tasks_of[r]]
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for r in ranks:
            model.zero_grad(set_to_none=True)
            loss = model.tasks[task].loss(model.task_forward(task, batches[r][task]), batches[r][task])
            (loss + model.penalty([task])).backward()
            for n, p in model.named_parameters():
                if p.grad is not None and _owner(n, model.tasks) in (None, task):
                    total[n] += p.grad
        means[task] = {n: g / len(ranks) for n, g in total.items()}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(torch.load(tmp_path / "start0.pt"))  # the forward passes moved BatchNorm statistics
    return model, means


def _summed(means: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum mode's (and plain DDP's) gradient: ``Σ_t mean_t`` (a head gets only its task's)."""
    names = next(iter(means.values()))
    return {n: sum(m[n] for m in means.values()) for n in names}


def _stepped(model: MultiTaskSSL, grads_in_turn: list[dict[str, torch.Tensor]], params_in_turn: list[list[str]]) -> dict[str, torch.Tensor]:
    """The parameters after SGD (``_sgd``) steps in turn, each over ``params_in_turn[i]`` with
    ``grads_in_turn[i]`` (one optimizer per task; or one step over all parameters)."""
    named = dict(model.named_parameters())
    for grads, names in zip(grads_in_turn, params_in_turn):
        optimizer = _sgd([named[n] for n in names])
        for n in names:
            named[n].grad = grads[n].clone()
        optimizer.step()
    return {n: p.detach().clone() for n, p in named.items()}


def _task_params(model: MultiTaskSSL, task: str) -> list[str]:
    ids = {id(p) for p in model.task_parameters(task)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _check_identical(ranks: list[dict]) -> None:
    for r, result in enumerate(ranks):
        for k, v in result["end"].items():
            torch.testing.assert_close(v, ranks[0]["end"][k], atol=0, rtol=0, msg=f"rank {r}: {k}")


def _expected_bytes(model: MultiTaskSSL, combine: str, width: int) -> int:
    """The README's formula for one training step (float32 parameters): gradients
    ``4 · (S · P_trunk + Σ_t P_head(t))`` with S = T slots (concurrent) or 1 (sum), every buffer
    once in float64 (``8 · N_buffers``), and the T × width float32 table of task means."""
    p_trunk = sum(p.numel() for p in model.trunk.parameters())
    p_heads = sum(p.numel() for t in model.tasks for m in model.task_modules(t) for p in m.parameters())
    slots = len(model.tasks) if combine == "concurrent" else 1
    buffers = sum(b.numel() for b in model.buffers())
    return 4 * (slots * p_trunk + p_heads) + 8 * buffers + 4 * len(model.tasks) * width


#: the paper's one task per rank, and a rank (2) that runs both tasks (two backward passes, one slot each)
LAYOUTS = {"2-procs": (2, {"a": [0], "b": [1]}), "4-procs": (4, {"a": [0, 1], "b": [2, 3]}), "4-procs-shared": (4, {"a": [0, 1, 2], "b": [2, 3]})}


@pytest.mark.parametrize("combine", ["concurrent", "sum"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_task_parallel_step_equals_single_process_reference(tmp_path, layout, combine) -> None:
    world, task_ranks = LAYOUTS[layout]
    ranks = _run(tmp_path, world, TaskParallelStrategy(task_ranks, start_method="spawn"), combine=combine)
    tasks_of = [sorted(r["tasks"]) for r in ranks]
    assert tasks_of == [sorted(t for t, rs in task_ranks.items() if r in rs) for r in range(world)]
    starts = [torch.load(tmp_path / f"start{r}.pt") for r in range(world)]
    for r in range(world):
        for k in starts[0]:
            assert torch.equal(starts[0][k], starts[r][k]), k  # every rank starts from rank 0's weights
    model, means = _task_means(tmp_path, world, tasks_of)
    order = list(model.tasks)
    if combine == "concurrent":  # each task's optimizer, in turn, with its mean gradient at the start parameters
        expected_grads = [means[t] for t in order]
        params = [_task_params(model, t) for t in order]
    else:  # one optimizer, Σ_t mean_t: plain DDP's gradient on the same per-task batches
        expected_grads = [_summed(means)]
        params = [[n for n, _ in model.named_parameters()]]
    expected_end = _stepped(model, expected_grads, params)
    floor = _floor(_summed(means))
    for r, result in enumerate(ranks):
        assert len(result["grads"]) == len(expected_grads)
        for got, expected, names in zip(result["grads"], expected_grads, params):
            for n in names:
                _close(got[n], expected[n], f"rank {r}: grad {n}", floor)
        for n, value in expected_end.items():
            _close(result["end"][n], value, f"rank {r}: {n} after the step", floor)
    _check_identical(ranks)  # parameters, optimizer-visible buffers: bit-identical on every rank
    sent = sum(nbytes for _, nbytes, _ in ranks[0]["sent"])
    width = 1 if combine == "concurrent" else 2  # sum mode also averages grad_norm/<task> (due at step 0)
    assert sent == _expected_bytes(model, combine, width), ranks[0]["sent"]
    assert {dtype for _, _, dtype in ranks[0]["sent"]} == {"torch.float32", "torch.float64"}
    assert all(r["sent"] == ranks[0]["sent"] for r in ranks)  # the same collectives, in the same order


def test_alternate_mode_task_parallel_steps_each_task_with_its_ranks_gradients(tmp_path) -> None:
    world, task_ranks = 2, {"a": [0], "b": [0, 1]}
    ranks = _run(tmp_path, world, TaskParallelStrategy(task_ranks, start_method="spawn"), combine="alternate")
    tasks_of = [sorted(r["tasks"]) for r in ranks]
    # the reference for b's step starts from the weights after a's step: check a's step, then
    # that b's trunk gradient is the same everywhere
    model, means = _task_means(tmp_path, world, tasks_of)
    floor = _floor(means["a"])
    for result in ranks:
        grads_a, grads_b = result["grads"]
        for name in _task_params(model, "a"):
            _close(grads_a[name], means["a"][name], name, floor)
        for name, g in grads_b.items():
            torch.testing.assert_close(g, ranks[0]["grads"][1][name], atol=0, rtol=0)
    _check_identical(ranks)


@pytest.mark.parametrize("world", [2, 4])
def test_plain_ddp_gradients_equal_single_process_reference(tmp_path, world) -> None:
    ranks = _run(tmp_path, world, DDPStrategy(start_method="spawn", find_unused_parameters=True))
    _, means = _task_means(tmp_path, world, [["a", "b"]] * world)
    reference = _summed(means)
    for r, result in enumerate(ranks):
        (grads,) = result["grads"]
        for name, g in grads.items():
            _close(g, reference[name], f"rank {r}: {name}", _floor(reference))
        for k, v in result["end"].items():
            if k.startswith("trunk.") and "running" not in k:
                torch.testing.assert_close(v, ranks[0]["end"][k], atol=0, rtol=0)


def test_task_parallel_concurrent_resume_is_exact(tmp_path) -> None:
    """2 gloo processes, RMSProp with momentum: 2 epochs of one step in one run equal 1 epoch, a
    checkpoint (rank 0's: every head and every task optimizer's state is there) and 1 more epoch
    after resuming. (Epoch boundaries: a resume mid-epoch restarts the epoch's data.)"""
    world, task_ranks = LAYOUTS["2-procs"]

    def fit(root: Path, epochs: int, ckpt: str | None = None) -> list[dict]:
        root.mkdir()
        pl.seed_everything(0)
        trainer = _trainer(root, world, TaskParallelStrategy(task_ranks, start_method="spawn"), -1, max_epochs=epochs,
                           enable_checkpointing=True, default_root_dir=root, callbacks=[Record(str(root))])
        trainer.fit(_model("concurrent", optimizer=_rmsprop), MultiTaskDataModule(steps_per_epoch=world, val_samples=4, num_workers=0), ckpt_path=ckpt)
        return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(world)]

    straight = fit(tmp_path / "straight", 2)
    fit(tmp_path / "first", 1)
    [ckpt] = (tmp_path / "first").rglob("*.ckpt")
    resumed = fit(tmp_path / "resumed", 2, str(ckpt))
    assert len(straight[0]["grads"]) == 4 and len(resumed[0]["grads"]) == 2  # two task updates per step
    _check_identical(resumed)
    for k, v in straight[0]["end"].items():
        torch.testing.assert_close(resumed[0]["end"][k], v, atol=0, rtol=0, msg=k)
