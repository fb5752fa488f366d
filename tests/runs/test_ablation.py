"""``train.py ablate``: every cell a normal run, a failed cell recorded with its reason, a rerun skips finished ones."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runs.ablation_grid import apply_override, load_ablation
from tests.support.cli import REPO, train_env

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    depths=[1, 1, 1, 1],
    embed_dims=[16, 32, 64, 64],
    block=["mbconv", "mbconv", "mbconv", "dual"],
    block_kwargs=[{"attn": "se"}, {"attn": "se"}, {"attn": "se"}, {"window_size": 2}],
)


def test_a_dotted_override_walks_mappings_and_list_items() -> None:
    config = {"model": {"init_args": {"backbone_kwargs": {"block": ["a", "b", "c"]}}}}
    apply_override(config, "model.init_args.backbone_kwargs.block.2", "bra")
    apply_override(config, "trainer.max_epochs", 3)
    assert config["model"]["init_args"]["backbone_kwargs"]["block"] == ["a", "b", "bra"]
    assert config["trainer"] == {"max_epochs": 3}
    with pytest.raises(Exception, match="indexes a list of 3 items with '5'"):
        apply_override(config, "model.init_args.backbone_kwargs.block.5", "x")


def _ablation_file(tmp_path: Path, data: Path) -> Path:
    base = yaml.safe_load((REPO / "configs" / "demo" / "classify.yaml").read_text())
    base["data"]["init_args"].update(root=str(data), img_size=32, num_workers=0)
    base["model"]["init_args"].update(backbone="composed_backbone", backbone_kwargs=TINY)
    base["trainer"].update(max_epochs=1, limit_train_batches=2, enable_progress_bar=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    stage = "model.init_args.backbone_kwargs"
    spec = dict(
        base=[str(tmp_path / "base.yaml")],
        out_dir=str(tmp_path / "ablate"),
        seeds=[0],
        args=["--val_overlays", "0"],
        grid=dict(
            stage3={
                "se": {},
                "eca": {f"{stage}.block_kwargs.2": {"attn": "eca"}},
                "broken": {f"{stage}.block_kwargs.2": {"attn": "se", "expand": 2}},
            }
        ),
    )
    (tmp_path / "ablate.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path / "ablate.yaml"


def _ablate(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", "ablate", "--config", str(config)],
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_an_ablation_runs_every_cell_records_failures_and_skips_finished_cells_on_rerun(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    config = _ablation_file(tmp_path, tiny_imagenet)
    assert [c.name for c in load_ablation(config).cells] == ["se", "eca", "broken"]
    first = _ablate(config)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "ablate"
    rows = {row["cell"]: row for row in csv.DictReader((out / "ablation.csv").open())}
    assert rows["se"]["status"] == rows["eca"]["status"] == "finished"
    assert rows["broken"]["status"] == "failed" and "takes no argument 'expand'" in rows["broken"]["reason"]
    for cell in ("se", "eca"):
        summary = json.loads((out / f"{cell}-s0" / "summary.json").read_text())
        assert float(rows[cell]["best_metric"]) == pytest.approx(summary["best_metric"])
        assert int(rows[cell]["params"]) > 0 and int(rows[cell]["macs"]) > 0
        assert float(rows[cell]["peak_memory_mib"]) > 0 and float(rows[cell]["infer_images_per_sec"]) > 0
    assert int(rows["se"]["params"]) != int(rows["eca"]["params"])  # NOTE: SE has weights, ECA one 1-D kernel
    table = (out / "ablation.md").read_text()
    assert "Fair by construction" in table and "| se |" in table and "broken, seed 0:" in table
    assert (out / "ablation.png").stat().st_size > 0

    stamp = (out / "se-s0" / "summary.json").stat().st_mtime_ns
    second = _ablate(config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / "se-s0" / "summary.json").stat().st_mtime_ns == stamp
    assert "se-s0: running" not in second.stdout and "broken-s0: running" in second.stdout


@pytest.mark.parametrize("path", ["configs/demo/ablate.yaml", "configs/imagenet/ablate_biformer_tiny_stage3.yaml"])
def test_the_shipped_ablations_build_every_cell_within_their_parameter_margin(path: str) -> None:
    import timm
    import torch

    import backbones  # noqa: F401  (registers the models)

    ablation = load_ablation(REPO / path)
    counts = []
    for cell in ablation.cells:
        init = ablation.cell_config(cell)["model"]["init_args"]
        with torch.device("meta"):
            model = timm.create_model(init["backbone"], num_classes=8, **init["backbone_kwargs"])
        counts.append(sum(p.numel() for p in model.parameters()))
    assert len(ablation.cells) >= 4 and len(ablation.seeds) >= 2
    assert all(abs(n / counts[0] - 1) <= ablation.param_margin for n in counts), counts
