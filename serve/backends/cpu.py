"""Run an artifact's graphs on CPU (x86_64 and arm64). A first-class backend, not a mock."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from pathlib import Path

import torch

from neuronserve.models.artifact import Bucket, Manifest
from neuronserve.models.families import graph_inputs
from neuronserve.serve.backends.base import BackendError, check_shape


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads. Ray gives a replica with num_cpus=0 OMP_NUM_THREADS=1, so the
    count is always set explicitly; `None` means every core this process may use."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


# A grid of at most this many buckets is timed whole; a larger one by `timing_sample`.
TIME_EVERY_BUCKET_UP_TO = 32
SAMPLE_SMALL_TOKENS = 512


def timing_sample(buckets: list[Bucket]) -> list[Bucket]:
    """The buckets the CPU warm-up times: all of a small grid; of a larger one, every bucket of at
    most SAMPLE_SMALL_TOKENS padded tokens (cheap, and where a batch's fixed cost shows) and, per
    batch size, its longest and its middle sequence length. On the default 121-bucket grid that is
    83 buckets but a third of the padded tokens, so a third of the time (docs/decisions.md,
    "CPU warm-up times a sample").

    >>> from neuronserve.models.artifact import parse_buckets
    >>> [str(b) for b in timing_sample(parse_buckets("1x8,1x512,2x8,2x64,2x512,4x512,8x512"))]
    ['1x8', '1x512', '2x8', '2x64', '2x512', '4x512', '8x512']
    """
    ordered = sorted(buckets)
    if len(ordered) <= TIME_EVERY_BUCKET_UP_TO:
        return ordered
    by_size: dict[int, list[Bucket]] = {}
    for b in ordered:
        by_size.setdefault(b.batch_size, []).append(b)
    chosen = {b for b in ordered if b.padded_tokens <= SAMPLE_SMALL_TOKENS}
    for same in by_size.values():
        same.sort(key=lambda b: b.seq_len)
        chosen.update((same[-1], same[len(same) // 2]))
    return sorted(chosen)


class CpuBackend:
    kind = "cpu"

    def __init__(self, artifact_dir: str | Path, manifest: Manifest, *, threads: int | None = None):
        if manifest.target != "cpu":
            raise BackendError(
                f"artifact {artifact_dir} was compiled for {manifest.target}, not cpu; serve it on a Neuron "
                f"host (backend neuron) or compile for cpu with `neuronserve compile --target cpu`"
            )
        self.manifest = manifest
        self.artifact_dir = Path(artifact_dir)
        self.threads = configure_threads(threads)
        self.bf16 = manifest.precision == "bf16"
        self._graphs: dict[Bucket, torch.jit.ScriptModule] = {}
        loaded: dict[str, torch.jit.ScriptModule] = {}
        for entry in manifest.buckets:
            path = self.artifact_dir / entry.file
            if entry.file not in loaded:
                if not path.is_file():
                    raise BackendError(f"graph file {path} for bucket {entry.bucket} is missing; recompile the artifact")
                try:
                    loaded[entry.file] = torch.jit.load(str(path), map_location="cpu").eval()
                except Exception as e:
                    raise BackendError(f"cannot load {path}: {e}") from None
            self._graphs[entry.bucket] = loaded[entry.file]
        # Packed batches (several rows per sequence, see serve.buckets.pack_rows) run on their own
        # graph, at the buckets' shapes; artifacts without it simply never pack.
        self._packed: torch.jit.ScriptModule | None = None
        if manifest.packed is not None:
            path = self.artifact_dir / manifest.packed.file
            if not path.is_file():
                raise BackendError(f"packed graph file {path} is missing; recompile the artifact")
            try:
                self._packed = torch.jit.load(str(path), map_location="cpu").eval()
            except Exception as e:
                raise BackendError(f"cannot load {path}: {e}") from None
        self._n_inputs = len(manifest.inputs)
        self.warmed: dict[str, float] = {}
        self.primed = False  # every graph has run (warmup)

    def forward(self, bucket: Bucket, inputs: tuple[torch.Tensor, ...], threads: int | None = None) -> torch.Tensor:
        """`threads`: torch threads for this call (default: the backend's). The count is set on
        the calling thread every time: OpenMP keeps it per thread, and a thread that has not set
        it starts from whichever count any thread set last."""
        graph = self._graphs.get(bucket)
        if graph is None:
            raise BackendError(f"bucket {bucket} is not compiled in this artifact")
        check_shape(bucket, inputs, self._n_inputs)
        return self._call(graph, inputs, threads)

    @property
    def packing(self) -> bool:
        return self._packed is not None

    def forward_packed(self, bucket: Bucket, inputs: tuple[torch.Tensor, ...], threads: int | None = None) -> torch.Tensor:
        """Run the packed graph: `inputs` are ``(input_ids, position_ids, segment_ids)`` of the
        bucket's shape (`serve.buckets.pad_packed`); returns the token states, float32
        ``[batch, seq_len, hidden]``, for `models.tasks.pool_packed`."""
        if self._packed is None:
            raise BackendError("this artifact has no packed graph; recompile it with packing on")
        if bucket not in self._graphs:
            raise BackendError(f"bucket {bucket} is not compiled in this artifact")
        check_shape(bucket, inputs, 3)
        return self._call(self._packed, inputs, threads)

    def _call(self, graph, inputs: tuple[torch.Tensor, ...], threads: int | None) -> torch.Tensor:
        threads = threads or self.threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            out = graph(*inputs)
        return out.float()

    # Buckets whose first timing is under this are timed again and keep the lesser: they decide
    # whether short rows merge, and one sample is noisy (docs/decisions.md, "CPU warm-up times").
    RETIME_BELOW_S = 0.05

    def warmup(self, forwards: int = 1, measure: bool = True) -> dict[str, float]:
        """Run every bucket once; returns each bucket's seconds of device time (the planner's
        timing table). `measure=False`: only prime each graph (below) and return {}; one graph
        serves every shape, so a bucket's first run is no slower than its next (timing all 121 of
        the default artifact's buckets takes 10-20 s on 2 cores, priming under a second).

        Each graph is first run three times on its smallest bucket (TorchScript optimises a graph
        during its first calls, not per shape), then the buckets of `timing_sample` (every bucket of
        a small grid) once, timed, and only those are returned: the planner estimates the others
        from them and times each on its first served batch; with `forwards` > 1
        the buckets are spread over that many threads running at once, as the replica runs its
        forwards. Then the cheap buckets (under RETIME_BELOW_S) run once more, in reverse order,
        and keep the lesser timing. The packed graph is primed too, not timed apart: a packed batch
        takes what its bucket takes. Numbers: docs/decisions.md, "CPU warm-up primes each graph"."""
        primed: set[int] = set()
        for bucket in sorted(self._graphs):
            graph = self._graphs[bucket]
            if id(graph) not in primed:
                inputs = self._ones(bucket)
                for _ in range(3):
                    self.forward(bucket, inputs)
                primed.add(id(graph))
        if self._packed is not None:
            smallest = min(self._graphs)
            ids = torch.ones((smallest.batch_size, smallest.seq_len), dtype=torch.long)
            positions = torch.arange(smallest.seq_len).repeat(smallest.batch_size, 1)
            for _ in range(3):
                self.forward_packed(smallest, (ids, positions, ids))
        self.primed = True
        if not measure:
            return {}
        first = self._time(timing_sample(sorted(self._graphs)), forwards)
        cheap = sorted((b for b, t in first.items() if t < self.RETIME_BELOW_S), reverse=True)
        again = self._time(cheap, forwards)
        self.warmed.update({str(b): min(t, again.get(b, t)) for b, t in first.items()})
        return dict(self.warmed)

    def _time(self, ordered: list[Bucket], forwards: int) -> dict[Bucket, float]:
        """Seconds of one forward of each bucket, spread over `forwards` threads running at once."""
        seconds: dict[Bucket, float] = {}

        def run(buckets: list[Bucket]) -> None:
            for bucket in buckets:
                inputs = self._ones(bucket)
                t0 = time.perf_counter()
                self.forward(bucket, inputs)
                seconds[bucket] = time.perf_counter() - t0

        if forwards <= 1:
            run(ordered)
            return seconds
        # Interleaved, so each thread gets small and large buckets alike and they end together.
        # One thread per part (a pool may hand a quick part's successor to the same thread).
        errors: list[BaseException] = []

        def part(buckets: list[Bucket]) -> None:
            try:
                run(buckets)
            except BaseException as e:  # re-raised below, in the caller
                errors.append(e)

        workers = [threading.Thread(target=part, args=(ordered[i::forwards],), name=f"warmup_{i}")
                   for i in range(forwards)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        return seconds

    def _ones(self, bucket: Bucket) -> tuple[torch.Tensor, ...]:
        ones = torch.ones((bucket.batch_size, bucket.seq_len), dtype=torch.long)
        return graph_inputs(self.manifest.inputs, ones, ones)

    def health(self) -> dict:
        return {
            "ok": True,
            "backend": self.kind,
            "device": f"cpu ({platform.machine()})",
            "threads": self.threads,
            "buckets": len(self._graphs),
            "packing": self.packing,
            "warmed_up": self.primed,
        }
