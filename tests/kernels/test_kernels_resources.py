"""benchmarks/kernels_resources.py: compiles the chunked kernels for sm_90 on a machine without a GPU and reads
their registers, stack and instruction mix from the cubin (the tool that found fp32's spilling tile 16). It runs in
a child process: the tests' TRITON_INTERPRET=1 (conftest) turns the kernels into interpreted Python."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
KEYS = {"registers", "stack_bytes", "static_shared", "spill_stores", "spill_loads", "hgmma", "hmma", "ffma"}

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")),
    reason="this Triton build has no NVIDIA tools")


def _run(tmp_path, variants, kernels):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    subprocess.run([sys.executable, "-m", "benchmarks.kernels_resources", "--variants", json.dumps(variants),
                    "--kernels", *kernels, "--workdir", str(tmp_path / "cubins"), "--out", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    data = json.loads((tmp_path / js).read_text())
    assert data["arch"] == 90 and data["triton"] == triton.__version__
    assert (tmp_path / js.replace(".json", ".md")).read_text().count("| `") == sum(len(kernels) for _ in variants)
    return [r for res in data["results"] for r in res["kernels"]]


def test_compiles_without_a_gpu_and_reads_the_cubin(tmp_path):
    (bf16_out,) = _run(tmp_path, [{"dtype": "bf16", "dv": 64}], ["out"])
    assert "error" not in bf16_out, bf16_out
    assert KEYS <= bf16_out.keys() and 1 <= bf16_out["registers"] <= 255
    assert bf16_out["hgmma"] > 0  # bf16 products on Hopper's warp-group MMA
    assert bf16_out["tile"] == 8 and bf16_out["chunk"] == 64 and bf16_out["warps"] == 4


def test_fp32_launch_as_the_op_makes_it(tmp_path):
    (row,) = _run(tmp_path, [{"dtype": "fp32", "dv": 10}], ["state"])
    assert "error" not in row, row
    assert row["tile"] == 8 and row["chunk"] == 32  # fp32 operands: tile 8, chunk 32, as the op launches them
    assert row["hgmma"] == row["hmma"] == 0 and row["ffma"] > 0  # IEEE fp32: no tensor-core products
    assert any(name.endswith(".cubin") for name in os.listdir(tmp_path / "cubins"))
