"""Huge pages for a session's weights (runtimes/hugepages.py): what moves, what does not, and that nothing changes.

The kernel is the oracle: /proc/self/smaps says which memory is in huge pages (AnonHugePages).
"""

import json
import mmap
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from gptdeploy.runtimes.hugepages import (HUGE_PAGE, anonymous_mappings, collapse_new_memory, grown, huge_page_spans,
                                          new_ranges)
from tests.test_cli import gptdeploy

SMAPS = """\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 
Size:               4096 kB
Rss:                4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0000600000 r--p 00000000 00:00 0 
Rss:                   0 kB
7f0000600000-7f0000800000 rw-s 00000000 00:01 12                         /dev/zero (deleted)
Rss:                2048 kB
7f0000800000-7f0000a00000 rw-p 00001000 fe:00 7                          /usr/lib/libc.so.6
Rss:                   8 kB
7f0000a00000-7f0000e00000 rw-p 00000000 00:00 0
Rss:                  12 kB
VmFlags: rd wr mr mw me ac sd
"""


def test_only_private_writable_anonymous_mappings_and_the_heap_are_read():
    assert anonymous_mappings(SMAPS) == [(0x55D0C0000000, 0x55D0C0021000, 100 * 1024),
                                         (0x7F0000000000, 0x7F0000400000, 4096 * 1024),
                                         (0x7F0000A00000, 0x7F0000E00000, 12 * 1024)]


def test_new_ranges_are_what_no_earlier_range_covers():
    assert new_ranges([], [(0, 10)]) == [(0, 10)]
    assert new_ranges([(0, 10)], [(0, 10)]) == []
    assert new_ranges([(10, 20), (30, 40)], [(0, 50), (60, 70)]) == [(0, 10), (20, 30), (40, 50), (60, 70)]


def test_grown_is_the_memory_the_call_added():
    mib = 1 << 20
    before = [(0, 8 * mib, 8 * mib), (16 * mib, 24 * mib, 4 * mib), (32 * mib, 40 * mib, 8 * mib)]
    after = [(0, 8 * mib, 8 * mib),  # as it was
             (16 * mib, 24 * mib, 8 * mib),  # 4 MiB more in use: the heap's freed space used again
             (32 * mib, 48 * mib, 16 * mib),  # extended: the kernel merged a new mapping into it
             (64 * mib, 72 * mib, 8 * mib),  # new
             (80 * mib, 88 * mib, 1 * mib)]  # new, hardly in use: a thread's stack
    assert grown(before, after) == [(16 * mib, 24 * mib), (40 * mib, 48 * mib), (64 * mib, 72 * mib)]
    assert huge_page_spans(grown(before, [(0, 8 * mib, 8 * mib), (9 * mib, 10 * mib, 1 * mib)])) == []  # no whole one


def test_spans_are_the_whole_huge_pages_inside_a_range():
    assert huge_page_spans([(1, HUGE_PAGE * 3 - 1)]) == [(HUGE_PAGE, HUGE_PAGE * 2)]
    assert huge_page_spans([(0, HUGE_PAGE * 2), (HUGE_PAGE * 5 + 1, HUGE_PAGE * 6)]) == [(0, HUGE_PAGE * 2)]


def _huge_bytes_in(array: np.ndarray) -> int:
    """AnonHugePages of the mappings that hold `array`, as the kernel reports them."""
    first = array.__array_interface__["data"][0]
    last = first + array.nbytes
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start < last and end > first
        elif inside and fields[0] == "AnonHugePages:":
            total += int(fields[1]) * 1024
    return total


def _collapse_works() -> str | None:
    if not sys.platform.startswith("linux"):
        return "huge pages are moved on Linux only"
    if tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2]) < (6, 1):
        return f"Linux {platform.release()} has no MADV_COLLAPSE (6.1 and later)"
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        return "this kernel has transparent huge pages off"
    return None


@pytest.mark.skipif(_collapse_works() is not None, reason=str(_collapse_works()))
def test_memory_made_during_the_call_moves_and_a_mapping_it_left_alone_does_not():
    # the caller's own mapping (MADV_DONTFORK: a flag of its own, so the kernel cannot merge it with the next)
    own = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    own.madvise(mmap.MADV_DONTFORK)
    before = np.frombuffer(own, dtype=np.uint8)
    before[:] = 1
    kept = []
    made, moved = collapse_new_memory(lambda: kept.append(np.full(64 << 20, 7, dtype=np.uint8)) or kept[-1])
    if moved == 0:
        pytest.skip("the kernel took no MADV_COLLAPSE advice (older than Linux 6.1, or no free huge page)")
    assert moved >= 60 << 20  # 64 MiB less the partial huge pages at its ends
    assert _huge_bytes_in(made) >= 60 << 20
    assert _huge_bytes_in(before) == 0
    assert (made == 7).all() and (before == 1).all()  # no value changed


def test_a_runner_with_huge_pages_computes_the_same_logits(shakespeare_export_path):
    from gptdeploy.runtimes.ort import OrtRunner, SessionConfig
    from gptdeploy.steps import prefill_inputs

    plain = OrtRunner(shakespeare_export_path, SessionConfig(intra_op_threads=1))
    huge = OrtRunner(shakespeare_export_path, SessionConfig(intra_op_threads=1, huge_pages=True))
    # How much moved is asserted where a process is fresh (the next test): in this long-running one, the
    # session can be made in memory that earlier tests freed and that is still resident, which is not seen.
    assert "huge pages" in huge.describe() and "huge pages" not in plain.describe()
    inputs = prefill_inputs([[1, 2, 3, 4, 5], [6, 7]])
    expected = plain.step(*inputs, plain.new_cache(2)).logits
    assert np.array_equal(huge.step(*inputs, huge.new_cache(2)).logits, expected)


def test_generate_with_huge_pages_generates_the_same_tokens(shakespeare_export_path):
    args = ["generate", shakespeare_export_path, "--prompt", "ROMEO:", "--greedy", "--max-new-tokens", "8", "--json"]
    plain, huge = gptdeploy(*args), gptdeploy(*args, "--huge-pages")
    assert plain.returncode == 0 and huge.returncode == 0, huge.stderr
    plain, huge = json.loads(plain.stdout), json.loads(huge.stdout)
    assert [r["generated_ids"] for r in huge["outputs"]] == [r["generated_ids"] for r in plain["outputs"]]
    assert "huge pages" in huge["runner"] and "huge pages" not in plain["runner"]
    moved = int(re.search(r"huge pages (\d+) MiB", huge["runner"]).group(1))
    if _collapse_works() is None and moved == 0 and _kernel_collapses_now():
        pytest.fail(f"the kernel moves memory into huge pages, but none of the session's moved: {huge['runner']}")
    # (the model's weights are 43 MB: where the kernel has free huge pages, most of them move)


def _kernel_collapses_now() -> bool:
    """Whether MADV_COLLAPSE moves a fresh 64 MiB in this process now (it cannot where no huge page is free).
    64 MiB: above malloc's largest mmap threshold (32 MiB), so the block is a new mapping, not reused heap."""
    kept = []
    _, moved = collapse_new_memory(lambda: kept.append(np.full(64 << 20, 1, dtype=np.uint8)))
    return moved > 0


def test_huge_pages_are_refused_where_they_do_nothing(shakespeare_export_path):
    result = gptdeploy("generate", shakespeare_export_path, "--runtime", "torch", "--huge-pages")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gptdeploy: error: --huge-pages is for the ort runtime (ONNX Runtime on the CPU), not torch"]
