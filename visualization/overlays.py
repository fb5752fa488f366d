"""Prediction overlays drawn with PIL: classification tiles, detection boxes and masks, segmentation label maps.

Every picture is panels side by side under a title strip of ``TITLE_HEIGHT`` pixels, each panel the image upscaled by
an integer ``zoom`` (default :func:`default_zoom`, long side >= 256) with nearest-neighbour label maps, so a label
map panel's pixel ``(y, x)`` is exactly ``palette[label[y // zoom, x // zoom]]``. A legend of the classes present
follows below where names are needed.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "IGNORE_COLOR",
    "LEGEND_ROW_HEIGHT",
    "TITLE_HEIGHT",
    "class_palette",
    "default_zoom",
    "render_classification",
    "render_detection",
    "render_segmentation",
    "to_uint8_image",
]

TITLE_HEIGHT = 18
LEGEND_ROW_HEIGHT = 16
IGNORE_COLOR = (0, 0, 0)
_MIN_DISPLAY = 256


def class_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours, well separated hues (golden-ratio steps), the same for every run."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    colours = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.75) for i, h in enumerate(hues)]
    return (np.array(colours).reshape(-1, 3) * 255).round().astype(np.uint8)


def default_zoom(height: int, width: int) -> int:
    """Integer upscaling so that the long side of a panel is at least 256 pixels."""
    return max(1, math.ceil(_MIN_DISPLAY / max(height, width)))


def to_uint8_image(
    image: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """``(3, H, W)`` float tensor (normalised with ``mean``/``std``, or in [0, 1] when both are None) -> ``(H, W, 3)``
    uint8 array."""
    image = image.detach().float().cpu()
    if mean is not None and std is not None:
        image = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _upscale(image: np.ndarray, zoom: int) -> Image.Image:
    pil = Image.fromarray(image)
    return pil.resize((pil.width * zoom, pil.height * zoom), Image.BICUBIC) if zoom > 1 else pil


def _canvas(panels: list[Image.Image], titles: list[str], extra_height: int = 0) -> tuple[Image.Image, ImageDraw.Draw]:
    width, height = panels[0].size
    canvas = Image.new("RGB", (width * len(panels), TITLE_HEIGHT + height + extra_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        canvas.paste(panel, (i * width, TITLE_HEIGHT))
        draw.text((i * width + 4, 3), title, fill=(0, 0, 0), font=_font())
    return canvas, draw


def _legend_rows(names: list[str], width: int) -> list[list[str]]:
    rows: list[list[str]] = [[]]
    used = 0
    for name in names:
        need = 14 + 7 * len(name) + 10
        if rows[-1] and used + need > width:
            rows.append([])
            used = 0
        rows[-1].append(name)
        used += need
    return rows if rows[0] else []


def _draw_legend(draw: ImageDraw.Draw, top: int, entries: list[tuple[str, tuple[int, int, int]]], width: int) -> None:
    colours = dict(entries)
    for r, row in enumerate(_legend_rows([name for name, _ in entries], width)):
        x, y = 4, top + r * LEGEND_ROW_HEIGHT + 2
        for name in row:
            draw.rectangle([x, y + 1, x + 10, y + 11], fill=colours[name])
            draw.text((x + 14, y), name, fill=(0, 0, 0), font=_font())
            x += 14 + 7 * len(name) + 10


def _name(class_names: Sequence[str] | None, index: int) -> str:
    return class_names[index] if class_names is not None and 0 <= index < len(class_names) else f"class {index}"


def render_segmentation(
    image: np.ndarray,
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor | None,
    class_names: Sequence[str] | None,
    num_classes: int | None = None,
    ignore_index: int = 255,
    zoom: int | None = None,
) -> Image.Image:
    """Image | ground truth | prediction as colour-coded label maps, with a legend of the classes present.

    Args:
        image: ``(H, W, 3)`` uint8 at the label maps' size.
        pred: ``(H, W)`` class indices ``0..K-1``.
        target: ``(H, W)`` class indices, ``ignore_index`` where unlabelled (drawn black); None to leave it out.
        class_names: ``K`` names (index ``i`` is class ``i``), or None.
        num_classes: ``K`` (palette size); default ``len(class_names)`` or the largest label + 1.
        ignore_index: unlabelled value of ``target``.
        zoom: integer upscaling (default :func:`default_zoom`).
    """
    pred = np.asarray(pred, dtype=np.int64)
    maps = [("prediction", pred)]
    if target is not None:
        maps.insert(0, ("ground truth", np.asarray(target, dtype=np.int64)))
    if image.shape[:2] != pred.shape or any(m.shape != pred.shape for _, m in maps):
        raise ValueError(f"image {image.shape[:2]}, target and pred {pred.shape} must have the same height and width")
    valid = [m[(m != ignore_index) & (m >= 0)] for _, m in maps]
    top = max([int(v.max()) for v in valid if v.size] + [0])
    k = num_classes or (len(class_names) if class_names is not None else top + 1)
    palette = np.concatenate([class_palette(max(k, top + 1)), np.array([IGNORE_COLOR], dtype=np.uint8)])
    zoom = zoom or default_zoom(*pred.shape)
    panels = [_upscale(image, zoom)]
    for _, label in maps:
        index = np.where((label == ignore_index) | (label < 0), len(palette) - 1, label)
        panels.append(Image.fromarray(palette[index]).resize(panels[0].size, Image.NEAREST))
    present = sorted(set(np.concatenate(valid).tolist()))
    entries = [(_name(class_names, c), tuple(int(v) for v in palette[c])) for c in present]
    if any(((m == ignore_index) | (m < 0)).any() for _, m in maps):
        entries.append(("unlabelled (ignored)", IGNORE_COLOR))
    legend_height = len(_legend_rows([n for n, _ in entries], panels[0].width * len(panels))) * LEGEND_ROW_HEIGHT
    canvas, draw = _canvas(panels, ["image", *(title for title, _ in maps)], legend_height)
    _draw_legend(draw, TITLE_HEIGHT + panels[0].height, entries, canvas.width)
    return canvas


def _draw_instances(
    panel: Image.Image,
    zoom: int,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None,
    masks: np.ndarray | None,
    class_names: Sequence[str] | None,
    palette: np.ndarray,
) -> Image.Image:
    base = np.asarray(panel, dtype=np.float32)
    if masks is not None:
        for mask, label in zip(masks, labels):
            big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(panel.size, Image.NEAREST)) > 127
            base[big] = 0.5 * base[big] + 0.5 * palette[label]
    panel = Image.fromarray(base.round().astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        colour = tuple(int(v) for v in palette[label])
        x0, y0, x1, y1 = (float(v) * zoom for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = _name(class_names, int(label) - 1) + (f" {scores[i]:.2f}" if scores is not None else "")
        tw = 7 * len(text)
        ty = max(0.0, y0 - 13)
        draw.rectangle([x0, ty, x0 + tw + 4, ty + 13], fill=colour)
        draw.text((x0 + 2, ty), text, fill=(0, 0, 0), font=_font())
    return panel


def _as_numpy(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def render_detection(
    image: np.ndarray,
    pred: dict[str, Any],
    target: dict[str, Any] | None,
    class_names: Sequence[str] | None,
    score_threshold: float = 0.3,
    max_detections: int = 20,
    zoom: int | None = None,
) -> Image.Image:
    """Prediction | ground truth: instance masks tinted, boxes and ``name score`` labels in the class colour.

    Args:
        image: ``(H, W, 3)`` uint8.
        pred: ``boxes`` ``(N, 4)`` xyxy pixels, ``labels`` ``(N,)`` in ``1..K``, ``scores`` ``(N,)``, optional
            ``masks`` ``(N, H, W)`` (probabilities or bool; > 0.5 is the mask), as torchvision detectors return.
        target: ``boxes``, ``labels`` and optional ``masks`` of the ground truth, or None to leave it out.
        class_names: ``K`` names (label ``l`` is ``class_names[l - 1]``), or None.
        score_threshold: detections below it are not drawn.
        max_detections: draw at most this many (highest scores).
        zoom: integer upscaling (default :func:`default_zoom`).
    """
    height, width = image.shape[:2]
    zoom = zoom or default_zoom(height, width)
    k = len(class_names) if class_names is not None else 0
    scores = _as_numpy(pred["scores"]).astype(np.float64)
    keep = np.flatnonzero(scores >= score_threshold)[np.argsort(-scores[scores >= score_threshold])][:max_detections]
    labels = _as_numpy(pred["labels"]).astype(np.int64)
    panels = []
    for data, idx, with_scores in ((pred, keep, True), (target, None, False)):
        if data is None:
            continue
        boxes = _as_numpy(data["boxes"]).reshape(-1, 4)
        lab = labels if data is pred else _as_numpy(data["labels"]).astype(np.int64)
        masks = _as_numpy(data.get("masks"))
        if masks is not None:
            masks = masks.reshape(-1, height, width) > 0.5
        if idx is not None:
            boxes, lab = boxes[idx], lab[idx]
            masks = masks[idx] if masks is not None else None
        palette = class_palette(max([k, *(lab.tolist() or [0])]) + 1)
        panels.append(
            _draw_instances(
                _upscale(image, zoom),
                zoom,
                boxes,
                lab,
                scores[idx] if with_scores else None,
                masks,
                class_names,
                palette,
            )
        )
    titles = [f"prediction (score >= {score_threshold:g})", "ground truth"][: len(panels)]
    canvas, _ = _canvas(panels, titles)
    return canvas


def render_classification(
    images: Sequence[np.ndarray],
    probs: torch.Tensor,
    targets: Sequence[int] | None,
    class_names: Sequence[str] | None,
    zoom: int | None = None,
) -> Image.Image:
    """A row of images, each titled ``predicted (p)`` and, below, ``true: name`` (green if right, red if wrong).

    Args:
        images: ``(H, W, 3)`` uint8 arrays of one size.
        probs: ``(N, K)`` class probabilities.
        targets: true class indices, or None.
        class_names: ``K`` names or None.
        zoom: integer upscaling per tile (default: long side >= 128).
    """
    height, width = images[0].shape[:2]
    zoom = zoom or max(1, math.ceil(128 / max(height, width)))
    panels = [_upscale(np.asarray(image), zoom) for image in images]
    top_p, top_i = probs.detach().float().cpu().max(-1)
    titles = [f"{_name(class_names, int(i))} {float(p):.2f}" for p, i in zip(top_p, top_i)]
    canvas, draw = _canvas(panels, titles, LEGEND_ROW_HEIGHT if targets is not None else 0)
    for n, target in enumerate(targets or []):
        colour = (0, 140, 0) if int(target) == int(top_i[n]) else (200, 0, 0)
        position = (n * panels[0].width + 4, TITLE_HEIGHT + panels[0].height + 2)
        draw.text(position, f"true: {_name(class_names, int(target))}", fill=colour, font=_font())
    return canvas
