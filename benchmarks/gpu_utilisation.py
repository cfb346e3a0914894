"""The GPU check's utilisation sampler: the card's busy share every 0.2 s while a timed window runs.

``torch.cuda.utilization`` needs ``pynvml`` (the ``nvidia-ml-py`` distribution), which a GPU machine's
Python need not have (torch does not depend on it, and the check carries no wheel for it); without it
the sampler reads ``nvidia-smi --query-gpu=utilization.gpu -lms 200``, which every machine with the
NVIDIA driver has. With neither, it records no samples and says why (the report shows "–").
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
from typing import Any

import torch

#: seconds between samples
PERIOD_S = 0.2


class UtilisationSampler:
    """Samples the current CUDA device's utilisation (percent) from :meth:`start` to :meth:`stop`."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.source = "none"
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start sampling in a background thread (NVML through torch, else ``nvidia-smi``)."""
        if not torch.cuda.is_available():
            self.problem = "no CUDA"
            return
        try:
            torch.cuda.utilization()
            self.source, target = "nvml", self._sample_nvml
        except Exception as err:  # noqa: BLE001 - no pynvml here: try nvidia-smi
            smi = shutil.which("nvidia-smi")
            if smi is None:
                self.problem = f"torch.cuda.utilization failed ({type(err).__name__}: {err}) and there is no nvidia-smi"
                return
            command = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", _smi_index(), f"--loop-ms={int(PERIOD_S * 1000)}"]
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.source, target = "nvidia-smi", self._sample_smi
        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._thread is not None:
            self._thread.join(5)

    def summary(self) -> dict[str, Any] | None:
        """``{mean, min, samples, source}`` in percent, or None without samples."""
        if not self.samples:
            return None
        return {"mean": statistics.fmean(self.samples), "min": min(self.samples), "samples": len(self.samples), "source": self.source}

    def _sample_nvml(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception as err:  # noqa: BLE001 - NVML went away: keep what was sampled
                self.problem = f"{type(err).__name__}: {err}"
                return

    def _sample_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if self._stop.is_set():
                return
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                self.problem = f"nvidia-smi printed {line.strip()!r}"


def _smi_index() -> str:
    """The current device as ``nvidia-smi -i`` names it: through ``CUDA_VISIBLE_DEVICES`` (indices or
    UUIDs, both of which ``-i`` takes) when it is set, else the CUDA index."""
    index = torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)
