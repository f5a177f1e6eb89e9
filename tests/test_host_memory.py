"""Host memory reuse: glibc keeps freed activations, so CPU steps stop page-faulting them in anew."""

from __future__ import annotations

import resource
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from anomalib.engine import Engine

from anomalib_fcdd import FcddHsc
from anomalib_fcdd.data import MVTec
from anomalib_fcdd.models.fcdd import lightning_model, performance
from anomalib_fcdd.models.fcdd.performance import HOST_MEMORY_REUSE, HostMemoryReuse, reused_host_memory

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


def faults_per_page_on_refill() -> float:
    """Minor page faults per 4 KiB page when a freed 64 MiB block is allocated and written again (best of 3)."""
    pages = BLOCK_BYTES / resource.getpagesize()
    block = torch.empty(BLOCK_BYTES, dtype=torch.uint8).fill_(1)
    del block
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(BLOCK_BYTES, dtype=torch.uint8).fill_(1)
        del block
        counts.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
    return min(counts)


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def resident_drop_on_free() -> float:
    """How much of a freed, written 64 MiB block leaves the process's resident memory at once (fraction)."""
    block = torch.empty(BLOCK_BYTES, dtype=torch.uint8).fill_(1)
    before = resident_bytes()
    del block
    return (before - resident_bytes()) / BLOCK_BYTES


@pytest.mark.skipif(not HOST_MEMORY_REUSE.available, reason="needs glibc")
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_reuse_keeps_freed_memory_and_release_hands_it_back() -> None:
    assert not HOST_MEMORY_REUSE.active, "an earlier run left host memory reuse switched on"
    plain = resident_drop_on_free()
    with reused_host_memory() as held:
        assert held and HOST_MEMORY_REUSE.active
        kept = resident_drop_on_free()
        refill_faults = faults_per_page_on_refill()
    assert not HOST_MEMORY_REUSE.active
    restored = resident_drop_on_free()
    # glibc's default unmaps the block on free; kept, it stays and is written again without a single page fault
    # (the faults of a fresh block depend on the kernel's huge-page policy, so they are not compared here).
    assert plain > 0.95, plain
    assert kept < 0.05, kept
    assert refill_faults < 0.02, refill_faults
    assert restored > 0.95, restored


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
