"""COCO evaluation with the official evaluator, on the annotation file itself.

pycocotools' ``COCOeval`` is the reference everybody reports; it is used as is. What is added here is what a
training loop needs around it: turning torchvision predictions into COCO result records (original category ids,
``xywh`` boxes in the original image, RLE masks), gathering them from every DDP rank, and reading the 12 standard
numbers. Evaluating against the annotation file (rather than against the targets the datamodule produced) keeps
crowd regions, original areas (small/medium/large) and images the datamodule skipped exactly as COCO defines them.
COCOeval's ``imgIds`` are the images evaluated: an image left out because it does not decode
(``data.eval_undecodable: exclude``) is not among them, so its ground truth leaves the benchmark with it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

__all__ = ["STAT_NAMES", "CocoEvaluator", "detections_to_coco", "gather_from_processes"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(
    detection: dict[str, Tensor], image_id: int, category_ids: Sequence[int], mask_threshold: float = 0.5
) -> list[dict]:
    """COCO result records of one image's torchvision detections (boxes ``xyxy`` in original image pixels).

    ``labels`` are contiguous ``1..K``; ``category_ids[label - 1]`` is the file's id (any other label is a bug in the
    detector and raises ``ValueError``: Python's ``category_ids[-1]`` would silently score it as the last category).
    ``masks`` (N, 1, H, W) probabilities, if present, are thresholded and RLE-encoded.
    """
    boxes = detection["boxes"].detach().float().cpu()
    scores = detection["scores"].detach().float().cpu().tolist()
    labels = detection["labels"].detach().cpu().tolist()
    bad = [label for label in labels if not 1 <= label <= len(category_ids)]
    if bad:
        raise ValueError(f"detection label {bad[0]} is outside 1..{len(category_ids)} (0 is the background)")
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


def gather_from_processes(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (``[value]`` without torch.distributed or with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


class CocoEvaluator:
    """Accumulate COCO result records, gather them over DDP ranks, score them with ``COCOeval``.

    ``COCOeval.params.imgIds`` are the ids of the evaluated images less the excluded ones (``evaluated_ids``): the
    metric is the one of the annotation file with the excluded images and their annotations removed.

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
        self.excluded_ids: set[int] = set()

    @property
    def coco(self) -> COCO:
        if self._coco is None:
            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(str(self.annotation_file))
        return self._coco

    def reset(self) -> None:
        self.records, self.image_ids, self.excluded_ids = [], set(), set()

    def update(self, records: list[dict], image_ids: Sequence[int], excluded_ids: Sequence[int] = ()) -> None:
        """Add one batch: its result records, the ids of all its evaluated images (also those without detections) and
        of the images it left out because they do not decode."""
        self.records.extend(records)
        self.image_ids.update(int(i) for i in image_ids)
        self.excluded_ids.update(int(i) for i in excluded_ids)

    @property
    def evaluated_ids(self) -> list[int]:
        """COCOeval's ``imgIds``: the evaluated images, never an excluded one."""
        return sorted(self.image_ids - self.excluded_ids)

    def gather(self) -> None:
        """Merge every rank's records, image ids and excluded ids into every rank (no-op without torch.distributed)."""
        parts = gather_from_processes((self.records, sorted(self.image_ids), sorted(self.excluded_ids)))
        self.records = [r for records, _, _ in parts for r in records]
        self.image_ids = {i for _, ids, _ in parts for i in ids}
        self.excluded_ids = {i for _, _, ids in parts for i in ids}

    def compute(self) -> dict[str, float]:
        """``{f"{iou_type}_{stat}": value}`` over the evaluated images (12 stats per IoU type; -1 where undefined)."""
        out = {}
        for iou_type in self.iou_types:
            stats = self._evaluate(iou_type)
            out.update({f"{iou_type}_{name}": float(v) for name, v in zip(STAT_NAMES, stats)})
        return out

    def _evaluate(self, iou_type: str) -> np.ndarray:
        image_ids = self.evaluated_ids
        records = [r for r in self.records if iou_type == "bbox" or "segmentation" in r]
        if not records or not image_ids:
            return np.zeros(len(STAT_NAMES))  # NOTE: loadRes rejects an empty list; no detection scores 0
        with contextlib.redirect_stdout(io.StringIO()):
            predictions = self.coco.loadRes(_strip_bbox_for_segm(records) if iou_type == "segm" else records)
            evaluator = COCOeval(self.coco, predictions, iouType=iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return np.asarray(evaluator.stats)


def _strip_bbox_for_segm(records: list[dict]) -> list[dict]:
    # NOTE: loadRes derives segm boxes/areas from the masks only when "bbox" is absent
    return [{k: v for k, v in r.items() if k != "bbox"} for r in records]
