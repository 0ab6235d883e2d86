"""prometheus-client's multiprocess files on a full filesystem: the worker lives, and new series
reach the file once there is room again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.support.small_filesystem import fill, small_tmpfs
from utopia_agent.observability.metric_files import AllocatedMmapedDict

# Opens a metrics file, fills the filesystem, then writes enough new series to need new blocks.
_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from prometheus_client.mmap_dict import MmapedDict
    from utopia_agent.observability.metric_files import AllocatedMmapedDict
    cls = AllocatedMmapedDict if sys.argv[2] == "allocated" else MmapedDict
    path = Path(sys.argv[1])
    values = cls(str(path / "counter_1.db"))
    values.write_value("before", 1.0, 0.0)
    sys.stdout.write("opened\\n"); sys.stdout.flush()
    sys.stdin.readline()  # the filesystem is full now
    for n in range(3000):
        values.write_value(f"series-{n}-" + "x" * 40, float(n), 0.0)
    assert values.read_value("series-2999-" + "x" * 40)[0] == 2999.0
    sys.stdout.write("written\\n"); sys.stdout.flush()
    sys.stdin.readline()  # there is room again
    values.write_value("series-2999-" + "x" * 40, 3000.0, 0.0)
    values.close()
    found = dict((key, value) for key, value, *_ in MmapedDict.read_all_values_from_file(str(path / "counter_1.db")))
    assert found["before"] == 1.0 and found["series-2999-" + "x" * 40] == 3000.0, sorted(found)[-3:]
""")


@pytest.mark.parametrize("kind", ["allocated", "library"])
def test_new_series_on_a_full_filesystem(tmp_path, kind):
    """The library's own file dies of SIGBUS where ours spills to memory and catches up later."""
    with small_tmpfs(tmp_path / "metrics", size="1m") as metrics:
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(metrics), kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "opened\n"
        room = fill(metrics)
        writer.stdin.write("\n")
        writer.stdin.flush()
        if kind == "library":
            assert writer.wait(30) == -7, "expected SIGBUS from a store into a hole of a full filesystem"
            return
        assert writer.stdout.readline() == "written\n", writer.stderr.read()
        room.unlink()
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(30) == 0, writer.stderr.read()


def test_a_file_that_cannot_be_made_leaves_nothing_a_scrape_would_trip_on(tmp_path):
    """A worker's first series of a kind on a full filesystem: kept in memory, and no empty file
    left in the directory (the scrape reads every file's first word)."""
    with small_tmpfs(tmp_path / "metrics", size="1m") as metrics:
        fill(metrics)
        values = AllocatedMmapedDict(str(metrics / "histogram_7.db"))
        values.write_value("series", 2.0, 0.0)
        assert values.read_value("series") == (2.0, 0.0)
        values.close()
        assert sorted(path.name for path in metrics.iterdir()) == ["fill"]
        assert list(MultiProcessCollector(CollectorRegistry(), path=str(metrics)).collect()) == []
