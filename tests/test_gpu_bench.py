"""``bench/gpu.py`` on a machine without a GPU: it exits 0 with one line, and its measuring code runs on
the CPU at tiny sizes (what ``--cpu-smoke`` does for every case and setting)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_without_cuda_it_says_so_in_one_line_and_exits_0(gpu_bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def test_the_measurements_run_on_the_cpu_at_tiny_sizes(gpu_bench, tmp_path):
    cases = {"28x28x1": gpu_bench.SMOKE_CASES["28x28x1"]}
    result = gpu_bench.run(cases, torch.device("cpu"), steps=1, repeats=1, n_sample=2, budget_s=600,
                           settings=(("fp32", False), ("bf16", False)))
    row = result["cases"]["28x28x1"]
    assert set(row["settings"]) == {"fp32", "bf16"} and result["skipped"] == []
    assert 0.9 < row["param_ratio"] < 1.1  # equal parameters within 10%
    assert all(row["flops_per_step"][who] > 0 for who in ("ours", "diffusers"))
    for cell in row["settings"].values():
        assert cell["ours"]["images_per_s"] > 0 and cell["diffusers"]["images_per_s"] > 0
        assert cell["sampling_ours"]["images_per_s"] > 0
        assert cell["ours"]["fraction_of_bf16_peak"] is None  # a CPU has no entry in the table
    json.dumps(result)  # printable as JSON


def test_a_spent_budget_skips_and_lists_the_rest(gpu_bench):
    cases = {"28x28x1": gpu_bench.SMOKE_CASES["28x28x1"]}
    result = gpu_bench.run(cases, torch.device("cpu"), steps=1, repeats=1, n_sample=2, budget_s=-1)
    assert result["skipped"] == ["28x28x1 fp32", "28x28x1 bf16", "28x28x1 bf16+compile"]


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("Some Future GPU", None)])
def test_peak_bf16_flops_by_device_name(gpu_bench, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_bench.peak_bf16_flops(torch.device("cuda")) == (name, peak)
