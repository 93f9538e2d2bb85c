"""The compiled CPU LoRA op matches its definition, and bmm takes over wherever it cannot be used."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora_ray.lora import cpu_kernel
from openlora_ray.lora.cpu_kernel import KernelRows
from openlora_ray.lora.ops import NO_ADAPTER, lora_delta_reference
from test_ops import SLOT_PATTERNS

S, N_PROJ, R = 6, 3, 8
RANKS = [8, 3, 5, 1, 7, 8]  # every slot's own rank; the stacks are zero beyond it, as slots hold them


@pytest.fixture(scope="module")
def kernel() -> cpu_kernel.CpuLoraKernel:
    built = cpu_kernel.load()
    if built is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    return built


def stacks(d_in: int, splits: tuple[int, ...], active: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(S, N_PROJ, R, d_in), torch.zeros(S, R, sum(splits))
    for s, r in enumerate(RANKS):
        a[s, :, :r] = torch.randn(N_PROJ, r, d_in, generator=gen)
        b[s, :r] = torch.randn(r, sum(splits), generator=gen)
    start = 0
    for j, width in enumerate(splits):
        if j not in active:  # a projection no adapter has: zeros in every slot
            a[:, j], b[:, :, start : start + width] = 0, 0
        start += width
    return a, b


def check(
    kernel: cpu_kernel.CpuLoraKernel, slots: list[int], *, d_in: int, active: tuple[int, ...], seed: int = 0
) -> None:
    splits = (d_in, 24, 17)
    a, b = stacks(d_in, splits, active, seed)
    x = torch.randn(len(slots), 1, d_in, generator=torch.Generator().manual_seed(seed + 1))
    base = torch.randn(len(slots), 1, sum(splits), generator=torch.Generator().manual_seed(seed + 2))
    want = base + lora_delta_reference(x, a, b, torch.tensor(slots), splits)
    rows = [i for i, s in enumerate(slots) if s != NO_ADAPTER]
    got = base.clone()
    kernel.add(got, x, a, b, KernelRows.build(rows, [slots[i] for i in rows], RANKS), splits, active)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i, s in enumerate(slots):  # rows without an adapter are left exactly as they were
        if s == NO_ADAPTER:
            assert torch.equal(got[i], base[i])


@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
@pytest.mark.parametrize("active", [(0, 1, 2), (0, 2)], ids=["all", "q-v"])
def test_kernel_matches_reference(kernel, pattern, active):
    check(kernel, SLOT_PATTERNS[pattern], d_in=32, active=active)


@settings(max_examples=40, deadline=None)
@given(
    slots=st.lists(st.sampled_from([NO_ADAPTER, *range(S)]), min_size=1, max_size=23),
    d_in=st.sampled_from([1, 15, 16, 33, 100]),  # widths that leave a remainder after the vector loop
    seed=st.integers(0, 100),
)
def test_any_batch_matches_reference(kernel, slots, d_in, seed):
    check(kernel, slots, d_in=d_in, active=(0, 1, 2), seed=seed)


def test_kernel_refuses_what_it_cannot_compute(kernel):
    a, b = stacks(8, (8, 24, 17), (0, 1, 2), 0)
    plan = KernelRows.build([0], [0], RANKS)
    with pytest.raises(ValueError, match="one-token"):
        kernel.add(torch.zeros(1, 2, 49), torch.zeros(1, 2, 8), a, b, plan, (8, 24, 17), (0, 1, 2))  # two tokens
    with pytest.raises(ValueError, match="float32"):
        kernel.add(torch.zeros(1, 1, 49, dtype=torch.bfloat16), torch.zeros(1, 1, 8, dtype=torch.bfloat16),
                   a.bfloat16(), b.bfloat16(), plan, (8, 24, 17), (0, 1, 2))


def test_plan_groups_rows_by_slot_at_each_slots_own_rank():
    plan = KernelRows.build([0, 2, 3, 5, 6], [4, 0, 4, 4, 1], RANKS)
    assert plan.slot.tolist() == [4, 0, 1] and plan.rank.tolist() == [7, 8, 3]
    assert plan.start.tolist() == [0, 3, 4, 5] and plan.rows.tolist() == [0, 3, 5, 2, 6]


@pytest.fixture
def fresh_choice(monkeypatch):
    cpu_kernel.choose_kernel.cache_clear()
    yield monkeypatch
    cpu_kernel.choose_kernel.cache_clear()
    cpu_kernel.load.cache_clear()


def test_mode_is_read_from_the_environment(kernel, fresh_choice):
    cpu = torch.device("cpu")
    fresh_choice.setenv("OPENLORA_RAY_LORA_KERNEL", "bmm")
    assert cpu_kernel.choose_kernel(cpu, torch.float32, 64, (64, 32, 32)) is None
    cpu_kernel.choose_kernel.cache_clear()
    fresh_choice.setenv("OPENLORA_RAY_LORA_KERNEL", "kernel")
    assert cpu_kernel.choose_kernel(cpu, torch.float32, 64, (64, 32, 32)) is kernel
    assert cpu_kernel.choose_kernel(cpu, torch.bfloat16, 64, (64, 32, 32)) is None  # float32 only
    cpu_kernel.choose_kernel.cache_clear()
    fresh_choice.setenv("OPENLORA_RAY_LORA_KERNEL", "auto")
    assert cpu_kernel.choose_kernel(cpu, torch.float32, 64, (64, 32, 32)) in (kernel, None)  # timed here
    cpu_kernel.choose_kernel.cache_clear()
    fresh_choice.setenv("OPENLORA_RAY_LORA_KERNEL", "fast")
    with pytest.raises(ValueError, match="OPENLORA_RAY_LORA_KERNEL"):
        cpu_kernel.choose_kernel(cpu, torch.float32, 64, (64, 32, 32))


def test_bmm_is_used_without_a_compiler_or_when_the_build_fails(fresh_choice, tmp_path, caplog):
    fresh_choice.setattr(cpu_kernel, "CACHE", tmp_path)
    fresh_choice.setattr(cpu_kernel, "_compiler", lambda: None)
    cpu_kernel.load.cache_clear()
    assert cpu_kernel.load() is None
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no such option' >&2\nexit 1\n")
    broken.chmod(0o755)
    fresh_choice.setattr(cpu_kernel, "_compiler", lambda: str(broken))
    cpu_kernel.load.cache_clear()
    with caplog.at_level(logging.WARNING, logger="openlora_ray.lora.cpu_kernel"):
        assert cpu_kernel.load() is None
    assert "no such option" in caplog.text
    fresh_choice.setenv("OPENLORA_RAY_LORA_KERNEL", "kernel")
    assert cpu_kernel.choose_kernel(torch.device("cpu"), torch.float32, 64, (64,)) is None

    def unloadable(path):
        raise OSError(f"{path}: failed to map segment from shared object")

    fresh_choice.setattr(cpu_kernel, "_compiler", lambda: "cc")
    fresh_choice.setattr(cpu_kernel, "CpuLoraKernel", unloadable)
    cpu_kernel.load.cache_clear()
    with caplog.at_level(logging.WARNING, logger="openlora_ray.lora.cpu_kernel"):
        assert cpu_kernel.load() is None  # built (or found), but it cannot be loaded here
    assert "failed to map segment" in caplog.text


def test_copy_writes_strided_rows_and_zeros_exactly_where_asked(kernel):
    dst = torch.full((4, 5, 12), 7.0)
    src_a, src_b = torch.randn(3, 12), torch.randn(5, 20)[:, 4:10]  # rows contiguous, not the whole tensor
    kernel.copy([(dst[0, :3], src_a), (dst[1, :, 2:8], src_b), (dst[2, 1:4, 5:], None), (dst[3, :0], None)])
    want = torch.full((4, 5, 12), 7.0)
    want[0, :3], want[1, :, 2:8], want[2, 1:4, 5:] = src_a, src_b, 0
    assert torch.equal(dst, want)
    with pytest.raises(ValueError, match="contiguous rows"):
        kernel.copy([(dst[0, :, ::2], None)])
    with pytest.raises(ValueError, match="shaped as dst"):
        kernel.copy([(dst[0, :2], torch.randn(3, 12))])
