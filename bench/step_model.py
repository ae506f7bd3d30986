"""Where a batch-1 decode step's time goes: a fixed cost per layer against weight bytes streamed.

    python bench/step_model.py bench/results/decode_tuning_h100.json [more tuning runs...]

From tune_decode.py's step times (tuned, fastest of the repeats) of several GPT-2 shapes, fit
the bf16 steps as  t = a * n_layer + bytes / bandwidth  (least squares over the shapes): a is
what a layer's kernels cost beyond their weights (launch, ramp-up, tail, attention, LayerNorm),
bandwidth the rate the bf16 kernels stream weights at. Holding a, each int8 step gives the rate
its kernels stream int8 weights at, and the rate int8 would need for a target speedup over bf16
(issue #6: 1.3x). Bytes are the matmul weights and the lm_head (embedding tied; biases, scales
and LayerNorms, under 0.2 %, left out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_decode import SHAPES  # noqa: E402  (bench/, the script's own folder)

VOCAB = 50304  # tune_decode's models


def weight_bytes(shape: str, weights: str) -> float:
    n_layer, _, width = SHAPES[shape]
    params = n_layer * 12 * width * width + VOCAB * width
    return params * (2 if weights == "bf16" else 1)


def fit(step_us: dict[tuple[str, str], float], target: float = 1.3) -> dict:
    """step_us: (shape, "bf16"|"int8") -> us per step. The fit (a in us per layer, bf16 TB/s)
    and per shape the implied int8 TB/s and the TB/s int8 needs for `target`x bf16."""
    shapes = [s for s in SHAPES if (s, "bf16") in step_us]
    if len(shapes) < 2:
        raise ValueError("the fit needs bf16 step times of at least two shapes")
    A = np.array([[SHAPES[s][0], weight_bytes(s, "bf16") / 1e6] for s in shapes])
    (a, us_per_mb), *_ = np.linalg.lstsq(A, np.array([step_us[(s, "bf16")] for s in shapes]), rcond=None)
    rows = []
    for s in shapes:
        fixed = a * SHAPES[s][0]
        bf16 = step_us[(s, "bf16")]
        row = {"shape": s, "bf16_us": bf16, "bf16_fit_us": round(fixed + weight_bytes(s, "bf16") / 1e6 * us_per_mb, 1),
               "fixed_us": round(fixed, 1)}
        if (s, "int8") in step_us:
            int8 = step_us[(s, "int8")]
            mb = weight_bytes(s, "int8") / 1e6
            row.update(int8_us=int8, speedup=round(bf16 / int8, 3),
                       int8_tb_per_s=round(mb / (int8 - fixed), 2),  # MB per us = TB/s,
                       int8_tb_per_s_for_target=round(mb / (bf16 / target - fixed), 2))
        rows.append(row)
    return {"fixed_us_per_layer": round(a, 2), "bf16_tb_per_s": round(1 / us_per_mb, 2), "target": target,
            "shapes": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tuning_json", nargs="+",
                    help="bench/tune_decode.py results; a later file's (shape, weights) replaces an earlier one's")
    ap.add_argument("--target", type=float, default=1.3, help="int8 over bf16 step speedup")
    ap.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = ap.parse_args()
    results = [json.loads(Path(path).read_text()) for path in args.tuning_json]
    step_us, measured = {}, {}
    for path, result in zip(args.tuning_json, results):
        seen = set()  # within a run, the first row per (shape, weights): --int8-converts' first conversion
        for r in result["rows"]:
            if r["batch"] == 1 and (r["shape"], r["weights"]) not in seen:
                seen.add((r["shape"], r["weights"]))
                step_us[(r["shape"], r["weights"])] = min(r["tuned_us_per_step"])
                measured[f'{r["shape"]} {r["weights"]}'] = {"source": path, "device": result["device"],
                                                              "date": result["date"]}
    report = {"command": "python " + " ".join(sys.argv), "computed": dt.date.today().isoformat(),
              "source": " ".join(args.tuning_json), "device": results[-1]["device"], "date": results[-1]["date"],
              "measured": measured, **fit(step_us, args.target),
              "notes": ["A fit over GPU runs' step times, computed on any machine: no new GPU measurement. "
                        "device and date are the last tuning run's; measured says which run gave each step time.",
                        "int8_tb_per_s: the rate int8 weights stream at, the fixed cost per layer held; "
                        "int8_tb_per_s_for_target: the rate the target speedup needs."]}
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
