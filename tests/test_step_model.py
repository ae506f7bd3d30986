"""bench/step_model.py: the per-layer cost / weight-bandwidth fit of decode step times."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from step_model import SHAPES, fit, weight_bytes  # noqa: E402


def synthetic(a: float, bf16_tb_s: float, int8_tb_s: float) -> dict[tuple[str, str], float]:
    """Step times that follow the model exactly: a us per layer plus bytes at each rate."""
    times = {}
    for shape, (n_layer, _, _) in SHAPES.items():
        times[(shape, "bf16")] = a * n_layer + weight_bytes(shape, "bf16") / 1e6 / bf16_tb_s
        times[(shape, "int8")] = a * n_layer + weight_bytes(shape, "int8") / 1e6 / int8_tb_s
    return times


def test_fit_recovers_the_cost_and_rates_it_was_made_from() -> None:
    got = fit(synthetic(a=6.0, bf16_tb_s=2.5, int8_tb_s=1.5))
    assert got["fixed_us_per_layer"] == pytest.approx(6.0, abs=0.01)
    assert got["bf16_tb_per_s"] == pytest.approx(2.5, abs=0.01)
    for row in got["shapes"]:
        assert row["int8_tb_per_s"] == pytest.approx(1.5, abs=0.01), row
        assert row["bf16_fit_us"] == pytest.approx(row["bf16_us"], abs=0.1)
        # exactly the target speedup at the rate it names
        n_layer = SHAPES[row["shape"]][0]
        int8_at_rate = 6.0 * n_layer + weight_bytes(row["shape"], "int8") / 1e6 / row["int8_tb_per_s_for_target"]
        assert row["bf16_us"] / int8_at_rate == pytest.approx(1.3, rel=0.01)


def test_fit_needs_two_shapes_and_the_script_reads_a_tuning_result(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two shapes"):
        fit({("124M", "bf16"): 180.0})
    times = synthetic(a=5.0, bf16_tb_s=2.0, int8_tb_s=1.2)
    result = {"device": "GPU X", "date": "2031-01-01", "rows": [
        {"shape": s, "weights": w, "batch": 1, "tuned_us_per_step": [t + 3.0, t]} for (s, w), t in times.items()]}
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(result))
    written = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "bench/step_model.py", str(path), "--out", str(written)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    report = json.loads(out)
    assert json.loads(written.read_text()) == report and str(path) in report["command"]
    assert report["device"] == "GPU X" and report["fixed_us_per_layer"] == pytest.approx(5.0, abs=0.01)
    assert [r["int8_tb_per_s"] for r in report["shapes"]] == pytest.approx([1.2] * 3, abs=0.01)


def test_a_later_tuning_run_replaces_an_earlier_ones_steps(tmp_path: Path) -> None:
    """bf16 from one run, int8 from a later one (a retune of int8 alone): the later steps win;
    within a run, the first row of a (shape, weights) (tune_decode's --int8-converts' first)."""
    old, new = synthetic(a=5.0, bf16_tb_s=2.0, int8_tb_s=1.2), synthetic(a=5.0, bf16_tb_s=2.0, int8_tb_s=1.6)
    other_convert = synthetic(a=5.0, bf16_tb_s=2.0, int8_tb_s=1.9)
    paths = []
    for name, times, weights in (("old", old, ("bf16", "int8")), ("new", new, ("int8",))):
        rows = [{"shape": s, "weights": w, "batch": 1, "tuned_us_per_step": [t]}
                for (s, w), t in times.items() if w in weights]
        if name == "new":
            rows += [{"shape": s, "weights": w, "batch": 1, "tuned_us_per_step": [t], "int8_convert": "other"}
                     for (s, w), t in other_convert.items() if w == "int8"]
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"device": f"GPU {name}", "date": name, "rows": rows}))
    out = subprocess.run([sys.executable, "bench/step_model.py", *map(str, paths)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    report = json.loads(out)
    assert [r["int8_tb_per_s"] for r in report["shapes"]] == pytest.approx([1.6] * 3, abs=0.01)
    assert report["measured"]["355M bf16"]["source"] == str(paths[0])
    assert report["measured"]["355M int8"]["source"] == str(paths[1]) and report["device"] == "GPU new"
