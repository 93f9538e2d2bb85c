"""Compiled CPU code for LoRA (``cpu_lora.c``): the op for one-token rows, with bmm as the fallback, and
slot writes as one call.

The op's semantics are ``ops.lora_delta_reference`` with one token per row; the C file states them as
reference PyTorch. What differs from ``ops.add_lora_delta``: each slot is read at its own rank (bmm reads
every slot of a batch at the batch's largest), rows need no padding into equal groups, nothing is gathered.
A slot write (``copy``) is the same copies ``LoraProjectionGroup.slot_copies`` lists, run in one call
without the GIL (the C file says why).

Built with the system's C compiler on first use, cached under ``~/.cache/openlora-ray/kernels`` (or
``$OPENLORA_CACHE/kernels``) by the hash of the source, the compiler and the CPU's flags
(``-march=native`` code must not run on another CPU that shares the home directory), and linked to the
OpenMP runtime torch has already loaded, so its threads are torch's. Whether it replaces bmm is decided
on the machine at hand (``choose_kernel``), as the weight layout is: a compiler may be missing, or bmm
may win on some CPU.
``OPENLORA_RAY_LORA_KERNEL=bmm`` builds nothing (bmm, and slot writes as torch copies), ``=kernel`` keeps
the op wherever it builds (benchmarks and tests).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from openlora_ray.bench.timing import time_interleaved
from openlora_ray.model.prepare import default_cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_lora.c")
CACHE = default_cache_root() / "kernels"
MODES = ("auto", "kernel", "bmm")

_I32, _I64, _PTR = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class KernelRows:
    """One-token rows grouped by slot, for ``CpuLoraKernel.add``.

    slot   (G,)    int32  slot of each group
    rank   (G,)    int32  rank that slot holds (its own, not the batch's largest)
    start  (G+1,)  int32  group g's rows are rows[start[g]:start[g+1]]
    rows   (K,)    int32  batch rows (indices into x's and y's first dimension)
    """

    slot: torch.Tensor
    rank: torch.Tensor
    start: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def build(cls, rows: Sequence[int], slots: Sequence[int], slot_rank: Sequence[int]) -> KernelRows:
        by_slot: dict[int, list[int]] = {}
        for row, s in zip(rows, slots):
            by_slot.setdefault(s, []).append(row)
        start, ordered = [0], []
        for members in by_slot.values():
            ordered += members
            start.append(len(ordered))
        i32 = functools.partial(torch.tensor, dtype=torch.int32)
        return cls(i32(list(by_slot)), i32([slot_rank[s] for s in by_slot]), i32(start), i32(ordered))


class CpuLoraKernel:
    """The loaded library; ``add`` is the op, ``copy`` a slot write."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self._copy = lib.copy_blocks
        self._copy.restype = None
        self._copy.argtypes = [_I32, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I32]
        self._fn = lib.lora_rows
        self._fn.restype = None
        self._fn.argtypes = [
            _PTR, _I64, _PTR, _I64,  # y, y stride, x, x stride
            _PTR, _I64, _I64, _PTR, _I64, _I64,  # a, its slot and projection strides, b, its slot and row strides
            _I64, _I32, _PTR, _PTR, _PTR,  # in, projections, their indices, column starts, widths
            _I32, _PTR, _PTR, _PTR, _PTR, _I32,  # groups, slot, rank, start, rows, threads
        ]
        self._columns: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, ...]] = {}

    def add(
        self,
        y: torch.Tensor,  # (B, 1, out)  base output, updated in place
        x: torch.Tensor,  # (B, 1, in)
        a: torch.Tensor,  # (S, n, R, in)
        b: torch.Tensor,  # (S, R, out)
        plan: KernelRows,
        out_splits: tuple[int, ...],
        active: tuple[int, ...],
    ) -> None:
        """``y[rows] += lora_delta(x[rows])`` for the rows of ``plan`` (see the module doc)."""
        if x.shape[1] != 1 or x.dtype != torch.float32 or not all(t.is_contiguous() for t in (y, a, b)):
            raise ValueError("the CPU kernel takes contiguous float32 one-token rows")
        x = x.contiguous()
        key = (out_splits, active)
        if key not in self._columns:
            offsets = [sum(out_splits[:j]) for j in range(len(out_splits))]
            self._columns[key] = (
                torch.tensor(active, dtype=torch.int32),
                torch.tensor([offsets[j] for j in active], dtype=torch.int64),
                torch.tensor([out_splits[j] for j in active], dtype=torch.int64),
            )
        proj, col_start, col_width = self._columns[key]
        self._fn(
            y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0),
            a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
            a.shape[3], len(active), proj.data_ptr(), col_start.data_ptr(), col_width.data_ptr(),
            plan.slot.shape[0], plan.slot.data_ptr(), plan.rank.data_ptr(), plan.start.data_ptr(),
            plan.rows.data_ptr(), torch.get_num_threads(),
        )


    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """``dst.copy_(src)``, or ``dst.zero_()`` where src is None, for every pair: 2-D views on the CPU with
        contiguous rows, ``src`` of ``dst``'s shape and dtype."""
        columns: list[list[int]] = [[] for _ in range(6)]  # dst, dst stride, src, src stride, rows, row bytes
        for dst, src in pairs:
            rows_ok = dst.dim() == 2 and dst.stride(1) == 1 and (src is None or src.stride(1) == 1)
            if not rows_ok or (src is not None and (src.shape != dst.shape or src.dtype != dst.dtype)):
                raise ValueError("copy takes 2-D views with contiguous rows, src shaped as dst")
            item = dst.element_size()
            values = (
                dst.data_ptr(), dst.stride(0) * item, 0 if src is None else src.data_ptr(),
                0 if src is None else src.stride(0) * item, dst.shape[0], dst.shape[1] * item,
            )
            for column, value in zip(columns, values):
                column.append(value)
        arrays = [(ctypes.c_int64 * len(pairs))(*column) for column in columns]
        self._copy(len(pairs), *map(ctypes.addressof, arrays), torch.get_num_threads())


def _compiler() -> str | None:
    return next((found for cc in ("cc", "gcc", "clang") if (found := shutil.which(cc))), None)


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


@functools.cache
def load() -> CpuLoraKernel | None:
    """The compiled kernel, or None (with the reason logged) where it cannot be built here."""
    cc = _compiler()
    if cc is None:
        log.info("LoRA CPU kernel: no C compiler found; bmm is used")
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + version.encode() + _cpu_flags().encode()).hexdigest()[:16]
    path = CACHE / f"cpu_lora-{digest}.so"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
            # Compiled with OpenMP but linked against no runtime of its own: the symbols resolve to the
            # libgomp torch has loaded (same soname), so the kernel's threads are torch's threads.
            steps = (
                [cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-c", str(SOURCE), "-o", str(obj)],
                [cc, "-shared", str(obj), "-o", str(lib)],
            )
            for cmd in steps:
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    log.warning("LoRA CPU kernel: %s failed (%s); bmm is used", cmd[0], done.stderr.strip()[:400])
                    return None
            os.replace(lib, path)  # atomic: another process may be building the same file
    try:
        return CpuLoraKernel(path)
    except OSError as e:  # e.g. a cache on a noexec mount
        log.warning("LoRA CPU kernel: cannot load %s (%s); bmm is used", path, e)
        return None


def _mode() -> str:
    mode = os.environ.get("OPENLORA_RAY_LORA_KERNEL", "auto")
    if mode not in MODES:
        raise ValueError(f"OPENLORA_RAY_LORA_KERNEL={mode!r}: expected one of {', '.join(MODES)}")
    return mode


@functools.cache
def choose_kernel(
    device: torch.device, dtype: torch.dtype, in_features: int, outs: tuple[int, ...]
) -> CpuLoraKernel | None:
    """The kernel where it is built and beats bmm on this machine, timed once per process and shape on a
    decode step's worth of rows over distinct adapters of mixed ranks; None means bmm."""
    mode = _mode()
    if device.type != "cpu" or dtype != torch.float32 or mode == "bmm":
        return None
    kernel = load()
    if kernel is None or mode == "kernel":
        return kernel
    return kernel if _kernel_wins(kernel, in_features, outs) else None


def copier(device: torch.device) -> CpuLoraKernel | None:
    """The library for slot writes on this device: built on CPU unless ``OPENLORA_RAY_LORA_KERNEL=bmm``."""
    return load() if device.type == "cpu" and _mode() != "bmm" else None


def _kernel_wins(kernel: CpuLoraKernel, in_features: int, outs: tuple[int, ...]) -> bool:
    from openlora_ray.lora.ops import add_lora_delta, one_band

    rows, slots, max_rank, repeats = 16, 16, 64, 7
    ranks = [(8, 16, 32, 64)[s % 4] for s in range(slots)]
    a = torch.randn(slots, len(outs), max_rank, in_features)
    b = torch.randn(slots, max_rank, sum(outs))
    for s, r in enumerate(ranks):
        a[s, :, r:] = 0
        b[s, r:] = 0
    x, y = torch.randn(rows, 1, in_features), torch.zeros(rows, 1, sum(outs))
    active = tuple(range(len(outs)))
    band = one_band(list(range(rows)), list(range(rows)), ranks, rows, x.device)
    plan = KernelRows.build(list(range(rows)), list(range(rows)), ranks)
    paths = {
        "kernel": lambda: kernel.add(y, x, a, b, plan, outs, active),
        "bmm": lambda: add_lora_delta(y, x, a, b, band.rows, band.segments, band.rank, outs, active),
    }
    with torch.inference_mode():  # interleaved, so that a noisy neighbour slows both alike
        best = time_interleaved(paths, iters=1, repeats=repeats, warmup=0)
    log.info("LoRA op: %s (median kernel %.3f ms, bmm %.3f ms; %d rows, in %d, outs %s)",
             "kernel" if best["kernel"] < best["bmm"] else "bmm", best["kernel"] * 1e3, best["bmm"] * 1e3,
             rows, in_features, outs)
    return best["kernel"] < best["bmm"]
