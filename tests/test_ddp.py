"""Under DDP every rank must compute the same min-max constants (each rank sees only its shard of the loader)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from anomalib_fcdd.data import make_synthetic_mvtec

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import Callback
    from anomalib_fcdd import FcddHsc
    from anomalib_fcdd.data import MVTec

    root, out = sys.argv[1], sys.argv[2]

    class SaveConstants(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                torch.save(pl_module.model.normalization.constants, f"{out}/rank{trainer.global_rank}.pt")

    model = FcddHsc(pre_trained=False, minmax=None, image_size=32, epochs=1, passes_per_epoch=1, visualizer=False)
    datamodule = MVTec(root=root, category="cat", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=out, logger=False, accelerator="cpu", devices=2, strategy="ddp",
                    enable_progress_bar=False, callbacks=[SaveConstants()])
    engine.fit(model, datamodule=datamodule)
    """
)


@pytest.mark.slow
def test_every_ddp_rank_gets_the_same_minmax_constants(tmp_path: Path) -> None:
    make_synthetic_mvtec(tmp_path / "data", "cat", n_train=8, n_test_good=2, n_test_defect=2, size=32, seed=1)
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
