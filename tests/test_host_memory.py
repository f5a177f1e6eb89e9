"""Host memory reuse: glibc keeps freed activations, so CPU steps stop page-faulting them in anew."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from anomalib.engine import Engine

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import MVTec
from anomalib_fcdd.models.fcdd import lightning_model, performance
from anomalib_fcdd.models.fcdd.performance import HOST_MEMORY_REUSE, HostMemoryReuse

BLOCK_BYTES = 64 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB), like a training activation


class FakeLibc:
    """Records mallopt / malloc_trim calls; ``accept`` is what mallopt returns (glibc: 1 on success)."""

    def __init__(self, accept: int = 1) -> None:
        self.accept = accept
        self.calls: list[tuple] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return self.accept

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
KEEP = [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, 2**31 - 1)]
RESTORE = [("mallopt", M_MMAP_MAX, 65536), ("mallopt", M_TRIM_THRESHOLD, 128 * 1024), ("malloc_trim", 0)]


MEASURE_IN_A_FRESH_PROCESS = r"""
import json, resource, sys
from pathlib import Path
import torch
from anomalib_fcdd.models.fcdd.performance import HOST_MEMORY_REUSE, reused_host_memory

BLOCK = int(sys.argv[1])
PAGE = resource.getpagesize()


def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def drop_on_free(size=BLOCK):
    # how much of a freed, written block leaves resident memory at once (fraction of the block)
    block = torch.empty(size, dtype=torch.uint8).fill_(1)
    before = resident()
    del block
    return (before - resident()) / size


def faults_on_refill():
    # minor page faults per page when a freed block is allocated and written again (best of 3)
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(BLOCK, dtype=torch.uint8).fill_(1)
        del block
        counts.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (BLOCK / PAGE))
    return min(counts)


result = {"plain": drop_on_free()}
with reused_host_memory() as held:
    result.update(held=held, active=HOST_MEMORY_REUSE.active, kept=drop_on_free(), refill_faults=faults_on_refill())
# Larger than the whole heap the kept phase grew: a block of the kept one's size may land in a hole that phase left
# inside the heap (release handed its pages back, but glibc's defaults refill such holes and keep them too).
result.update(active_after=HOST_MEMORY_REUSE.active, restored=drop_on_free(4 * BLOCK))
print(json.dumps(result))
"""


@pytest.mark.skipif(not HOST_MEMORY_REUSE.available, reason="needs glibc")
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_reuse_keeps_freed_memory_and_release_hands_it_back() -> None:
    # A fresh process: earlier runs in this one leave heap holes that later blocks may land in.
    output = subprocess.run(
        [sys.executable, "-c", MEASURE_IN_A_FRESH_PROCESS, str(BLOCK_BYTES)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # no pool threads allocating between the measurements
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    assert result["held"] and result["active"] and not result["active_after"]
    # glibc's default unmaps the block on free; kept, it stays and is written again without a single page fault
    # (how many faults a fresh block costs depends on the kernel's huge-page policy, so that is not compared here).
    assert result["plain"] > 0.95, result
    assert result["kept"] < 0.05, result
    assert result["refill_faults"] < 0.02, result
    assert result["restored"] > 0.95, result


def test_holders_are_counted_and_the_last_restores_the_defaults() -> None:
    libc = FakeLibc()
    reuse = HostMemoryReuse(libc)
    assert reuse.acquire() and reuse.acquire()
    assert libc.calls == KEEP, "mallopt is called once for all holders"
    reuse.release()
    assert reuse.active and libc.calls == KEEP
    reuse.release()
    assert not reuse.active and libc.calls == KEEP + RESTORE
    reuse.release()  # one release too many changes nothing
    assert libc.calls == KEEP + RESTORE


def test_refused_mallopt_leaves_the_defaults() -> None:
    libc = FakeLibc(accept=0)
    reuse = HostMemoryReuse(libc)
    assert reuse.acquire() is False
    assert not reuse.active
    assert libc.calls[-3:] == RESTORE


def test_without_glibc_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(performance, "_glibc", lambda: None)
    reuse = HostMemoryReuse()
    assert not reuse.available
    assert reuse.acquire() is False and not reuse.active
    reuse.release()


class WatchReuse(pl.Callback):
    """Notes whether host memory reuse is on while batches run."""

    def __init__(self, reuse: HostMemoryReuse) -> None:
        self.reuse = reuse
        self.seen: dict[str, bool] = {}

    def on_train_batch_start(self, *args: object) -> None:
        self.seen["train"] = self.reuse.active

    def on_test_batch_start(self, *args: object) -> None:
        self.seen["test"] = self.reuse.active


@pytest.mark.parametrize("enabled", [True, False])
def test_engine_holds_reuse_for_fit_and_test_only(
    enabled: bool, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = FakeLibc()
    reuse = HostMemoryReuse(libc)
    monkeypatch.setattr(lightning_model, "HOST_MEMORY_REUSE", reuse)
    watch = WatchReuse(reuse)
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(pre_trained=False, epochs=1, passes_per_epoch=1, image_size=64, reuse_host_memory=enabled)
    engine = Engine(
        default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False, callbacks=[watch]
    )
    engine.fit(model, datamodule=datamodule)
    assert not reuse.active, "fit's teardown hands the memory back"
    engine.test(model, datamodule=datamodule)
    assert not reuse.active
    assert watch.seen == {"train": enabled, "test": enabled}
    assert libc.calls == ((KEEP + RESTORE) * 2 if enabled else [])


class FailOnFirstBatch(pl.Callback):
    def on_train_batch_start(self, *args: object) -> None:
        raise RuntimeError("stop here")


def test_a_failed_fit_hands_the_memory_back(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = FakeLibc()
    reuse = HostMemoryReuse(libc)
    monkeypatch.setattr(lightning_model, "HOST_MEMORY_REUSE", reuse)
    datamodule = MVTec(root=synthetic_root, category="synthetic", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = FcddHsc(pre_trained=False, epochs=1, passes_per_epoch=1, image_size=64)
    engine = Engine(
        default_root_dir=tmp_path,
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        callbacks=[FailOnFirstBatch()],
    )
    with pytest.raises(RuntimeError, match="stop here"):
        engine.fit(model, datamodule=datamodule)
    assert not reuse.active, "Lightning skips teardown after an error; on_exception must release"
    assert libc.calls == KEEP + RESTORE


def test_runs_on_an_accelerator_leave_the_allocator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    reuse = HostMemoryReuse(libc)
    monkeypatch.setattr(lightning_model, "HOST_MEMORY_REUSE", reuse)
    holder = lightning_model.HostMemoryHolder()
    for device, expected in (("cuda", []), ("cpu", KEEP)):
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        holder.setup(trainer, None, "fit")
        assert libc.calls == expected, device
    holder.teardown(trainer, None, "fit")
    assert libc.calls == KEEP + RESTORE


def test_a_forked_child_restores_the_defaults_for_itself() -> None:
    libc = FakeLibc()
    reuse = HostMemoryReuse(libc)
    assert reuse.acquire()
    reuse.forget_in_child()  # what the fork handler runs in a DataLoader worker
    assert not reuse.active
    assert libc.calls == KEEP + RESTORE
    reuse.release()  # a stray release after that changes nothing
    assert libc.calls == KEEP + RESTORE


@pytest.mark.skipif(not hasattr(os, "fork") or not HOST_MEMORY_REUSE.available, reason="needs fork and glibc")
def test_workers_forked_while_reuse_is_held_do_not_inherit_it() -> None:
    read_end, write_end = os.pipe()
    assert HOST_MEMORY_REUSE.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once
            os.write(write_end, b"1" if HOST_MEMORY_REUSE.active else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert HOST_MEMORY_REUSE.active, "the parent still holds it"
    finally:
        HOST_MEMORY_REUSE.release()
    assert os.read(read_end, 1) == b"0", "the forked child dropped the parent's setting"
    os.close(read_end)
    os.close(write_end)
