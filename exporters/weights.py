"""One copy of the weights: the graphs of an export share one external-data file.

    store = WeightStore.create(staging / "onnx/model.onnx_data")        # at export time: appendable
    files = save_graph(with_past, staging / "onnx/model.onnx", store)     # its tensors go in
    files = save_graph(no_past, staging / "onnx/decoder_model.onnx", store)  # the same bytes: referenced
    store.close()

    store = WeightStore.read(folder / "onnx/model.onnx", folder / "onnx/model.onnx_data")   # later: read-only
    files = save_graph(fused, staging / "onnx/model_fused.onnx", store)   # a variant: shares what it can

ONNX's external-data format lets every tensor name its own file, offset and length, so several graphs
may point into one file. A tensor is found in the store by the sha256 of its bytes (a graph traced twice
holds equal tensors under other names). Tensors the store lacks go into it while it is appendable (the
export, whose files are all new), otherwise into the graph's own `<graph>_data` file: a file that graphs
already use is never rewritten. Tensors under 1 KiB stay inside the graph; tensors of 1 MiB or more start
at a multiple of 64 KiB, so that ONNX Runtime can map them from the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

INLINE_BELOW = 1024  # bytes: smaller tensors stay in the graph (as onnx's own external-data writer does)
ALIGN, ALIGN_FROM = 65536, 1 << 20  # tensors of ALIGN_FROM bytes or more start at a multiple of ALIGN
# Above this many bytes of weights a graph cannot be one protobuf file (2 GiB at most)
PROTOBUF_LIMIT = 1_800_000_000


@dataclass
class WeightStore:
    """An external-data file and what it holds: sha256 of a tensor's bytes -> (offset, length)."""

    path: Path
    appendable: bool
    index: dict[str, tuple[int, int]] = field(default_factory=dict)
    _file: object = None

    @classmethod
    def create(cls, path: Path) -> WeightStore:
        """A new, empty store (at export time, in the staging folder)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, appendable=True)
        store._file = open(path, "wb")
        return store

    @classmethod
    def read(cls, graph: Path, path: Path) -> WeightStore:
        """The store an existing graph points into, read-only: its index from that graph's references."""
        import onnx

        store = cls(path, appendable=False)
        model = onnx.load(str(graph), load_external_data=False)
        with open(path, "rb") as f:
            for tensor in model.graph.initializer:
                info = _external_info(tensor)
                if info is None or (graph.parent / info["location"]).resolve() != path.resolve():
                    continue
                offset, length = int(info.get("offset", 0)), int(info["length"])
                f.seek(offset)
                store.index.setdefault(hashlib.sha256(f.read(length)).hexdigest(), (offset, length))
        return store

    def find(self, data: bytes) -> tuple[int, int] | None:
        return self.index.get(hashlib.sha256(data).hexdigest())

    def append(self, data: bytes) -> tuple[int, int]:
        """Writes `data` at the end (aligned when large); returns (offset, length). Equal bytes are stored once."""
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.index:
            return self.index[digest]
        f = self._file
        offset = f.tell()
        if len(data) >= ALIGN_FROM and offset % ALIGN:
            f.write(b"\0" * (ALIGN - offset % ALIGN))
            offset = f.tell()
        f.write(data)
        self.index[digest] = (offset, len(data))
        return offset, len(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _external_info(tensor) -> dict | None:
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def weight_bytes(ir_model) -> int:
    """The bytes of a graph's initializers."""
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_graph(ir_model, path: Path, store: WeightStore | None = None) -> list[str]:
    """Saves an onnx_ir model at `path`. Without a store, its weights stay inside the graph, or go to
    `<name>_data` beside it when they cannot (over PROTOBUF_LIMIT bytes). With one, each tensor of 1 KiB
    or more is referenced in the store where its bytes are there, else appended to the store (when
    appendable) or written to `<name>_data`. Returns the external-data files the graph references, as
    paths relative to the graph's folder's parent (the export folder: "onnx/model.onnx_data")."""
    import onnx_ir as ir

    path.parent.mkdir(parents=True, exist_ok=True)
    own = path.with_name(path.name + "_data")
    if store is None:
        if weight_bytes(ir_model) <= PROTOBUF_LIMIT:
            ir.save(ir_model, path)
            return []
        ir.save(ir_model, path, external_data=own.name, alignment=ALIGN, align_threshold=ALIGN_FROM)
        return [_relative(path, own)]
    if store.path.parent.absolute() != path.parent.absolute():
        raise ValueError(f"{store.path} is not beside {path}: external data is found relative to the graph")
    own_store, used = None, set()
    try:
        for value in ir_model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < INLINE_BELOW:
                continue
            data = tensor.tobytes()
            where = store.find(data)
            target = store
            if where is None:
                if store.appendable:
                    where = store.append(data)
                else:
                    own_store = own_store or WeightStore.create(own)
                    target, where = own_store, own_store.append(data)
            offset, length = where
            value.const_value = ir.ExternalTensor(
                target.path.name, offset, length, tensor.dtype, shape=tensor.shape, name=tensor.name or value.name,
                base_dir=path.parent)
            used.add(target.path)
            del data
    finally:
        if own_store is not None:
            own_store.close()
    if store.appendable:
        store._file.flush()  # the graph's tensors are read back while it is checked and validated
    ir.save(ir_model, path)
    return sorted(_relative(path, p) for p in used)


def _relative(graph: Path, data: Path) -> str:
    return f"{graph.parent.name}/{data.name}"
