"""Training and evaluation callbacks. The library logs through `logging` and never imports a tracking service:
a ten-line Callback that forwards `metrics` is all a wandb/MLflow user needs."""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)


class Callback:
    """Hooks called by MetaTrainer and the evaluation protocol; override what you need."""

    def on_train_step(self, trainer, metrics: dict) -> None:
        pass

    def on_eval(self, name: str, metrics: dict) -> None:
        pass

    def on_checkpoint(self, path: str) -> None:
        pass


class LoggingCallback(Callback):
    """Writes metrics to the `emsedit_fast` logger every `every` training steps."""

    def __init__(self, every: int = 10):
        self.every = every

    def on_train_step(self, trainer, metrics: dict) -> None:
        if metrics["step"] % self.every == 0:
            log.info("step %d: %s", metrics["step"], ", ".join(f"{k}={v}" for k, v in metrics.items() if k != "step"))

    def on_eval(self, name: str, metrics: dict) -> None:
        log.info("eval %s: %s", name, metrics)


class JsonlCallback(Callback):
    """Appends one JSON object per event to `path` (created with its folder)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def _write(self, event: str, payload: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **payload}, default=float) + "\n")

    def on_train_step(self, trainer, metrics: dict) -> None:
        self._write("train_step", metrics)

    def on_eval(self, name: str, metrics: dict) -> None:
        self._write("eval", {"name": name, **metrics})

    def on_checkpoint(self, path: str) -> None:
        self._write("checkpoint", {"path": path})
