"""Make the plugin's classes visible to anomalib's name-based look-ups.

anomalib 2.7 has no plugin entry points. ``get_model("fcdd_hsc")`` scans the direct subclasses of ``AnomalibModule``
(ours are, once imported); ``get_model({"class_path": "FcddHsc"})`` and ``anomalib benchmark`` look names up as
attributes of ``anomalib.models`` (and datamodules of ``anomalib.data``), so the classes are attached there.
"""

from __future__ import annotations


def register() -> None:
    """Attach the plugin's models and datamodules to ``anomalib.models`` / ``anomalib.data`` (idempotent)."""
    import anomalib.data
    import anomalib.models

    from .data import FolderFewAnomalies, MVTec, MVTecFewAnomalies
    from .models import Fcdd, FcddHsc

    for cls in (Fcdd, FcddHsc):
        setattr(anomalib.models, cls.__name__, cls)
    # Folder is not attached: anomalib looks classes up by their last name, and ours would replace anomalib's own
    # ``Folder`` for everyone in the process. ``--data anomalib_fcdd.data.Folder`` imports it by its full path.
    for cls in (MVTec, MVTecFewAnomalies, FolderFewAnomalies):
        setattr(anomalib.data, cls.__name__, cls)
