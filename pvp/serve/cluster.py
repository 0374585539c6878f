"""Timeline renders and fit jobs on a Ray cluster (``pip install 'pvp[cluster]'``; docs/cluster.md).

A render is planned as shots (:class:`pvp.serve.batch_render.Shot`) cut into chunks of one batch each; one
:class:`RenderWorker` actor per GPU (per CPU on a cluster without GPUs) loads each avatar once and writes
the frames of the chunks it is given with the single-process writer (:func:`~pvp.serve.batch_render.
write_frames`: atomic files). This process hands out chunks as workers finish them and alone writes the
folder's manifest, so a restarted render renders only what is missing. Ray restarts a worker that dies and
retries the chunks it had (``max_restarts``, ``max_task_retries``); a chunk rendered twice writes the same
files twice.

A fit (``pvp fit --cluster``) is one Ray task that runs the usual FitJob on a worker, with one GPU when the
cluster has GPUs (one CPU otherwise); fits submitted together queue for the GPUs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections import deque

from tqdm import tqdm

from pvp_contract.frames import record

INSTALL = "pip install 'pvp[cluster]'"
RESTARTS = 3  # a worker that dies is restarted (and its chunks retried) this many times
IN_FLIGHT = 2  # chunks queued per worker: the next one is there when a batch finishes


class ClusterError(Exception):
    """A cluster address that cannot be used, or a job that failed on the cluster: one line."""


def _ray(address: str):
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--cluster {address}: ray is not installed; {INSTALL}") from None
    return ray


def _reachable(address: str) -> None:
    host, _, port = address[len("ray://"):].rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--cluster {address}: expected ray://HOST:PORT (the head's Ray Client port, 10001)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise ClusterError(f"--cluster {address}: cannot reach {host}:{port} ({e.strerror or e}); is "
                           "`ray start --head` running there?") from None


@contextlib.contextmanager
def connected(address: str = "local", num_cpus: int | None = None):
    """Ray for the block. ``local``: a Ray started in this process (``num_cpus`` workers, default every core);
    ``auto``: the cluster this machine belongs to (RAY_ADDRESS, or a ``ray start`` here), else a local one;
    ``ray://HOST:PORT``: a remote cluster through Ray Client. A Ray already initialised in this process (a
    test, a notebook) is used as it is and left running."""
    if address not in ("local", "auto") and not address.startswith("ray://"):
        raise ClusterError(f"--cluster {address}: expected auto, local or ray://HOST:PORT")
    ray = _ray(address)
    if ray.is_initialized():
        yield ray
        return
    quiet = dict(logging_level=logging.WARNING, configure_logging=True)
    if address == "local":
        kwargs = dict(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    elif address == "auto":
        kwargs = dict(include_dashboard=False, **quiet)
    else:
        _reachable(address)
        kwargs = dict(address=address, **quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"--cluster {address}: cannot start or join Ray ({first})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def worker_resources(ray) -> dict:
    """One GPU per worker on a cluster with GPUs, else one CPU."""
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}


def _resolve(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class RenderWorker:
    """One renderer (a GPU, or a CPU worker): each avatar is loaded once, on its first chunk."""

    def __init__(self, device: str = "auto", batch: int = 16):
        self.device, self.batch = _resolve(device), batch
        self.services = {}

    def pid(self) -> int:
        return os.getpid()

    def render(self, shot, positions: list[int]) -> dict[int, str]:
        from pvp.avatar import Avatar
        from pvp.serve.batch_render import write_frames
        from pvp.serve.render_service import RenderService

        if shot.avatar not in self.services:
            self.services[shot.avatar] = RenderService(Avatar.load(shot.avatar, self.device), max_batch=self.batch)
        return write_frames(self.services[shot.avatar], shot, positions)


class ClusterRender:
    """Render what is missing of some shots on the connected Ray cluster. ``on_chunk(render, worker)`` is
    called after each finished chunk (with the index of the worker that rendered it, which has already been
    given its next chunk); ``pids`` are the workers' process ids at the start."""

    def __init__(self, shots, workers: int | None = None, batch: int = 16, device: str = "auto", on_chunk=None):
        import ray

        from pvp.serve.batch_render import chunks

        self.ray, self.shots, self.batch, self.device, self.on_chunk = ray, shots, batch, device, on_chunk
        self.work = deque(chunks(shots, batch))
        self.total = sum(len(s.frames) for s in shots)
        self.done = self.total - sum(len(p) for _, p in self.work)
        self.rendered = 0
        resources = worker_resources(ray)
        if workers is None:
            key = "GPU" if "num_gpus" in resources else "CPU"
            workers = int(ray.cluster_resources().get(key, 1))
        self.workers = max(1, min(workers, len(self.work)))
        self.actors, self.pids = [], []
        self.options = dict(**resources, max_restarts=RESTARTS, max_task_retries=RESTARTS)

    def run(self, progress: bool = True) -> int:
        """-> frames rendered now."""
        ray = self.ray
        if not self.work:
            return 0
        remote = ray.remote(**self.options)(RenderWorker)
        self.actors = [remote.remote(self.device, self.batch) for _ in range(self.workers)]
        shot_refs = [ray.put(s) for s in self.shots]
        pending = {}

        def give(w: int) -> None:
            if self.work:
                i, positions = self.work.popleft()
                pending[self.actors[w].render.remote(shot_refs[i], positions)] = (w, i, positions)

        try:
            self.pids = self._get([a.pid.remote() for a in self.actors])
            for w in range(self.workers):
                for _ in range(IN_FLIGHT):
                    give(w)
            with tqdm(total=self.total, initial=self.done, desc=f"render ({self.workers} workers)", unit="frame",
                      disable=not progress) as bar:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    w, i, positions = pending.pop(ready[0])
                    record(self.shots[i].folder, self._get(ready[0]))
                    self.done += len(positions)
                    self.rendered += len(positions)
                    bar.update(len(positions))
                    give(w)
                    if self.on_chunk is not None:
                        self.on_chunk(self, w)
        finally:
            for a in self.actors:
                ray.kill(a)
        return self.rendered

    def _get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        except self.ray.exceptions.RayError as e:
            raise ClusterError(f"the cluster lost the render: {str(e).strip().splitlines()[0].rstrip('.')}; "
                               "run again to render what is missing") from None


def _cause(e) -> Exception:
    """The exception a worker raised (an AvatarError, a FitError...), so the command prints its one line."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else ClusterError(str(e).strip().splitlines()[0])


def remote_call(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` as one task on the connected cluster with one worker's resources (a GPU
    when the cluster has GPUs) and return its result; a failure raises the worker's exception."""
    import ray

    task = ray.remote(**worker_resources(ray), max_retries=RESTARTS)(fn)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as e:
        raise _cause(e) from None


def fit_on_worker(inputs: dict, device: str = "auto") -> dict:
    """A FitJob run where this is called (a worker): its device resolved there. -> the fit's metrics."""
    import torch

    from pvp.fit.pipeline import FitInputs, FitJob

    return FitJob(FitInputs(**inputs, device=torch.device(_resolve(device)))).run()
