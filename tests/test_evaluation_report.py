import json

import pytest

from chunkpolicy.evaluation.report import bar_chart, markdown_table, summarize, write_json_atomic
from chunkpolicy.success_rate import wilson_interval


@pytest.mark.parametrize("s, n, lo, hi", [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962)])
def test_wilson_known_values(s, n, lo, hi):
    a, b = wilson_interval(s, n)
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_wilson_errors():
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_report_outputs(tmp_path):
    res = {"policy": {"push": [1, 1, 0, 1], "reach": [1, 1, 1, 1]}, "do-nothing": {"push": [0, 0, 0, 0], "reach": [0, 0, 0, 1]}}
    s = summarize(res)
    assert s["policy"]["mean"]["rate"] == 7 / 8 and s["do-nothing"]["tasks"]["reach"]["successes"] == 1
    table = markdown_table(s)
    assert "| push |" in table and "**mean**" in table and "88%" in table
    png = bar_chart(s, tmp_path / "success.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = write_json_atomic(s, tmp_path / "r.json")
    assert json.loads(p.read_text())["policy"]["tasks"]["push"]["n"] == 4
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
