"""Resumable training loops: a step counter, atomic checkpoints every N steps, and per-step batches
drawn from a generator seeded by the step, so a resumed run sees the batches an uninterrupted one would."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from pvp_contract.atomic import atomic_path

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def run_steps(name: str, steps: int, step_fn: Callable[[int], dict[str, float]], modules: dict,
              checkpoint: Path, every: int, resume: bool, progress: bool = True) -> dict[str, float]:
    """Run step_fn(step) for step in [start, steps), checkpointing ``modules`` (objects with state_dict /
    load_state_dict: networks and optimisers) every ``every`` steps and at the end (marked complete).
    A step that reports ``converged`` ends the run early. Returns the last step's metrics."""
    start = 0
    state = load_checkpoint(checkpoint) if resume else None
    if state is not None:
        for key, obj in modules.items():
            obj.load_state_dict(state[key])
        start = int(state["step"])
        log.info("%s: resuming from step %d of %d (%s); steps after it were not checkpointed and run again",
                 name, start, steps, checkpoint)
    elif resume:
        log.warning("%s: no checkpoint at %s (the last run stopped before step %d): starting from step 0", name,
                    checkpoint, min(every, steps))
    metrics: dict[str, float] = dict(state.get("metrics", {})) if state else {}
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, unit="step", disable=not progress)
    for step in bar:
        metrics = step_fn(step)
        if metrics.get("converged"):
            log.info("%s: converged at step %d of %d", name, step + 1, steps)
            break
        if step % 25 == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
        if (step + 1) % every == 0 and step + 1 < steps:
            save_checkpoint(checkpoint, {"step": step + 1, "metrics": metrics,
                                         **{k: v.state_dict() for k, v in modules.items()}})
    save_checkpoint(checkpoint, {"step": steps, "metrics": metrics, **{k: v.state_dict() for k, v in modules.items()}})
    return metrics
