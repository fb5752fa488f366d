"""The benchmark commands run at tiny sizes, on every code path a GPU run uses, and write their files (no timings)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import pytest
import timm
import torch

from tests.support.scripts import load_script

benchmark = load_script("benchmark")
benchmark_compare = load_script("benchmark_compare")
autocast, markdown_table = load_script("benchmark_common").autocast, load_script("benchmark_common").markdown_table
count_params = load_script("inspect_models").count_params
TINY = ["--img-size", "32", "--batch-size", "2", "--warmup", "0", "--iters", "1", "--threads", "1"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_benchmark_writes_csv_markdown_and_plot(tmp_path: Path) -> None:
    models = ["strata_hybrid_pico", "test_vit"]  # one of ours, one of timm's
    assert benchmark.main(["--models", ",".join(models), *TINY, "--out-dir", str(tmp_path), "--name", "t"]) == 0
    rows = _rows(tmp_path / "t.csv")
    assert [r["model"] for r in rows] == models
    for row in rows:
        assert float(row["params_m"]) == pytest.approx(count_params(timm.create_model(row["model"])) / 1e6)
        for key in ("gmacs", "infer_img_s", "train_img_s", "infer_peak_mib", "train_peak_mib"):
            assert float(row[key]) > 0, key
        assert float(row["infer_img_s"]) == pytest.approx(2e3 / float(row["infer_ms"]))
        assert row["error"] == ""
    md = (tmp_path / "t.md").read_text()
    assert "Command: `python scripts/benchmark.py --models strata_hybrid_pico,test_vit" in md
    assert all(f"| {m} |" in md for m in models)
    image = matplotlib.image.imread(tmp_path / "t.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_benchmark_gpu_paths_bf16_channels_last(tmp_path: Path) -> None:
    argv = ["--models", "strata_hybrid_pico", *TINY, "--precision", "bf16", "--channels-last"]
    assert benchmark.main([*argv, "--out-dir", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path / "models.csv")
    assert (row["precision"], row["channels_last"], row["compile"]) == ("bf16", "True", "False")
    assert float(row["train_img_s"]) > 0 and float(row["infer_img_s"]) > 0


def test_benchmark_compile_path(tmp_path: Path) -> None:
    # NOTE: the "eager" backend runs dynamo's capture without inductor's C++ codegen (minutes on 2 cores)
    argv = ["--models", "test_vit", *TINY, "--compile", "--compile-backend", "eager", "--bench", "infer"]
    assert benchmark.main([*argv, "--out-dir", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path / "models.csv")
    assert row["compile"] == "True" and float(row["infer_img_s"]) > 0 and row["train_img_s"] == ""
    assert "compile(eager)" in (tmp_path / "models.md").read_text()


def test_autocast_bf16_runs_matmuls_in_bf16() -> None:
    a = torch.randn(4, 4)
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="--precision"):
        autocast("cpu", "fp16")


def test_benchmark_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--models", "no_such_model_xyz"], "no registered model matches"),
        (["--models", "strata_hybrid_pico", "--img-size", "0"], "--img-size must be a positive integer"),
    ):
        with pytest.raises(SystemExit):
            benchmark.main(argv)
        assert message in capsys.readouterr().err
    assert benchmark.resolve_models("strata_hybrid_p*,biformer_tiny") == ["strata_hybrid_pico", "biformer_tiny"]


def test_markdown_table_formats_and_marks_missing() -> None:
    table = markdown_table([dict(a=1.23456, b="x"), dict(a=2.0)], [("a", "{:.2f}"), ("b", "{}")])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x |", "| 2.00 | - |"]


def test_compare_bra_and_efficiency_write_ratios(tmp_path: Path) -> None:
    out = ["--out-dir", str(tmp_path), "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert benchmark_compare.main(["bra", "--shapes", "smoke", *out]) == 0
    (row,) = _rows(tmp_path / "compare_bra.csv")
    assert float(row["speedup"]) == pytest.approx(float(row["ref_ms"]) / float(row["ours_ms"]), rel=1e-3)
    assert row["ok"] == "True"
    argv = ["efficiency", "--models", "strata_hybrid_pico:32:2", "--matmul-size", "64", *out]
    assert benchmark_compare.main(argv) == 0
    (row,) = _rows(tmp_path / "compare_efficiency.csv")
    assert float(row["efficiency"]) == pytest.approx(
        float(row["achieved_gflops"]) / float(row["matmul_peak_gflops"]), rel=1e-3
    )
    assert "| strata_hybrid_pico |" in (tmp_path / "compare_efficiency.md").read_text()


def test_compare_data_pipelines_agree_on_shape(tmp_path: Path) -> None:
    argv = ["data", "--recipes", "basic,deit", "--images", "3", "--jpeg-dir", str(tmp_path / "jpegs")]
    assert benchmark_compare.main([*argv, "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "compare_data.csv")
    assert [(r["recipe"], r["source"], r["crop"]) for r in rows] == [
        ("basic", "500x375", "224"),
        ("deit", "500x375", "224"),
    ]
    assert all(float(r["ratio"]) > 0 for r in rows)


@pytest.mark.slow
def test_compare_lightning_and_davit_run_tiny(tiny_imagenet: Path, tmp_path: Path) -> None:
    demo = tiny_imagenet  # NOTE: the demo's layout; a fresh clone (CI) has no data/demo yet
    out = ["--out-dir", str(tmp_path), "--repeats", "1", "--warmup", "0", "--threads", "1"]
    argv = ["lightning", "--data-root", str(demo), "--img-size", "32", "--batch-size", "4", "--steps", "3", *out]
    assert benchmark_compare.main(argv) == 0
    (row,) = _rows(tmp_path / "compare_lightning.csv")
    assert float(row["plain_ms"]) > 0 and float(row["lightning_ms"]) > 0
    assert benchmark_compare.main(["davit", "--img-size", "224", "--batch-size", "1", *out]) == 0
    assert all(float(r["max_abs_diff"]) <= 1e-4 for r in _rows(tmp_path / "compare_davit.csv"))


@pytest.mark.slow
def test_benchmark_compiles_with_inductor(tmp_path: Path) -> None:
    argv = ["--models", "strata_hybrid_pico", *TINY, "--compile", "--bench", "infer", "--out-dir", str(tmp_path)]
    assert benchmark.main(argv) == 0
