"""Two source trees of this package side by side: the default FCDD training step and inference, interleaved.

Each tree runs in a process of its own (``PYTHONPATH=<tree>/src``) on the same seeded inputs; the parent steps them
in turn, round by round (alternating the order), so machine noise hits them alike. At the end every process prints
its losses and the sum of its anomaly maps, so the comparison also shows whether the two trees compute the same.

    python -m benchmarks.compare_checkouts --tree before=/tmp/old_checkout --tree after=. [--backbone vgg11_bn]
        [--batch 16] [--rounds 5] [--env after+tunables=GLIBC_TUNABLES=...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = """
import sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from anomalib.data import ImageBatch
from anomalib_fcdd import FcddHsc

backbone, batch = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = FcddHsc(backbone=backbone, pre_trained=False, minmax="bottle", visualizer=False)
memory = getattr(model.model, "memory", None)
if memory is not None and not memory.ready:  # an image-score memory (since 2026-12-07): a random stand-in, its size
    read = getattr(memory, "memory_features", None) or memory.local_features
    with torch.no_grad():
        width = read(model.model.eval().backbone_features(torch.zeros(1, 3, 64, 64))).shape[1]
    memory.fit(torch.randn(max(5000, memory.size), width, generator=torch.Generator().manual_seed(0)))
fusion = getattr(model.model, "map_fusion", None)
if fusion is not None and not fusion.ready:  # the fused map's spreads (since 2026-12-07): stand-ins of 1
    fusion.calibrate(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 2.0]))
bf16 = model.trainer_arguments["precision"] == "bf16-mixed"
generator = torch.Generator().manual_seed(0)
train_images = torch.rand(batch, 3, 240, 240, generator=generator)
test_images = torch.rand(batch, 3, 224, 224, generator=generator)
optimizer = torch.optim.SGD([p for p in model.model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
losses = []


def train() -> None:
    model.model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        images, masks = model.training_inputs(ImageBatch(image=train_images))
        loss = model.loss(model.model(images).anomaly_map, masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(float(loss))


def infer() -> torch.Tensor:
    model.model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.model(test_images).anomaly_map


try:  # trees before the restructure kept freed host memory during Lightning runs (their default): do so here too
    from anomalib_fcdd.models.fcdd.performance import HOST_MEMORY_REUSE

    HOST_MEMORY_REUSE.acquire()
except ImportError:
    pass
train()
infer()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "stop":
        print("LOSSES", " ".join(f"{value:.10g}" for value in losses), flush=True)
        print("MAPSUM", f"{float(infer().double().sum()):.10g}", flush=True)
        break
    started = time.perf_counter()
    train() if line.strip() == "train" else infer()
    print(f"{batch / (time.perf_counter() - started):.4f}", flush=True)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VAR=VALUE: another run of tree NAME's path")
    parser.add_argument("--backbone", default="vgg11_bn")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start one process per variant, time them in turn, print medians with their spread, losses and map sums."""
    args = parse_args(argv)
    trees = dict(spec.split("=", 1) for spec in args.tree)
    variants = {name: (Path(path).resolve(), {}) for name, path in trees.items()}
    for spec in args.env:
        name, variable, value = spec.split("=", 2)
        base = name.split("+", 1)[0]
        variants[name] = (variants[base][0], {variable: value})
    processes = {}
    for name, (tree, extra) in variants.items():
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), **extra}
        command = [sys.executable, "-c", WORKER, args.backbone, str(args.batch)]
        processes[name] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if processes[name].stdout.readline().strip() != "ready":
            raise RuntimeError(f"variant {name} did not start")
    speeds: dict[str, dict[str, list[float]]] = {name: {"train": [], "infer": []} for name in processes}
    for round_index in range(args.rounds):
        order = list(processes.items()) if round_index % 2 == 0 else list(reversed(processes.items()))
        for kind in ("train", "infer"):
            for name, process in order:
                process.stdin.write(f"{kind}\n")
                process.stdin.flush()
                speeds[name][kind].append(float(process.stdout.readline()))
    for name, process in processes.items():
        process.stdin.write("stop\n")
        process.stdin.flush()
        print(f"{name}: {process.stdout.readline().strip()}")
        print(f"{name}: {process.stdout.readline().strip()}")
        process.wait()
    print("| variant | train img/s (median, min-max) | inference img/s (median, min-max) |")
    print("|---|---|---|")
    for name, figures in speeds.items():
        cells = [
            f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
            for values in (figures["train"], figures["infer"])
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
