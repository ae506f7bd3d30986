"""Instructions per weight in the one-row kernel's compiled loop, by int8 conversion (no GPU).

    python bench/int8_convert_sass.py --out bench/results/int8_convert_sass.json

Compiles decode_kernels' GEMV through Triton for sm_90 down to a cubin (Triton's own ptxas),
disassembles it with the nvdisasm Triton ships, and counts the SASS instructions of the K loop
per weight element, for bf16 weights and for int8 weights through each DECODE_INT8_CONVERT
(cvt, bits, half, half_offset). A static count, not a timing: it says how much issue work each weight byte
costs, which bench/step_model.py points at as the int8 step's bound on the H100.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling, not interpreting (read at triton import)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import decode_kernels as dk  # noqa: E402

OPCODE = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")  # an nvdisasm line's opcode
# what Triton's launcher assumes of real calls: 16-byte aligned pointers, widths divisible by 16
DIVISIBLE = ("N", "K", "C", "D")


def build(kernel, pointers: dict[str, str], num_warps: int = 4, **constexprs):
    """kernel (a jit function or its autotuner) compiled for sm_90; pointers: argument -> type
    where not *bf16."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "*bf16") if name.endswith("_ptr") else (
            "fp32" if name in ("eps", "scale") else "i32")
        if name.endswith("_ptr") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def loop_instructions(compiled) -> collections.Counter:
    """Opcodes of the kernel's largest loop (the K loop; a fused LayerNorm adds a smaller one
    over x): from the target of each backward branch to the branch."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        lines = subprocess.run([str(tools / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    labels = {x[1:].split(":")[0]: i for i, x in enumerate(lines) if x.startswith(".L_x_")}
    loops = []
    for end, line in enumerate(lines):
        branch = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", line)
        start = labels.get(branch.group(1)) if branch else None
        if start is not None and start < end:
            ops = (OPCODE.match(x) for x in lines[start:end + 1])
            loops.append(collections.Counter(m.group(1) for m in ops if m))
    if not loops:
        raise RuntimeError("no loop found in the kernel")
    return max(loops, key=lambda ops: sum(ops.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/int8_convert_sass.json")
    args = ap.parse_args()
    flags = dict(HAS_BIAS=True, HAS_LN=False, HAS_LN_BIAS=False, GELU=False, HAS_RESIDUAL=False, KV_OUT=False,
                 USE_PDL=True)
    variants = {"bf16": ({}, False, dk.CVT), "int8_cvt": ({"w_ptr": "*i8"}, True, dk.CVT),
                "int8_bits": ({"w_ptr": "*i8"}, True, dk.BITS), "int8_half": ({"w_ptr": "*i8"}, True, dk.HALF),
                "int8_half_offset": ({"w_ptr": "*i8"}, True, dk.HALF_OFFSET)}
    rows = []
    for config in dk._GEMV_CONFIGS:
        per_thread = config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"] / (32 * config.num_warps)
        row = {"config": dict(config.kwargs, num_warps=config.num_warps)}
        for name, (pointers, scales, mode) in variants.items():
            ops = loop_instructions(build(dk._gemv_kernel, {"pos_ptr": "*i64", **pointers}, config.num_warps,
                                          HAS_SCALES=scales, INT8_BITS=mode, **flags, **config.kwargs))
            row[f"{name}_per_weight"] = round(sum(ops.values()) / per_thread, 2)
            row[f"{name}_top"] = dict(ops.most_common(6))
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_top")}), flush=True)
        rows.append(row)
    summary = {name: round(sum(r[f"{name}_per_weight"] for r in rows) / len(rows), 2) for name in variants}
    result = {"device": "none (static: Triton compile for sm_90 + nvdisasm)", "triton": triton.__version__,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "mean_per_weight": summary, "configs": rows,
              "notes": ["SASS instructions in the GEMV's K loop divided by the weight elements one thread "
                        "handles per iteration (BLOCK_N * BLOCK_K / threads); bias and scales epilogue, no "
                        "LayerNorm. I2F (cvt) issues at a quarter of the FMA rate on Hopper, so its count "
                        "understates its cost. The GPU machine's Triton may differ in version."]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
