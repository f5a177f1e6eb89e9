"""Benchmarks of FCDD (three hypersphere losses, unsupervised and semi-supervised) against PaDiM and PatchCore.

``python -m benchmarks.run --profile offline`` runs a grid and appends one CSV row per run; ``benchmarks.stats``
holds the paper's statistics (Wilcoxon signed-rank, Holm, CD diagrams) and ``benchmarks.report`` writes the README
of a results folder. See ``benchmarks/RUNNER.md``.
"""
