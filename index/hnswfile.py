"""hnswlib's index files: saved so a failed write is never published, and checked by structure.

hnswlib's ``save_index`` writes through a C++ ``std::ofstream`` and never looks at its
state: on a full disk it leaves a truncated file and reports success. Braid cannot trust
it, so ``save`` writes ``<name>.tmp``, fsyncs it, walks its structure (``check``) and only
then renames it onto ``<name>``.

Byte layout (hnswlib 0.8 ``HierarchicalNSW::saveIndex``, little-endian)::

    header, 96 bytes:
      u64 offsetLevel0 (0)      u64 max_elements         u64 cur_element_count
      u64 size_data_per_element u64 label_offset         u64 offsetData
      i32 maxlevel              u32 enterpoint_node      u64 maxM
      u64 maxM0                 u64 M                    f64 mult
      u64 ef_construction
    level 0: cur_element_count x size_data_per_element bytes, each element
      [u32 link count, maxM0 x u32 links][dim x f32 vector][u64 label]
      (so offsetData = 4 (maxM0 + 1), label_offset = offsetData + 4 dim)
    then per element, in order: u32 linkListSize, a multiple of 4 (maxM + 1)
      (that many bytes per upper level, at most maxlevel levels), then linkListSize bytes.

``check`` reads the header and the upper-level link lists (not the vectors): the header
must be self-consistent and agree with what the caller expects (dimension, element
count), and the walk over cur_element_count link lists must end exactly at the file's
size. A file cut short anywhere fails it: the walk runs out of bytes, or the level-0
block does not fit. Cost: one Python step per element (~0.2 s per million).
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from . import child_save, diskspace
from .durable import tmp_path

_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
HEADER_SIZE = _HEADER.size  # 96


def check(path: Path, dim: int | None = None, count: int | None = None) -> str | None:
    """What is wrong with the hnswlib file at ``path`` (a sentence), or None when its structure is whole.

    ``dim`` and ``count``, when given, must match the file's vector size and element count.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                return f"{size} bytes, shorter than hnswlib's {HEADER_SIZE}-byte header (truncated)"
            fields = _HEADER.unpack(head)
            offset0, max_elements, elements, per_element, label_offset, offset_data, max_level = fields[:7]
            max_m, max_m0 = fields[8], fields[9]
            if offset0 != 0 or elements > max_elements or offset_data != 4 * (max_m0 + 1):
                return "malformed hnswlib header"
            vector_bytes = label_offset - offset_data
            if vector_bytes < 0 or vector_bytes % 4 or per_element != label_offset + 8:
                return "malformed hnswlib header (element layout)"
            if dim is not None and vector_bytes != 4 * dim:
                return f"vectors of {vector_bytes // 4} dimensions, expected {dim}"
            if count is not None and elements != count:
                return f"{elements} elements, expected {count}"
            links_start = HEADER_SIZE + elements * per_element
            if links_start > size:
                return f"{size} bytes, but its {elements} elements need {links_start} before the link lists (truncated)"
            fh.seek(links_start)
            tail = fh.read(size - links_start)
    except OSError as err:
        return f"unreadable: {err}"
    return _walk(memoryview(tail), elements, 4 * (max_m + 1), max(max_level, 0), links_start, size)


def rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, vectors) of every element of a file ``check`` passed, sorted by label: the level-0
    block read as one array (hnswlib's ``get_items`` copies one element at a time, 26 us each at
    384 dimensions: 26 s a million at every open). The vectors are what hnswlib stores (a cosine
    space's normalized), so they equal ``get_items``'s."""
    with open(path, "rb") as fh:
        fields = _HEADER.unpack(fh.read(HEADER_SIZE))
    elements, per_element, label_offset, offset_data = fields[2], fields[3], fields[4], fields[5]
    block = np.fromfile(path, np.uint8, elements * per_element, offset=HEADER_SIZE).reshape(elements, per_element)
    labels = block[:, label_offset : label_offset + 8].copy().view("<u8").ravel().astype(np.int64)
    order = np.argsort(labels, kind="stable")
    vectors = np.ascontiguousarray(block[:, offset_data:label_offset]).view("<f4")[order]
    return labels[order], vectors


def _walk(tail: memoryview, elements: int, level_bytes: int, max_level: int, start: int, size: int) -> str | None:
    """Walk the per-element upper-level link lists; they must end exactly at the file's end."""
    pos, end, unpack = 0, len(tail), struct.Struct("<I").unpack_from
    limit = level_bytes * max_level
    for element in range(elements):
        if pos + 4 > end:
            return f"{size} bytes: the link lists end after {element} of {elements} elements (truncated)"
        (nbytes,) = unpack(tail, pos)
        if nbytes % level_bytes or nbytes > limit:
            return f"element {element}: link list of {nbytes} bytes at offset {start + pos} is malformed"
        pos += 4 + nbytes
    if pos != end:
        what = "truncated" if pos > end else "trailing bytes"
        return f"{size} bytes, but its structure ends at byte {start + pos} ({what})"
    return None


def save(index: Any, path: Path, dim: int) -> None:
    """Save an hnswlib ``index`` to ``path`` only if the written file is whole (module docstring).

    OSError naming the file when hnswlib wrote less than its structure needs: ENOSPC when the
    file system has under diskspace.SLACK_BYTES free then (a full disk hnswlib did not
    report), else EIO; nothing is renamed and the temporary file is removed.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        child_save.save_index(index, tmp)  # a big graph in a forked child: searches keep the GIL
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        problem = check(tmp, dim, index.get_current_count())
        if problem is not None:
            free = diskspace.free_bytes(path.parent)
            # hnswlib does not say why; a full disk (no room for one more block) is by far the likeliest.
            code, why = (errno.ENOSPC, "the disk is full") if free < diskspace.SLACK_BYTES else (errno.EIO, "")
            raise OSError(
                code,
                f"{path}: hnswlib's save_index reported success but wrote a bad file ({problem}); "
                f"{free} bytes free{': ' + why if why else ''}; nothing was published",
            )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
