"""The export cache: a checkpoint that an ONNX runtime is asked to run is exported once and reused.

    cache = ExportCache()                        # $GPTDEPLOY_CACHE, default ~/.cache/gptdeploy
    folder = cache.export(loaded, "fp32", progress)

Folders live in <root>/exports, one per weights and precision: <LoadedModel.fingerprint>-<precision>.
The files other engines run (`gptdeploy bench`'s ct2 and llama.cpp baselines) live in <root>/peers, one
folder per weights, engine and weight type, with a peer.json written last that lists them.
A folder is reused when its manifest names the same weights' sha256 and precision and its files still
match the manifest; anything else there (an old, broken or corrupted export, a leftover of an
interrupted one) is the cache's own and is exported again. An ExportCache is an object passed to whatever needs it (open_runner, parity, bench), so a
test or an app can point it anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from gptdeploy.app.exporting import export_model
from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import ExportFolder, VerificationMemo, is_export_folder, read_export, verify
from gptdeploy.files import remove_leftovers, replace_folder, staging_folder, write_atomic
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

    def peer_path(self, loaded: LoadedModel, engine: str, weight_type: str) -> Path:
        return self.root / "peers" / f"{loaded.fingerprint}-{engine}-{weight_type}"

    def peer(self, loaded: LoadedModel, engine: str, weight_type: str, progress: Progress = QUIET) -> tuple[Path, dict]:
        """The files of `loaded` for another engine (ct2: a CTranslate2 model folder; llama.cpp: a folder
        holding model.gguf) in `weight_type`, converted now unless the cache holds them; and what the
        conversion recorded (peer.json: the converter, the weight types, the files' sizes)."""
        from gptdeploy.exporters.peers import write_ct2, write_gguf

        path = self.peer_path(loaded, engine, weight_type)
        record = peer_record(path, loaded)
        if record is not None:
            return path, record
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent)
        progress.note(f"Converting {loaded.source} for {engine} ({weight_type}) into the export cache, {path}")
        with staging_folder(path) as tmp:
            if engine == "ct2":
                record = write_ct2(loaded, tmp / "model", weight_type)
            else:
                record = write_gguf(loaded, tmp / "model" / "model.gguf", weight_type)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted((tmp / "model").rglob("*")) if f.is_file()}
            record = {"weights_sha256": loaded.fingerprint, "engine": engine, "weight_type": weight_type, **record,
                      "files": files, "bytes": sum(files.values())}
            write_atomic(tmp / "peer.json", json.dumps(record, indent=2) + "\n")
            replace_folder(tmp, path)  # a stale or broken entry (the cache's own) is swapped out and removed
        return path, record


def peer_record(path: Path, loaded: LoadedModel) -> dict | None:
    """peer.json of a complete conversion of these weights whose files are all there, at their sizes."""
    try:
        record = json.loads((path / "peer.json").read_text(encoding="utf-8"))
        complete = all((path / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record if complete and record.get("weights_sha256") == loaded.fingerprint else None
