"""One copy of the weights on disk for all batch sizes of a component.

Each static-batch export writes its own external-data file, though the weights are the same; pointing every later
graph at the first graph's file makes extra batch sizes cost a graph (kilobytes to a few MB), not another copy of
the model.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data


def _external(initializer: onnx.TensorProto) -> ExternalDataInfo | None:
    return ExternalDataInfo(initializer) if uses_external_data(initializer) else None


def _read(folder: Path, info: ExternalDataInfo) -> bytes:
    with (folder / info.location).open("rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length) if info.length else f.read()


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))


def share_weights(first: Path, other: Path) -> int:
    """Re-points `other`'s external tensors at byte-identical ones in `first`'s data and rewrites its own data file
    with only the tensors that differ (constants folded for its batch size); returns the bytes freed."""
    folder = first.parent
    if other.parent != folder:
        raise ValueError(f"{first} and {other} must share a folder for their data to be shared")
    source = onnx.load(first, load_external_data=False)
    target = onnx.load(other, load_external_data=False)
    known = {t.name: info for t in source.graph.initializer if (info := _external(t)) is not None}
    own_files, own_tensors, before = set(), [], 0
    for tensor in target.graph.initializer:
        info = _external(tensor)
        if info is None:
            continue
        own_files.add(info.location)
        data = _read(folder, info)
        before += len(data)
        match = known.get(tensor.name)
        if match is not None and _read(folder, match) == data:
            _point(tensor, match.location, match.offset or 0, len(data))
        else:
            own_tensors.append((tensor, data))
    for location in own_files:
        (folder / location).unlink()
    if own_tensors:
        location, offset = f"{other.name}.data", 0
        with (folder / location).open("wb") as f:
            for tensor, data in own_tensors:
                f.write(data)
                _point(tensor, location, offset, len(data))
                offset += len(data)
    onnx.save(target, other)
    return before - sum(len(data) for _, data in own_tensors)
