"""The Ray backend of a sweep: the same plan, merged and evaluated on a Ray cluster.

One actor per GPU (or per CPU slot on a cluster without GPUs) holds one size at a time as a
`SizeEvaluator`: the family's task vectors and a resident model, loaded once per actor. The driver
cuts each size's merges, already in `merge_order` (by k, then revolving door), into contiguous chunks,
so every chunk keeps consecutive subsets one swap apart; idle actors pull the next chunk, and each merge's
rows stream back as soon as they exist. The driver alone writes the cache (`run_sweep` does).

Ray is an optional extra (`pip install 'mergelab[ray]'`), imported here only, and only when used.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from typing import Iterator

from mergelab.errors import MergelabError
from mergelab.engine.evaluate import EvalData
from mergelab.engine.memory import needed_bytes, require_fit
from mergelab.engine.session import pick_device
from mergelab.engine.threads import apply_threads
from mergelab.io.family import Family
from mergelab.sweep.evaluator import SizeEvaluator
from mergelab.sweep.local import size_plan
from mergelab.sweep.plan import WorkItem, merge_order

INSTALL_HINT = "pip install 'mergelab[ray]'"
IN_FLIGHT = 2        # chunks queued per actor, so an actor never waits on the driver between chunks
MAX_CHUNK = 64       # merges per chunk at most: small enough to balance, large enough to amortise a call
CHUNKS_PER_ACTOR = 4  # per size: an actor finishing last idles the others for at most ~1/4 of its share
LOOPBACK = "127.0.0.1"
LOCAL_NOTE = ("ray: started a private Ray instance on this machine, every server bound to 127.0.0.1 and no "
              "dashboard; to use a cluster, start it with `ray start` and pass --address")


def require_ray():
    """The `ray` module, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise MergelabError(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


class SweepActor:
    """Evaluates chunks of one size at a time. The driver hands out a size's chunks before the next
    size's, so an actor loads each size at most once and never holds two."""

    def __init__(self, family: Family, eval_data: dict[str, EvalData], device: str | None):
        self.family, self.eval_data = family, eval_data
        self.device = pick_device(device)  # "cuda" only where Ray gave this actor a GPU
        self.evaluator: SizeEvaluator | None = None
        self.threads = None  # the ThreadChoice of the size loaded (mergelab.engine.threads)

    def evaluate(self, size_name: str, items: list[WorkItem]) -> Iterator[tuple[WorkItem, list[dict]]]:
        if self.evaluator is None or self.evaluator.size.name != size_name:
            self._release()
            size = self.family.size(size_name)
            # the CPUs Ray gave this actor, not the node's: actors side by side must not oversubscribe it
            self.threads = apply_threads(size.n_params, cores=_assigned_cpus())
            share = 1 / _gpus_on_this_node() if self.device.startswith("cuda") else 1.0
            plan = size_plan(size, items, self.device, share)
            require_fit(plan)
            self.evaluator = SizeEvaluator(self.family.name, size, self.eval_data[size_name], self.device,
                                           store=plan.store, devices=plan.devices)
        yield from self.evaluator.evaluate(items)

    def _release(self) -> None:
        """Free the previous size before loading the next; on CUDA also hand its blocks back from
        torch's cache, or the memory check would count them as taken."""
        import gc

        self.evaluator = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def threads_in_use(self) -> tuple[int, str]:
        """torch's intra-op threads in this actor now, and why the policy chose them ('' before a size is loaded)."""
        import torch

        return torch.get_num_threads(), self.threads.reason if self.threads else ""

    def evaluate_chunk(self, size_name: str, items: list[WorkItem]) -> list[tuple[WorkItem, list[dict]]]:
        """The whole chunk at once, for Ray Client (ray://) connections, which cannot stream generators."""
        return list(self.evaluate(size_name, items))


def chunk_plan(family: Family, todo: dict[str, list[WorkItem]], n_actors: int,
               chunk_size: int | None = None) -> list[tuple[str, list[WorkItem]]]:
    """(size, items) chunks, size after size, each a contiguous slice of the size's merge order."""
    chunks = []
    for name, items in todo.items():
        if not items:
            continue
        ordered = merge_order(items, family.size(name).expert_names)
        step = chunk_size or max(1, min(MAX_CHUNK, math.ceil(len(ordered) / (CHUNKS_PER_ACTOR * n_actors))))
        chunks.extend((name, ordered[i:i + step]) for i in range(0, len(ordered), step))
    return chunks


def ray_results(family: Family, todo: dict[str, list[WorkItem]], eval_data: dict[str, EvalData],
                device: str | None = None, address: str | None = None, actors: int | None = None,
                chunk_size: int | None = None) -> Iterator[tuple[WorkItem, list[dict]]]:
    """Yield (item, rows) for every planned merge as the actors produce them. Connects to the cluster
    at `address` (None: an existing `ray.init` of this process, else RAY_ADDRESS, else a fresh private
    instance bound to 127.0.0.1, `start_local_ray`) and, when closed early or done, kills its actors
    and shuts down only a Ray instance it started itself."""
    ray = require_ray()
    if not any(todo.values()):
        return
    started_here = not ray.is_initialized()
    if started_here and (address or os.environ.get("RAY_ADDRESS")):
        ray.init(address=address)  # a cluster: its network settings are its operator's
    elif started_here:
        start_local_ray(ray)
    pool = []
    try:
        use_gpu, slots, options = _actor_options(ray, family, todo, device)
        n_actors = min(actors or slots, sum(map(len, todo.values())))
        if n_actors < 1:  # only CPU actors can lack a slot: a node whose memory holds no task vectors
            raise MergelabError(f"no node of the Ray cluster has a CPU and {options['memory'] / 2**30:.2f} GiB of "
                                f"memory for an actor (cluster: {ray.cluster_resources()})")
        data = ray.put({name: eval_data[name] for name, items in todo.items() if items})
        remote = ray.remote(SweepActor).options(**options)
        pool = [remote.remote(family, data, "cuda" if use_gpu else "cpu") for _ in range(n_actors)]
        from ray.util.client import ray as ray_client

        stream = not ray_client.is_connected()  # Ray Client (ray://) cannot stream generators
        yield from _stream(ray, pool, deque(chunk_plan(family, todo, n_actors, chunk_size)), stream)
    finally:
        for actor in pool:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def start_local_ray(ray) -> None:
    """Start a private Ray instance on this machine that no other machine can reach: GCS, raylet,
    object manager, workers and agents all bound to 127.0.0.1, no dashboard; says so on stderr.

    By default Ray binds its gRPC servers to every interface (`*`) and swaps a node address of
    127.0.0.1 for the machine's network address on Linux (where it expects clusters); with that swap
    off for the start, Ray binds each server to the loopback node address. Raises MergelabError (after
    shutting the instance down) if the running instance is not on 127.0.0.1 anyway (another Ray)."""
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray resolves _node_ip_address
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, dashboard_host=LOOPBACK)
    finally:
        if saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:
        ray.shutdown()
        raise MergelabError(f"Ray {ray.__version__} started its local instance on {node}, not {LOOPBACK}, so other "
                            f"machines could reach it: stopped. Start Ray yourself and pass --address")
    print(LOCAL_NOTE, file=sys.stderr)


def _assigned_cpus() -> int:
    """The CPUs Ray assigned to the calling actor (at least 1)."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _gpus_on_this_node() -> int:
    """GPUs of the node this actor runs on (at least 1): their actors share the node's host memory."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return max(1, int(next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == node), 1)))


def _actor_options(ray, family: Family, todo, device: str | None) -> tuple[bool, int, dict]:
    """GPU actors (one GPU each) when the cluster has GPUs and the device is not forced to CPU; else CPU
    actors (one CPU each) that also reserve Ray's `memory` resource for their task vectors, so a node
    gets no more of them than its memory holds. Returns (use_gpu, actor slots in the cluster, options)."""
    total = ray.cluster_resources()
    use_gpu = total.get("GPU", 0) >= 1 and device != "cpu"
    if device and device.startswith("cuda") and not use_gpu:
        raise MergelabError(f"device {device!r} requested but the Ray cluster has no GPU")
    if use_gpu:
        return True, int(total["GPU"]), {"num_gpus": 1, "num_cpus": 1}
    sizes = [family.size(name) for name, items in todo.items() if items]
    need = max(needed_bytes(s.n_params, len(s.experts), "cpu") for s in sizes)
    slots = sum(min(int(node["Resources"].get("CPU", 0)), int(node["Resources"].get("memory", 0) // need))
                for node in ray.nodes() if node["Alive"])
    return False, slots, {"num_cpus": 1, "memory": need}


def _stream(ray, pool, chunks: deque, stream: bool = True) -> Iterator[tuple[WorkItem, list[dict]]]:
    """Keep IN_FLIGHT chunks queued on every actor, yield each merge's result as it lands (or, without
    streaming, each chunk's results once the chunk is done)."""
    running = {}  # ObjectRefGenerator (or ObjectRef without streaming) of one chunk -> the actor running it

    def submit(actor) -> None:
        if chunks:
            size_name, items = chunks.popleft()
            call = actor.evaluate if stream else actor.evaluate_chunk
            running[call.remote(size_name, items)] = actor

    for actor in pool:
        for _ in range(IN_FLIGHT):
            submit(actor)
    while running:
        [ready], _ = ray.wait(list(running), num_returns=1)
        if not stream:
            yield from _get(ray, ready)
            submit(running.pop(ready))
            continue
        try:
            ref = next(ready)
        except StopIteration:  # chunk done: give its actor the next one
            submit(running.pop(ready))
            continue
        yield _get(ray, ref)


def _get(ray, ref):
    """ray.get, re-raising a mergelab error from an actor as itself (one clear line in the CLI)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MergelabError):
            raise exc.cause from None
        raise
