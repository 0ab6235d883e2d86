"""`make bench` draws its run: the PNG from the JSON it writes."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from tests.support.agent import ROOT


def test_bench_draws_each_timed_path_as_distributions(tmp_path):
    rng = random.Random(7)

    def series(median: float) -> list[float]:
        return [round(rng.lognormvariate(0, 0.3) * median, 3) for _ in range(50)]

    figures = [
        {"figure": "GET /api/v1/containers (100 claims)", "target": "≤ 1.2×", "ratio": 0.25,
         "samples": {"agent": series(1.2), "engine list": series(5.0), "bare stack": series(0.9)}},
        {"figure": "DELETE /api/v1/containers/<id>", "target": "≤ 1.05×", "ratio": 1.0,
         "samples": {"agent": series(1100), "engine stop and remove": series(1100), "bare stack": series(0.9)}},
        {"figure": "RSS per worker after the run", "target": "≤ 60 MiB", "value": "max 48 MiB", "samples": {}},
    ]
    results = tmp_path / "run.json"
    results.write_text(json.dumps({
        "when": "2026-11-25T10:00:00+00:00", "quick": True, "figures": figures,
        "machine": {"cpu_model": "AMD EPYC", "cores": 2, "engine_version": "20.10.24"},
    }))
    drawn = subprocess.run([sys.executable, "benchmarks/bench.py", "--draw", str(results)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert drawn.returncode == 0, drawn.stderr
    png = (tmp_path / "run.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1100 and 400 < height < 1000, "two panels of three series, none for a figure without samples"
