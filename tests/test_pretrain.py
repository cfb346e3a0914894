"""MultiTaskSSL machinery with a toy task (independent of the paper's tasks)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from toy_tasks import Brightness, build_batches

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL, export_trunk, load_trunk
from mtssl_lightning.data import ImageBatch
from mtssl_lightning.trunks import ResNetV2


def _model(**tasks):
    tasks = tasks or {"bright": Brightness(batch_size=4, image_size=32)}
    return MultiTaskSSL(tasks=tasks, trunk=ResNetV2("tiny", width=0.125))


def _trainer(tmp_path, **kw):
    args = dict(
        accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=2,
    )
    args.update(kw)
    return pl.Trainer(**args)


def test_empty_or_badly_named_tasks_are_rejected():
    with pytest.raises(ValueError, match="`model.tasks` is empty"):
        MultiTaskSSL(tasks={})
    with pytest.raises(ValueError, match="must be a Python identifier"):
        MultiTaskSSL(tasks={"rel-pos": Brightness()}, trunk=ResNetV2("tiny", width=0.125))


def test_step_uses_every_task_and_weights_the_losses():
    model = _model(a=Brightness(batch_size=2, image_size=32, loss_weight=2.0), b=Brightness(batch_size=3, image_size=32))
    images = {
        "a": ImageBatch(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), torch.arange(2)),
        "b": ImageBatch(torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8), torch.arange(3)),
    }
    torch.manual_seed(0)
    batch = build_batches(model, images)
    assert batch["a"].inputs.shape == (2, 3, 32, 32) and batch["b"].inputs.shape == (3, 3, 32, 32)
    model.log = lambda *a, **k: None  # no trainer attached: logging is not under test here
    model.log_dict = lambda *a, **k: None
    total = model.training_step(batch, 0)
    expected = 2.0 * model.tasks["a"].loss(model.task_forward("a", batch["a"]), batch["a"])
    expected = expected + model.tasks["b"].loss(model.task_forward("b", batch["b"]), batch["b"])
    assert torch.allclose(total, expected)
    total.backward()
    assert model.trunk.root.weight.grad is not None and model.tasks["a"].head[-1].weight.grad is not None


def test_fit_trains_logs_per_task_and_validation_inputs_are_fixed(tmp_path):
    model = _model(a=Brightness(batch_size=4, image_size=32), b=Brightness(batch_size=2, image_size=48, input_mode="lab_gray"))
    dm = MultiTaskDataModule(steps_per_epoch=2, val_samples=4, num_workers=0)
    before = model.trunk.root.weight.detach().clone()
    trainer = _trainer(tmp_path, max_epochs=2, max_steps=-1)
    trainer.fit(model, dm)
    assert not torch.equal(before, model.trunk.root.weight)
    for key in ("train/a/loss_epoch", "train/b/loss_epoch", "val/a/loss", "val/b/loss", "val/a/mse", "train/b/mse"):
        assert key in trainer.callback_metrics, key
    # validation is deterministic: two validation passes of the same weights agree exactly
    first = trainer.validate(model, dm, verbose=False)[0]
    second = trainer.validate(model, dm, verbose=False)[0]
    assert first == second


def test_checkpoint_gives_the_trunk_back(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    trainer.fit(model, MultiTaskDataModule(steps_per_epoch=2, val_samples=4, num_workers=0))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    trunk = load_trunk(ckpt)
    assert isinstance(trunk, ResNetV2) and not trunk.training
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(trunk(x).features, model.trunk(x).features)
    # export: plain trunk state_dict + spec, readable with weights_only=True without this package's training code
    exported = export_trunk(ckpt, tmp_path / "trunk.pt")
    data = torch.load(exported, weights_only=True)
    plain = ResNetV2(**data["trunk_spec"]["init_args"])
    plain.load_state_dict(data["state_dict"])
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x).features, trunk(x).features)
        assert torch.equal(load_trunk(exported)(x).features, trunk(x).features)


def test_load_trunk_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trunk(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_trunk(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an mtssl-lightning checkpoint"):
        load_trunk(tmp_path / "other.ckpt")
    trunk = ResNetV2("tiny", width=0.125)
    state = trunk.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["root.bias"]
    torch.save({"trunk_spec": trunk.spec(), "state_dict": state}, tmp_path / "bad_keys.pt")
    with pytest.raises(ValueError, match=r"missing keys \['root.bias'\], unexpected keys \['extra.weight'\]"):
        load_trunk(tmp_path / "bad_keys.pt")
    torch.save({"trunk_spec": {"class_path": "os.system", "init_args": {}}, "state_dict": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not an mtssl_lightning Trunk"):
        load_trunk(tmp_path / "evil.pt")



class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it with plain ``pickle`` would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_a_malicious_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    trunk = ResNetV2("tiny", width=0.125)
    torch.save({"trunk_spec": trunk.spec(), "state_dict": trunk.state_dict(), "x": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_trunk(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_pixel_scale_shrinks_task_pixel_sizes():
    model = MultiTaskSSL(tasks={"b": Brightness(image_size=224)}, trunk=ResNetV2("tiny", width=0.125), pixel_scale=0.25)
    assert MultiTaskDataModule(samplers=model.task_samplers()).requests["b"].image_size == 56
    with pytest.raises(ValueError, match="pixel_scale"):
        MultiTaskSSL(tasks={"b": Brightness()}, trunk=ResNetV2("tiny", width=0.125), pixel_scale=0)
