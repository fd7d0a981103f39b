"""Huge pages for the memory a session allocates: fewer TLB misses in a decode step that streams every weight.

A decode step at batch 1 reads each weight once: gpt2's fp32 weights are 495 MB, about 121,000 pages of
4 KiB, far more than the TLB holds, so the step's reads walk page tables all the way through. Linux
can back memory with 2 MiB pages instead (transparent huge pages), but where its setting is `madvise`
(/sys/kernel/mm/transparent_hugepage/enabled, the usual default) only memory that asked for them gets
them, and ONNX Runtime does not ask for the buffers that hold an initializer or its prepacked copy.

madvise(MADV_COLLAPSE) (Linux 6.1 and later) moves memory that is already in use into huge pages, now,
whatever that setting is (except `never`). It copies the memory once and changes no value.
`collapse_new_memory` does it for the anonymous memory that grew while a call ran (the session's
creation), not for the rest of the process. It is advice: where the kernel cannot (an older
kernel, another OS, no free huge page), nothing happens and the session runs as it would have.

Measured on a 2-core AMD EPYC (docs/cpu-speed.md#huge-pages-for-the-weights): gpt2's fp32 decode step
2-8% faster, int8 and q4 within the spread between runs, at a cost when the session opens (0.5-1.5 s
more for gpt2): worth it for a long-running server in fp32, not for a few tokens. Hence opt-in:
`--huge-pages`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import re
import sys
from collections.abc import Callable
from typing import TypeVar

MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1
HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages): the PMD size
T = TypeVar("T")
_MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")


def anonymous_mappings(smaps: str) -> list[tuple[int, int, int]]:
    """The private writable anonymous mappings of a /proc/PID/smaps text: (start, end, resident bytes).

    The heap ([heap], where malloc puts blocks below its mmap threshold, which it raises as large blocks
    are freed) counts; files, shared memory and stacks do not.
    """
    mappings = []
    current = None
    for line in smaps.splitlines():
        fields = line.split()
        if _MAPPING.match(line):  # a mapping's first line: address range, permissions, offset, device, inode[, name]
            current = None
            if fields[1].startswith("rw") and fields[1][3] == "p" and fields[5:] in ([], ["[heap]"]):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = [start, end, 0]
                mappings.append(current)
        elif current is not None and fields[:1] == ["Rss:"]:
            current[2] = int(fields[1]) * 1024
    return [tuple(m) for m in mappings]


def new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `after` that no range of `before` covers (each list sorted, its ranges disjoint)."""
    out = []
    for start, end in after:
        for b_start, b_end in before:
            if b_end <= start or b_start >= end:
                continue
            if b_start > start:
                out.append((start, b_start))
            start = max(start, b_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def grown(before: list[tuple[int, int, int]], after: list[tuple[int, int, int]],
          min_resident: float = 0.9) -> list[tuple[int, int]]:
    """The address ranges of `after` (mappings as anonymous_mappings gives them) that gained resident memory
    since `before`: a new mapping; the new part of one the kernel extended (it merges neighbours); a whole
    mapping whose old part gained a huge page or more (the heap, where freed space was used again). Only
    mappings at least `min_resident` in use count."""
    out = []
    for start, end, rss in after:
        if rss < min_resident * (end - start):
            continue
        old = [(s, e, r) for s, e, r in before if s < end and e > start]
        added = new_ranges([(s, e) for s, e, _ in old], [(start, end)])
        if rss - sum(e - s for s, e in added) - sum(r for *_, r in old) >= HUGE_PAGE:
            out.append((start, end))
        else:
            out.extend(added)
    return out


def huge_page_spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each range shrunk to the whole huge pages inside it; ranges holding none are dropped."""
    spans = []
    for start, end in ranges:
        start, end = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if end > start:
            spans.append((start, end))
    return spans


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _smaps() -> str:
    with open("/proc/self/smaps") as f:
        return f.read()


def collapse_new_memory(call: Callable[[], T], min_resident: float = 0.9) -> tuple[T, int]:
    """call(), then the anonymous memory it took moved into huge pages: (what call returned, bytes moved).

    Moved: what `grown` finds (where the heap's old part gained memory, the caller's memory in it moves
    too; no value changes). Memory call() took from space that was already resident is not seen. Only
    mappings at least `min_resident` in use move: a thread's stack, or memory reserved and not yet
    touched, would grow if moved (a huge page is backed whole).
    """
    madvise = _madvise()
    if madvise is None:
        return call(), 0
    before = anonymous_mappings(_smaps())
    value = call()
    moved = 0
    for start, end in huge_page_spans(grown(before, anonymous_mappings(_smaps()), min_resident)):
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            moved += end - start
        elif ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS) and not moved:
            break  # EINVAL on the first: this kernel has no MADV_COLLAPSE (before Linux 6.1)
        # otherwise (EAGAIN, ENOMEM: no free huge page now) this span stays in small pages; the others may move
    return value, moved
