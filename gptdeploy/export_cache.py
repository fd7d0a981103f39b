"""The export cache: a checkpoint that an ONNX runtime is asked to run is exported once and reused.

Folders live in $GPTDEPLOY_CACHE/exports (default ~/.cache/gptdeploy/exports), one per weights and
precision: <LoadedModel.fingerprint>-<precision>. A folder is reused when its manifest names the same
weights' sha256 and precision; anything else there (an old or broken export) is exported again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import ExportFolder, is_export_folder, read_export
from gptdeploy.loading import LoadedModel

CACHE_ENV = "GPTDEPLOY_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gptdeploy").expanduser()


def cached_export_path(loaded: LoadedModel, precision: str) -> Path:
    return cache_root() / "exports" / f"{loaded.fingerprint}-{precision}"


def _is_current(path: Path, loaded: LoadedModel, precision: str) -> bool:
    if not is_export_folder(path):
        return False
    try:
        folder: ExportFolder = read_export(path)
    except GptDeployError:  # incomplete or of another format: export again
        return False
    return folder.manifest["source"]["sha256"] == loaded.fingerprint and folder.precision == precision


def cached_export(loaded: LoadedModel, precision: str = "fp32", *, progress: bool = True) -> Path:
    """The export folder of `loaded` in `precision`, exported now unless the cache holds it."""
    from exporters.onnx_export import export_onnx

    path = cached_export_path(loaded, precision)
    if _is_current(path, loaded, precision):
        return path
    if path.exists():  # a stale or broken entry: the cache's own, so replace it whatever it holds
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(export_onnx(loaded, path, precision=precision, progress=progress).path)
