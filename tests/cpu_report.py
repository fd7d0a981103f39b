"""Where the suite's CPU time goes: `python -m pytest -q -p tests.cpu_report` ends with the costliest tests
and files, in CPU-seconds (user + system).

A test's figure is this process's CPU time during it (its fixtures' set-up included, so a session fixture
counts for the first test that asks for it), plus that of the child processes it waited for, plus that of
the commands tests/cli_forkserver.py forked for it (not this process's children: their time reaches this
process only when the server ends).

Every test's figure, costliest first, is also written to .pytest_cache/cpu_report.tsv, with the part
its set-up took (the fixtures it was the first to ask for).
"""

from __future__ import annotations

import collections
import resource

import pytest

_rows: list[tuple[str, float]] = []
_setup: dict[str, float] = {}


def _cpu_seconds() -> float:
    from tests.test_cli import COMMANDS_CPU_SECONDS

    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages) + COMMANDS_CPU_SECONDS[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = _cpu_seconds()
    yield
    _rows.append((item.nodeid, _cpu_seconds() - start))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    start = _cpu_seconds()
    yield
    _setup[item.nodeid] = _cpu_seconds() - start


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    files = collections.Counter()
    for nodeid, seconds in _rows:
        files[nodeid.split("::")[0]] += seconds
    terminalreporter.section("CPU-seconds (user + system)")
    write(f"{sum(files.values()):8.1f}  all {len(_rows)} tests")
    for path, seconds in files.most_common(10):
        write(f"{seconds:8.1f}  {path}")
    write("")
    ranked = sorted(_rows, key=lambda row: -row[1])
    for nodeid, seconds in ranked[:15]:
        write(f"{seconds:8.1f}  {nodeid}")
    table = terminalreporter.config.rootpath / ".pytest_cache" / "cpu_report.tsv"
    table.parent.mkdir(exist_ok=True)
    table.write_text("CPU-s\tof which set-up\ttest\n" + "".join(
        f"{seconds:.2f}\t{_setup.get(nodeid, 0.0):.2f}\t{nodeid}\n" for nodeid, seconds in ranked))
    write(f"every test: {table}")
