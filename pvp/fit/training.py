"""Resumable training loops: a step counter, atomic checkpoints every N steps, and per-step random draws
from a generator seeded by the step, so a resumed run sees the batches an uninterrupted one would.

A step returns its metrics as tensors and the loop reads them (one host sync) only on logging and
checkpoint steps: between them a GPU is never made to wait for the host, nor the host for it."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from pvp_contract.atomic import atomic_path

log = logging.getLogger(__name__)
LOG_EVERY = 25
PRECISIONS = ("auto", "float32", "bfloat16")


def render_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype the generator renders in while the from-scratch prior and the mappers train (its weights,
    the losses and the optimisers stay float32). 'auto': bfloat16 on CPUs that compute it natively (AVX512-BF16
    or AMX: tiny's prior step 1.5x and its mapper step 1.3x as fast as in float32 on 2 cores, bench/RESULTS.md),
    float32 elsewhere — a CPU without those emulates it slower than float32, and on GPUs these stages were
    measured in float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        native = torch.device(device).type == "cpu" and bool(cpu_bfloat16_units())
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, precision)


def cpu_bfloat16_units() -> list[str]:
    """This CPU's units that compute bfloat16 natively (none: it would be emulated). AMX is probed by its tile
    unit, which every AMX CPU ships with its bfloat16 instructions."""
    probes = (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
    return [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (as metrics.json records it)."""
    return str(dtype).removeprefix("torch.")


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The step's random generator, on the device the draws are used on (a draw on the CPU moved to a GPU
    would be a synchronising copy every step). The draws depend on the device kind, not on the run."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):  # meta and others have no generators of their own
        device = torch.device("cpu")
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def schedule_lr(opt: torch.optim.Optimizer, lr: float, schedule: str, step: int, steps: int,
                warmup: float = 0.05) -> None:
    """Set every group's learning rate for ``step`` of ``steps``: ``lr`` (a group's own "base_lr" if it has
    one) times 1 ('constant') or 'cosine' (a linear warm-up over the first ``warmup`` of the run, then a
    cosine decay to zero). Host arithmetic only."""
    ramp = max(1, int(steps * warmup))
    if schedule == "constant":
        factor = 1.0
    elif step < ramp:
        factor = (step + 1) / ramp
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))
    for group in opt.param_groups:
        group["lr"] = group.get("base_lr", lr) * factor


def read_metrics(metrics: dict) -> dict[str, float]:
    """Tensors and numbers -> floats, the device's tensors in one transfer."""
    on_device = [k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.device.type != "cpu"]
    read = dict(zip(on_device, torch.stack([metrics[k].detach().float().reshape(()) for k in on_device]).tolist()
                    if on_device else []))
    return {k: read[k] if k in read else float(v) for k, v in metrics.items()}


def run_steps(name: str, steps: int, step_fn: Callable[[int], dict], modules: dict, checkpoint: Path, every: int,
              resume: bool, progress: bool = True, converged: Callable[[], bool] | None = None,
              log_every: int = LOG_EVERY) -> dict[str, float]:
    """Run step_fn(step) for step in [start, steps), checkpointing ``modules`` (objects with state_dict /
    load_state_dict: networks and optimisers) every ``every`` steps and at the end (marked complete).
    ``converged()``, asked on logging steps, ends the run early. Returns the last step's metrics as floats,
    with "steps": the optimiser steps taken in all, and "seconds": the time in those steps (setup apart) over every
    run, a resumed one adding its own to its checkpoint's (steps after that checkpoint are run, and counted, again)."""
    start, earlier_seconds = 0, 0.0
    state = load_checkpoint(checkpoint) if resume else None
    if state is not None:
        for key, obj in modules.items():
            obj.load_state_dict(state[key])
        # a checkpoint written before checkpoints carried "seconds": a finished loop's metrics have its last run's
        earlier_seconds = float(state.get("seconds", state.get("metrics", {}).get("seconds", 0.0)))
        start = int(state["step"])
        log.info("%s: resuming from step %d of %d (%s); steps after it were not checkpointed and run again",
                 name, start, steps, checkpoint)
    elif resume:
        log.warning("%s: no checkpoint at %s (the last run stopped before step %d): starting from step 0", name,
                    checkpoint, min(every, steps))
    metrics: dict = dict(state.get("metrics", {})) if state else {}
    # a finished loop's checkpoint says "step": steps, its metrics the steps it took (fewer where it converged)
    done, t0 = min(start, int(metrics.get("steps", start))), time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, unit="step", disable=not progress)
    for step in bar:
        metrics = step_fn(step)
        done = step + 1
        checkpoint_due = (step + 1) % every == 0 and step + 1 < steps
        if step % log_every == 0 or checkpoint_due:
            metrics = read_metrics(metrics)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            if converged is not None and converged():
                log.info("%s: converged at step %d of %d", name, step + 1, steps)
                break
        if checkpoint_due:
            save_checkpoint(checkpoint, {"step": step + 1, "metrics": metrics,
                                         "seconds": earlier_seconds + time.perf_counter() - t0,
                                         **{k: v.state_dict() for k, v in modules.items()}})
    seconds = earlier_seconds + time.perf_counter() - t0
    metrics = {**read_metrics(metrics), "steps": float(done), "seconds": seconds}
    save_checkpoint(checkpoint, {"step": steps, "metrics": metrics, "seconds": seconds,
                                 **{k: v.state_dict() for k, v in modules.items()}})
    return metrics


class WeightAverage:
    """An exponential moving average of the tensors a training loop optimises (Polyak averaging): the last steps'
    weights averaged, where the last step's alone carry the pull of its own batch. ``half_life`` in steps; early on
    the average forgets faster (its decay is at most (1 + step) / (10 + step), as TensorFlow's
    ExponentialMovingAverage with num_updates), so it does not remember the start."""

    def __init__(self, tensors: list[torch.Tensor], half_life: float):
        if half_life <= 0:
            raise ValueError(f"half_life {half_life}: expected more than 0 steps")
        self.tensors = tensors
        self.average = [t.detach().clone() for t in tensors]
        self.decay = 0.5 ** (1.0 / half_life)

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, self.tensors, 1.0 - decay)

    @torch.no_grad()
    def copy_to_tensors(self) -> None:
        """The optimised tensors take the averaged values."""
        torch._foreach_copy_(self.tensors, self.average)

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.average, state["average"], strict=True):
            mine.copy_(saved)
