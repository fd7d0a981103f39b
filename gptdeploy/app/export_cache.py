"""The export cache: a checkpoint that an ONNX runtime is asked to run is exported once and reused.

    cache = ExportCache()                        # $GPTDEPLOY_CACHE, default ~/.cache/gptdeploy
    folder = cache.export(loaded, "fp32", progress)

Folders live in <root>/exports, one per weights and precision: <LoadedModel.fingerprint>-<precision>.
A folder is reused when its manifest names the same weights' sha256 and precision and its files still
match the manifest; anything else there (an old, broken or corrupted export, a leftover of an
interrupted one) is the cache's own and is exported again. An ExportCache is an object passed to whatever needs it (open_runner, parity, bench), so a
test or an app can point it anywhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.app.exporting import export_model
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import ExportFolder, VerificationMemo, is_export_folder, read_export, verify
from gptdeploy.files import remove_leftovers
from gptdeploy.progress import QUIET, Progress

if TYPE_CHECKING:
    from gptdeploy.loading import LoadedModel

CACHE_ENV = "GPTDEPLOY_CACHE"


class ExportCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gptdeploy").expanduser()

    def memo(self) -> VerificationMemo:
        """Where the files found to match their manifests are remembered (verifying again costs a stat)."""
        return VerificationMemo(self.root / "verified.json")

    def path(self, loaded: LoadedModel, precision: str) -> Path:
        return self.root / "exports" / f"{loaded.fingerprint}-{precision}"

    def get(self, loaded: LoadedModel, precision: str) -> ExportFolder | None:
        """The cached export of `loaded` in `precision`, if the cache holds a current one."""
        path = self.path(loaded, precision)
        if not is_export_folder(path):
            return None
        try:
            folder = read_export(path)
            verify(folder, memo=self.memo())
        except GptDeployError:  # incomplete, corrupt, or of another format: export again
            return None
        current = folder.source.get("sha256") == loaded.fingerprint and folder.precision == precision
        return folder if current else None

    def export(self, loaded: LoadedModel, precision: str = "fp32", progress: Progress = QUIET) -> ExportFolder:
        """The export folder of `loaded` in `precision`, exported now unless the cache holds it."""
        if (folder := self.get(loaded, precision)) is not None:
            return folder
        path = self.path(loaded, precision)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK):
                raise PermissionError(13, "not writable")
        except OSError as e:
            raise GptDeployError(f"cannot use the export cache {self.root} (set {CACHE_ENV} to a writable folder): "
                                 f"{e.strerror or e}") from None
        remove_leftovers(path.parent)
        if path.exists():  # a stale or broken entry: the cache's own, so replace it whatever it holds
            shutil.rmtree(path)
        progress.note(f"Exporting {loaded.source} ({precision}) into the export cache, {path}")
        return read_export(export_model(loaded, path, precision=precision, progress=progress).path)
