"""Multi-task training modes: lasso unit mixing, per-task optimizers (alternate), exact resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from toy_tasks import Brightness, build_batches

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.data import ImageBatch
from mtssl_lightning.trunks import ResNetV2
from mtssl_lightning.trunks.lasso import UnitMixer


def _tasks() -> dict[str, Brightness]:
    return {"a": Brightness(batch_size=4, image_size=32), "b": Brightness(batch_size=2, image_size=32, input_mode="lab_gray")}


def _model(**kwargs) -> MultiTaskSSL:
    torch.manual_seed(0)
    kwargs.setdefault("trunk", ResNetV2("v2_50", width=0.125))  # 6 units in block 3
    return MultiTaskSSL(tasks=_tasks(), **kwargs)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=1, deterministic=True,
    )
    args.update(kw)
    return pl.Trainer(**args)


def _batch(model: MultiTaskSSL) -> dict:
    g = torch.Generator().manual_seed(1)
    images = {
        name: ImageBatch(torch.randint(0, 255, (task.batch_size, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(task.batch_size))
        for name, task in model.tasks.items()
    }
    return build_batches(model, images)


# --------------------------------------------------------------------------------------------
# lasso
# --------------------------------------------------------------------------------------------


def test_unit_mixer_normalises_each_unit_then_mixes_then_relu() -> None:
    """By hand: each unit standardised per channel over the batch (training mode), weighted by α,
    summed, ReLU; in eval mode with fresh statistics the normalisation is the identity (÷√(1+ε))."""
    mixer = UnitMixer(3, 4, init="uniform")
    torch.testing.assert_close(mixer.alpha.detach(), torch.full((3,), 1 / 3))
    with torch.no_grad():
        mixer.alpha.copy_(torch.tensor([0.5, -2.0, 0.0]))
    units = [torch.randn(5, 4, 3, 3) * (u + 1) + u for u in range(3)]  # units on different scales
    standard = [(x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5) for x in units]
    torch.testing.assert_close(mixer(units), torch.relu(0.5 * standard[0] - 2.0 * standard[1]), rtol=1e-5, atol=1e-5)
    fresh = UnitMixer(3, 4, init="uniform").eval()
    torch.testing.assert_close(fresh(units), torch.relu(sum(units) / 3 / (1 + 1e-5) ** 0.5), rtol=1e-5, atol=1e-5)
    assert torch.equal(UnitMixer(3, 4).alpha.detach(), torch.tensor([0.0, 0.0, 1.0]))  # "last"


def test_the_mix_grows_with_alpha_so_the_penalty_competes_with_the_loss() -> None:
    """The flaw of a normalisation after the mix: the output (and so the loss) did not depend on
    α's scale. Now doubling α doubles the mixed features (ReLU is positively homogeneous)."""
    mixer = UnitMixer(4, 3, init="uniform")
    units = [torch.randn(6, 3, 2, 2) for _ in range(4)]
    once = mixer(units)
    with torch.no_grad():
        mixer.alpha.mul_(2.0)
    torch.testing.assert_close(mixer(units), 2.0 * once)


def _selection_share(penalty: float, seed: int, steps: int = 300) -> float:
    """A synthetic task whose signal is in unit 2 only (channel 0 of the others is empty): a mixer
    (α = 1/6 each) + pooled linear head (zero init), Adam 0.01; returns |α_2| / Σ|α| at the end."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    units_n, channels, signal = 6, 8, 2
    mixer = UnitMixer(units_n, channels, init="uniform")
    head = torch.nn.Linear(channels, 1)
    torch.nn.init.zeros_(head.weight)
    optimizer = torch.optim.Adam([*mixer.parameters(), *head.parameters()], lr=0.01)
    for _ in range(steps):
        units = [torch.randn(32, channels, 4, 4, generator=g) for _ in range(units_n)]
        for u in range(units_n):
            if u != signal:
                units[u][:, 0] = 0.0
        target = 3 * torch.relu(units[signal][:, 0]).mean((1, 2))
        prediction = head(mixer(units).mean((2, 3))).squeeze(1)
        loss = torch.nn.functional.mse_loss(prediction, target) + penalty * mixer.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    alpha = mixer.alpha.detach().abs()
    return float(alpha[signal] / alpha.sum())


@pytest.mark.parametrize("penalty", [0.0, 0.03])
def test_the_lasso_selects_the_unit_that_carries_the_signal(penalty) -> None:
    """Only unit 2 of 6 carries what the task needs. With λ = 0.03 the L1 penalty concentrates α on
    it: share of Σ|α| on unit 2 measured 0.993–0.997 over seeds 0–9 (2 threads and 1 thread alike);
    asserted ≥ 0.9 for seeds 0–2. Without the penalty α stays spread over the units that do not
    hurt the loss: 0.41–0.51 over seeds 0–9; asserted ≤ 0.7."""
    shares = [_selection_share(penalty, seed) for seed in range(3)]
    if penalty > 0:
        assert min(shares) >= 0.9, shares
    else:
        assert max(shares) <= 0.7, shares


def test_lasso_penalty_gradient_matches_its_formula() -> None:
    model = _model(mixing="lasso", lasso_penalty=0.05)
    with torch.no_grad():
        for mixer in model.mixers.values():
            mixer.alpha.copy_(torch.tensor([0.3, -0.2, 0.0, 1.5, -0.01, 0.7]))
    penalty = model.penalty(["a", "b"])
    assert penalty.item() == pytest.approx(0.05 * 2 * (0.3 + 0.2 + 0 + 1.5 + 0.01 + 0.7))
    penalty.backward()
    for mixer in model.mixers.values():  # d/dα λ|α| = λ sign(α), 0 at 0
        torch.testing.assert_close(mixer.alpha.grad, 0.05 * torch.sign(mixer.alpha.detach()))


def test_lasso_heads_read_their_own_mix_of_the_units() -> None:
    model = _model(mixing="lasso").eval()
    batch = _batch(model)
    with torch.no_grad():
        model.mixers["a"].alpha.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
        out = model.trunk(batch["a"].inputs)
        normed = model.mixers["a"].normalized_units(out.units)  # (N, U, C, h, w)
        expected = model.tasks["a"](torch.relu(normed[:, 1]), batch["a"])
        torch.testing.assert_close(model.task_forward("a", batch["a"]), expected)
    assert len(out.units) == 6


def test_naive_mode_has_no_alpha_and_rejects_bad_options() -> None:
    assert len(_model().mixers) == 0
    with pytest.raises(ValueError, match="mixing"):
        _model(mixing="sparse")
    with pytest.raises(ValueError, match="task_ratios"):
        _model(task_ratios={"a": 0.5})  # sum mode
    with pytest.raises(ValueError, match="unknown task"):
        _model(combine="alternate", task_ratios={"zz": 0.5})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        _model(combine="alternate", task_ratios={"a": 1.5})
    with pytest.raises(ValueError, match="at least one task must run every step"):
        _model(combine="alternate", task_ratios={"a": 0.5, "b": 0.5})


# --------------------------------------------------------------------------------------------
# per-task optimizers
# --------------------------------------------------------------------------------------------


def test_alternate_mode_steps_each_task_optimizer_once_per_batch_over_the_trunk(tmp_path) -> None:
    model = _model(combine="alternate", mixing="lasso", optimizer=lambda p: torch.optim.RMSprop(p, lr=1e-3))
    steps: list[str] = []
    trunk_params = {id(p) for p in model.trunk.parameters()}

    class Count(pl.Callback):
        def on_fit_start(self, trainer, module):
            for name, opt in zip(module.tasks, trainer.optimizers):
                owned = {id(p) for group in opt.param_groups for p in group["params"]}
                assert trunk_params <= owned  # every task's optimizer updates the whole trunk
                assert {id(p) for p in module.tasks[name].parameters()} <= owned
                assert {id(p) for p in module.mixers[name].parameters()} <= owned
                other = "b" if name == "a" else "a"
                assert not {id(p) for p in module.tasks[other].parameters()} & owned
                opt.register_step_post_hook(lambda *_, name=name: steps.append(name))

    dm = MultiTaskDataModule(steps_per_epoch=3, val_samples=4, num_workers=0)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[Count()])
    trainer.fit(model, dm)
    assert steps == ["a", "b"] * 3  # the trunk moved once per task per batch, in task order
    assert trainer.global_step == 3  # global_step counts batches, not task updates
    assert "train/a/loss_epoch" in trainer.callback_metrics and "lasso/b/alpha_05" in trainer.callback_metrics


def test_alternate_mode_clips_each_task_gradient(tmp_path) -> None:
    norms: list[float] = []

    class Norm(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    model = _model(combine="alternate", gradient_clip_val=1e-3)
    dm = MultiTaskDataModule(steps_per_epoch=2, val_samples=4, num_workers=0)
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Norm()]).fit(model, dm)
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-4)  # 2 batches × 2 task optimizers


def test_task_ratios_schedule() -> None:
    model = _model(combine="alternate", task_ratios={"b": 0.25})
    assert [model.runs_at("b", s) for s in range(8)] == [False, False, False, True] * 2
    assert all(model.runs_at("a", s) for s in range(8))


def test_every_schedule_follows_training_steps_whether_its_task_ran_or_not(tmp_path) -> None:
    """alternate with task b at a quarter of the steps: after 8 steps both tasks' StepLR (halving
    each step) are at lr × 0.5⁸ — a schedule counts training steps (the paper's steps are shared
    by all tasks), so task_ratios does not stretch it — while b's optimizer stepped only twice."""
    model = _model(
        combine="alternate", task_ratios={"b": 0.25},
        optimizer=lambda p: torch.optim.SGD(p, lr=1e-3),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    _trainer(tmp_path, max_steps=8, limit_val_batches=0).fit(model, MultiTaskDataModule(steps_per_epoch=8, num_workers=0))
    optimizers = model.optimizers()
    assert [o.param_groups[0]["lr"] for o in optimizers] == pytest.approx([1e-3 * 0.5**8] * 2, rel=1e-12)
    assert [s.last_epoch for s in model.lr_schedulers()] == [8, 8]
    assert [model.runs_at("b", step) for step in range(8)].count(True) == 2


# --------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"combine": "alternate", "mixing": "lasso"},
    {"combine": "concurrent", "mixing": "lasso"},
    {"combine": "sum", "mixing": "naive"},
], ids=["alternate-lasso", "concurrent-lasso", "sum-naive"])
def test_resume_continues_exactly(tmp_path, options) -> None:
    """N = 6 steps in one run equal 3 steps, a checkpoint, and 3 more steps after resuming:
    same parameters, same optimizer states (all optimizers), same LR schedulers."""

    def fit(epochs: int, root, ckpt=None) -> MultiTaskSSL:
        pl.seed_everything(0, workers=True)
        model = _model(
            optimizer=lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
            **options,
        )
        dm = MultiTaskDataModule(steps_per_epoch=3, val_samples=4, num_workers=0)
        trainer = _trainer(root, max_epochs=epochs, enable_checkpointing=True)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model, trainer

    straight, _ = fit(2, tmp_path / "straight")
    _, first = fit(1, tmp_path / "first")
    ckpt = first.checkpoint_callback.best_model_path
    resumed, trainer = fit(2, tmp_path / "resumed", ckpt)
    assert trainer.global_step == 6
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
    for (name, p), (_, q) in zip(straight.named_buffers(), resumed.named_buffers()):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------------------------
# non-finite losses
# --------------------------------------------------------------------------------------------


class Poisoned(Brightness):
    """Brightness whose loss is NaN at its ``nan_at``-th call (counting from 0)."""

    def __init__(self, nan_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_at, self.calls = nan_at, 0

    def loss(self, prediction, batch):
        loss = super().loss(prediction, batch)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 == self.nan_at else loss


def _poisoned(**kwargs) -> MultiTaskSSL:
    torch.manual_seed(0)
    tasks = {"a": Brightness(batch_size=4, image_size=32), "b": Poisoned(1, batch_size=2, image_size=32)}
    return MultiTaskSSL(tasks=tasks, trunk=ResNetV2("tiny", width=0.125), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)


@pytest.mark.parametrize("combine", ["sum", "alternate", "concurrent"])
def test_nonfinite_loss_skips_the_update_with_a_warning(tmp_path, combine) -> None:
    """Task b's loss is NaN at step 1: that update leaves no trace (decided on the device); the
    check after the step (``check_every_n_steps=1``) warns and counts it."""
    model = _poisoned(combine=combine, check_every_n_steps=1)
    seen: list[dict[str, torch.Tensor]] = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append({n: p.detach().clone() for n, p in module.named_parameters()})

    dm = MultiTaskDataModule(steps_per_epoch=3, val_samples=4, num_workers=0)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Snap()])
    with pytest.warns(UserWarning, match=r"non-finite training loss in 1 update\(s\) up to step 2 \(first ever at step 1\): updates skipped"):
        trainer.fit(model, dm)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())  # BatchNorm statistics too
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    b_head = [n for n in seen[0] if n.startswith("tasks.b.")]
    a_head = [n for n in seen[0] if n.startswith("tasks.a.")]
    # batch 1: b's update is skipped (in sum mode the whole step), so b's head did not move
    assert all(torch.equal(seen[0][n], seen[1][n]) for n in b_head)
    moved_a = any(not torch.equal(seen[0][n], seen[1][n]) for n in a_head)
    assert moved_a == (combine != "sum")  # one optimizer per task: a's own update still happened
    assert any(not torch.equal(seen[1][n], seen[2][n]) for n in b_head)  # training goes on


@pytest.mark.parametrize("combine", ["sum", "alternate", "concurrent"])
def test_nonfinite_loss_can_stop_with_the_weights_from_before_the_step(tmp_path, combine) -> None:
    """With ``nonfinite: stop`` a NaN in task b at step 1 undoes the whole step (also task a's update
    of it, which came first in alternate mode) and every later one until the check, which saves the
    weights, optimizer states and BatchNorm statistics from before step 1 and raises."""
    model = _poisoned(nonfinite="stop", combine=combine, check_every_n_steps=2)
    before: dict[str, torch.Tensor] = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 0:  # the state after step 0 = the state before the bad step 1
                before.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    dm = MultiTaskDataModule(steps_per_epoch=3, val_samples=4, num_workers=0)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Snap()])
    with pytest.raises(FloatingPointError, match=r"at step 1 \(found at the check of step 2\).*nonfinite-last-good.ckpt"):
        trainer.fit(model, dm)
    ckpt = torch.load(tmp_path / "nonfinite-last-good.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    assert set(state) == set(before)
    for name, value in before.items():
        assert torch.equal(state[name], value), name  # exactly the state before the bad step
