"""Regenerate the README's pictures, all produced by the project itself (CPU, ~3 minutes):

* ``docs/img/dashboard.png``: a short four-task lasso run on the sample data, logged to W&B
  offline, drawn from the offline run folder by ``mtssl_lightning.wandb_offline.render_dashboard``;
* ``docs/img/notebook_task_tour.png``: the task pictures of ``notebooks/01_task_tour.ipynb``,
  executed with nbclient (its figures, stacked).

    .venv/bin/python docs/make_images.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"


def dashboard(tmp: Path) -> None:
    import wandb

    from mtssl_lightning.cli import run
    from mtssl_lightning.wandb_offline import render_dashboard, wait_until_finished

    tiny = re.sub(r"runs/tiny", str(tmp), (ROOT / "configs/tiny.yaml").read_text())
    (tmp / "tiny.yaml").write_text(tiny)
    run([
        "fit", "--config", str(ROOT / "configs/pretrain/all_lasso.yaml"), "--config", str(tmp / "tiny.yaml"),
        "--trainer.max_epochs=3", "--trainer.log_every_n_steps=2", "--trainer.limit_val_batches=2",
        "--data.steps_per_epoch=20", "--model.init_args.grad_norm_every_n_steps=4",
        "--trainer.callbacks+=mtssl_lightning.callbacks.TrainingDashboard", "--trainer.callbacks.media_every_n_steps=20",
    ])
    wandb.finish()
    [run_dir] = sorted((tmp / "wandb").glob("offline-run-*"))
    render_dashboard(wait_until_finished(run_dir), IMG / "dashboard.png")


def task_tour(tmp: Path) -> None:
    import nbformat
    from nbclient import NotebookClient
    from PIL import Image

    kernels = tmp / "jupyter" / "kernels" / "mtssl-venv"
    kernels.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "mtssl", "language": "python"}
    (kernels / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = str(tmp / "jupyter")
    nb = nbformat.read(ROOT / "notebooks" / "01_task_tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="mtssl-venv", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    figures = [
        Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"]))).convert("RGB")
        for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", []) if "image/png" in out.get("data", {})
    ]
    width = max(f.width for f in figures)
    sheet = Image.new("RGB", (width, sum(f.height for f in figures)), "white")
    y = 0
    for figure in figures:
        sheet.paste(figure, (0, y))
        y += figure.height
    sheet = sheet.resize((700, round(sheet.height * 700 / sheet.width)), Image.LANCZOS)  # README-sized
    sheet.save(IMG / "notebook_task_tour.png", optimize=True)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dashboard(Path(tmp))
        task_tour(Path(tmp))
    print(f"wrote {IMG / 'dashboard.png'} and {IMG / 'notebook_task_tour.png'}")


if __name__ == "__main__":
    main()
