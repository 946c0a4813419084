"""benchmarks/serve.py runs every client count it is given (regression: the per-request breakdown reused the server's
variable name, so every row after the first failed with AttributeError)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_benchmark_reports_every_client_count(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(REPO / "benchmarks/serve.py"), "--device", "cpu", "--preset", "tiny", "--horizon", "8",
           "--image-size", "32", "--clients", "1,2", "--requests", "3", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["clients"] for r in res["served"]] == [1, 2]
    for r in res["served"]:
        assert r["p50_ms"] > 0 and r["throughput_per_s"] > 0
        assert not r["client_imported_torch"]
        # the breakdown of a round trip: server total = decode/packing + queue + inference, transport the rest
        assert r["server_total_p50_ms"] <= r["p50_ms"] + 1e-6
        assert r["server_infer_p50_ms"] > 0
