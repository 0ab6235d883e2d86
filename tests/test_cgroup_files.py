"""Reading a container's cgroup files, v1 and v2, from directories laid out as the kernel's are."""

from __future__ import annotations

from pathlib import Path

from utopia_agent.node.claim_usage import CgroupFiles, Usage, _NamedCgroups


def write(directory: Path, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_dot_", ".")).write_text(text)
    return directory


def test_v2_reads_cpu_from_cpu_stat_and_leaves_out_the_inactive_page_cache(tmp_path):
    cgroup = write(tmp_path / "v2", cpu_dot_stat="usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
                   memory_dot_current="10485760\n", memory_dot_max="max\n",
                   memory_dot_stat="anon 4096\nactive_file 1024\ninactive_file 2097152\nfile_dirty 0\n")
    assert CgroupFiles(cgroup, False, cgroup, False).read() == Usage(2.5, 10485760 - 2097152, None)
    (cgroup / "memory.max").write_text("268435456\n")
    assert CgroupFiles(cgroup, False, cgroup, False).read().memory_limit_bytes == 268435456


def test_v1_reads_cpuacct_and_the_hierarchy_total(tmp_path):
    cpu = write(tmp_path / "cpuacct", cpuacct_dot_usage="3000000000\n")
    memory = write(tmp_path / "memory", memory_dot_usage_in_bytes="8388608\n", memory_dot_limit_in_bytes="9223372036854771712\n",
                   memory_dot_stat="inactive_file 1\ntotal_inactive_file 4194304\ntotal_active_file 0\n")
    assert CgroupFiles(cpu, True, memory, True).read() == Usage(3.0, 8388608 - 4194304, None)
    (memory / "memory.limit_in_bytes").write_text("1073741824\n")
    assert CgroupFiles(cpu, True, memory, True).read().memory_limit_bytes == 1073741824


def test_a_cgroup_gone_or_without_its_figures_reads_as_none(tmp_path):
    cgroup = write(tmp_path / "v2", cpu_dot_stat="user_usec 1\n", memory_dot_current="1\n", memory_dot_max="max\n", memory_dot_stat="")
    assert CgroupFiles(cgroup, False, cgroup, False).read() is None, "cpu.stat without usage_usec"
    assert CgroupFiles(tmp_path / "gone", False, tmp_path / "gone", False).read() is None


def test_another_containers_cgroups_are_found_by_its_id_where_they_exist(tmp_path):
    one, other = "a" * 64, "b" * 64
    for container_id in (one, other):
        (tmp_path / "cpu" / f"docker-{container_id}.scope").mkdir(parents=True)
        (tmp_path / "memory" / "docker" / container_id).mkdir(parents=True)
    files = CgroupFiles(tmp_path / "cpu" / f"docker-{one}.scope", True, tmp_path / "memory" / "docker" / one, False)
    named = _NamedCgroups.learnt(one, files)
    assert named.of(other) == CgroupFiles(tmp_path / "cpu" / f"docker-{other}.scope", True, tmp_path / "memory" / "docker" / other, False)
    assert named.of("c" * 64) is None, "a container that does not run (or sits under another parent) has no such cgroup"
    assert _NamedCgroups.learnt(other, files) is None, "paths that do not name the container teach nothing"
