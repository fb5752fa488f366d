"""COCO evaluation with the official evaluator, on the annotation file itself.

pycocotools' ``COCOeval`` is the reference everybody reports; it is used as is. What is added here is what a
training loop needs around it: turning torchvision predictions into COCO result records (original category ids,
``xywh`` boxes in the original image, RLE masks), gathering them from every DDP rank, and reading the 12 standard
numbers. Evaluating against the annotation file (rather than against the targets the datamodule produced) keeps
crowd regions, original areas (small/medium/large) and images the datamodule skipped exactly as COCO defines them.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

__all__ = ["STAT_NAMES", "CocoEvaluator", "detections_to_coco"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(
    detection: dict[str, Tensor], image_id: int, category_ids: Sequence[int], mask_threshold: float = 0.5
) -> list[dict]:
    """COCO result records of one image's torchvision detections (boxes ``xyxy`` in original image pixels).

    ``labels`` are contiguous ``1..K``; ``category_ids[label - 1]`` is the file's id. ``masks`` (N, 1, H, W)
    probabilities, if present, are thresholded and RLE-encoded.
    """
    boxes = detection["boxes"].detach().float().cpu()
    scores = detection["scores"].detach().float().cpu().tolist()
    labels = detection["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    records = [
        {"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "bbox": box, "score": score}
        for box, score, label in zip(xywh, scores, labels)
    ]
    if "masks" in detection:
        binary = (detection["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        for record, m in zip(records, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            record["segmentation"] = rle
    return records


class CocoEvaluator:
    """Accumulate COCO result records, gather them over DDP ranks, score them with ``COCOeval``.

    Args:
        annotation_file: the ground-truth COCO JSON (e.g. ``annotations/instances_val2017.json``).
        iou_types: ``("bbox",)`` or ``("bbox", "segm")``.
    """

    def __init__(self, annotation_file: str | Path, iou_types: Sequence[str] = ("bbox",)) -> None:
        self.annotation_file = Path(annotation_file)
        self.iou_types = tuple(iou_types)
        self._coco: COCO | None = None
        self.records: list[dict] = []
        self.image_ids: set[int] = set()

    @property
    def coco(self) -> COCO:
        if self._coco is None:
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(str(self.annotation_file))
        return self._coco

    def reset(self) -> None:
        self.records, self.image_ids = [], set()

    def update(self, records: list[dict], image_ids: Sequence[int]) -> None:
        """Add one batch: its result records and the ids of all its images (also those without detections)."""
        self.records.extend(records)
        self.image_ids.update(int(i) for i in image_ids)

    def gather(self) -> None:
        """Merge every rank's records and image ids into every rank (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.records, sorted(self.image_ids)))
        self.records = [r for records, _ in parts for r in records]
        self.image_ids = {i for _, ids in parts for i in ids}

    def compute(self) -> dict[str, float]:
        """``{f"{iou_type}_{stat}": value}`` over the evaluated images (12 stats per IoU type; -1 where undefined)."""
        out = {}
        for iou_type in self.iou_types:
            stats = self._evaluate(iou_type)
            out.update({f"{iou_type}_{name}": float(v) for name, v in zip(STAT_NAMES, stats)})
        return out

    def _evaluate(self, iou_type: str) -> np.ndarray:
        records = [r for r in self.records if iou_type == "bbox" or "segmentation" in r]
        if not records or not self.image_ids:
            return np.zeros(len(STAT_NAMES))  # NOTE: loadRes rejects an empty list; no detection scores 0
        with contextlib.redirect_stdout(io.StringIO()):
            predictions = self.coco.loadRes(_strip_bbox_for_segm(records) if iou_type == "segm" else records)
            evaluator = COCOeval(self.coco, predictions, iouType=iou_type)
            evaluator.params.imgIds = sorted(self.image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return np.asarray(evaluator.stats)

    def write_results(self, path: str | Path) -> Path:
        """Write the gathered records as a COCO results JSON (what ``COCO.loadRes`` and the test servers read)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.records))
        tmp.replace(path)
        return path


def _strip_bbox_for_segm(records: list[dict]) -> list[dict]:
    # NOTE: loadRes derives segm boxes/areas from the masks only when "bbox" is absent
    return [{k: v for k, v in r.items() if k != "bbox"} for r in records]
