"""Run every command of README.md as a new user would type it, in a fresh clone, and record how each one ends.

A command passes when it succeeds (exit 0) or fails with one line and no traceback (a missing GPU, the paper's VGG
weights offline); anything else -- a traceback, pages of log -- is a defect to fix. Commands that are still running
after ``--timeout`` seconds are stopped and reported as such (no verdict on their end).

The data the README names is laid out in the clone the way a user would have it (nothing is copied into the
repository): ``datasets/MVTecAD`` links to the MVTec-AD root, ``tiles/`` holds Magnetic-Tile as a user's folders
(``good``, ``good_test``, ``defects/<type>``, ``masks``) and ``photos/`` a few bottle test images.

    python tools/readme_walkthrough.py --data-root ../shared/data --venv .venv --output docs/readme_walkthrough.md

``--venv`` reuses an environment set up by the README's own command (CI proves that command on a clean clone);
without it, the walkthrough runs the README's set-up command in the clone first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The README's loop over 450 paper trainings is run as its first iteration (one config, one category, one seed).
LOOP_STAND_IN = (
    "anomalib-fcdd train --config configs/unsupervised_pixel_balanced.yaml --data.root ./datasets/MVTecAD "
    "--data.category bottle --seed_everything 0 --default_root_dir results/unsupervised_pixel_balanced/seed0"
)
#: How an error line starts: the CLI's, argparse's and the benchmarks' own, and predict-openvino's (a rich log line).
ERROR_PREFIXES = ("anomalib-fcdd: error:", "error:", "usage:", "ERROR ")
#: Commands not run here, and why.
SKIPPED = {".venv/bin/pytest": "the test suite: CI runs it on a clean clone"}


@dataclass
class Outcome:
    command: str
    verdict: str  # "ok", "one-line error", "still running", "not run", "DEFECT"
    seconds: float
    last_line: str


def readme_commands(readme: str) -> list[str]:
    """The main command's run step, then the shell commands of the README's ``bash`` blocks (continuation lines joined,
    comments dropped) and its ``python`` blocks (run as scripts), in the README's order."""
    main_command = re.search(r"<!-- main-command -->\n```\n.* && (\S+ demo)\n```", readme)
    commands = [main_command.group(1)] if main_command else []
    for language, block in re.findall(r"```(bash|python)\n(.*?)```", readme, flags=re.S):
        if language == "python":
            commands.append(f"python - <<'EOF'\n{block}EOF")
            continue
        if block.lstrip().startswith("for "):
            commands.append(LOOP_STAND_IN)
            continue
        for logical in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", logical).strip()
            if command and not command.startswith("#"):
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def lay_out_data(clone: Path, data_root: Path) -> None:
    """``datasets/MVTecAD``, ``tiles/`` and ``photos/`` as the README's commands expect them."""
    (clone / "datasets").mkdir(exist_ok=True)
    os.symlink((data_root / "mvtec_ad").resolve(), clone / "datasets" / "MVTecAD")
    tile = (data_root / "magnetic_tile").resolve()
    tiles = clone / "tiles"
    (tiles / "defects").mkdir(parents=True)
    os.symlink(tile / "train" / "good", tiles / "good")
    os.symlink(tile / "test" / "good", tiles / "good_test")
    os.symlink(tile / "ground_truth", tiles / "masks")
    for defect in sorted(p.name for p in (tile / "ground_truth").iterdir()):
        os.symlink(tile / "test" / defect, tiles / "defects" / defect)
    photos = clone / "photos"
    photos.mkdir()
    for image in sorted((data_root / "mvtec_ad" / "bottle" / "test" / "broken_large").glob("*.png"))[:3]:
        shutil.copy(image, photos / image.name)


def run_one(command: str, clone: Path, env: dict[str, str], timeout: float) -> Outcome:
    """Run ``command`` with bash in ``clone``; stop its whole process group after ``timeout`` seconds."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            ["bash", "-c", command], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = None
        log.seek(0)
        lines = [line.rstrip() for line in log if line.strip()]
    seconds = time.perf_counter() - started
    last = lines[-1] if lines else ""
    if code is None:
        return Outcome(command, "still running", seconds, last)
    if code == 0:
        return Outcome(command, "ok", seconds, last)
    errors = [line for line in lines if line.startswith(ERROR_PREFIXES)]
    traceback = any(line.startswith("Traceback") for line in lines)
    if len(errors) == 1 and not traceback:
        return Outcome(command, "one-line error", seconds, errors[0])
    return Outcome(command, "DEFECT", seconds, last)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _one_line(text: str) -> str:
    """``text`` fit for a Markdown table cell."""
    return text.replace("|", "/").replace("`", "'").replace("\n", " ; ")


def write_report(outcomes: list[Outcome], output: Path, invocation: str, timeout: float) -> None:
    rows = [
        f"| `{_one_line(o.command)}` | {o.verdict} | {o.seconds:.0f} | {_one_line(o.last_line)[:200]} |"
        for o in outcomes
    ]
    text = "\n".join(
        [
            "# Walkthrough of every README command",
            "",
            f"`{invocation}`, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
            f"{os.cpu_count()} cores; a fresh clone of the repository, each command stopped after {timeout:.0f} s.",
            "A command passes when it succeeds or fails with one line and no traceback.",
            "",
            "| command | outcome | s | last line (or the error line) |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    output.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = Path(os.environ.get("FCDD_DATA_ROOT", REPO.parent / "shared" / "data"))
    parser.add_argument("--data-root", type=Path, default=default_data, help="holds mvtec_ad/ and magnetic_tile/")
    parser.add_argument("--venv", type=Path, help="an environment set up by the README (default: set one up)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per command (default 900)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "readme_walkthrough.md")
    parser.add_argument("--only", action="append", help="run only the commands containing this text (repeatable)")
    args = parser.parse_args(argv)
    if not (args.data_root / "mvtec_ad" / "bottle").is_dir() or not (args.data_root / "magnetic_tile").is_dir():
        parser.error(f"--data-root {args.data_root} needs mvtec_ad/bottle and magnetic_tile")
    readme = (REPO / "README.md").read_text()
    commands = readme_commands(readme)
    if args.only:
        commands = [c for c in commands if any(text in c for text in args.only)]
    # a stopped command's DataLoader workers may still be writing while the folder is removed
    with tempfile.TemporaryDirectory(prefix="walkthrough-", ignore_cleanup_errors=True) as scratch:
        clone = Path(scratch) / "anomalib-fcdd"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        lay_out_data(clone, args.data_root)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
        if args.venv is None:
            setup = re.search(r"<!-- main-command -->\n```\n(.*?) && \.venv/bin/anomalib-fcdd demo", readme, re.S)
            subprocess.run(["bash", "-c", setup.group(1)], cwd=clone, check=True)
            venv = clone / ".venv"
        else:
            venv = args.venv.resolve()
            env["PYTHONPATH"] = str(clone / "src")  # the clone's code, even where the venv has another editable one
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        invocation = " ".join(["python tools/readme_walkthrough.py", *(argv if argv is not None else sys.argv[1:])])
        outcomes: list[Outcome] = []
        for command in commands:
            reason = next((why for start, why in SKIPPED.items() if command.startswith(start)), None)
            if reason is not None:
                outcomes.append(Outcome(command, "not run", 0.0, reason))
                continue
            outcome = run_one(command.replace(".venv/bin/", f"{venv}/bin/"), clone, env, args.timeout)
            outcomes.append(outcome)
            print(f"[{outcome.verdict}] {outcome.seconds:.0f} s  {command}\n    {outcome.last_line}", flush=True)
            write_report(outcomes, args.output, invocation, args.timeout)  # after each command: a stopped run keeps it
    return 1 if any(o.verdict == "DEFECT" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
