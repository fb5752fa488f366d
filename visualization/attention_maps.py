"""Attention pictures: run a model once on an image under :class:`AttentionCapture` and write one PNG per view.

Views (files in ``out_dir``):

* ``coordinate_attention.png``: per coordinate-attention block, the H gate ``(H x C)``, the W gate ``(C x W)`` and
  the channel-mean of their product ``a_h * a_w`` over the image (arXiv 2103.02907);
* ``routing_<block>.png``: bi-level routing (arXiv 2303.08810), the image with the key regions the query region
  routes to tinted orange, the rest dimmed, the query region outlined in cyan (pixel-exact, drawn with PIL);
* ``token_attention_<block>.png``: the token attention of the query inside its routed regions, mean and per head;
* ``window_attention_<block>.png`` / ``channel_groups_<block>.png``: DaViT (arXiv 2204.03645) spatial window
  attention of the query token and the channel-group attention matrices;
* ``channel_weights.png``: SE / ECA channel weights as bar charts (arXiv 1709.01507, 1910.03151).

The query is a pixel ``(x, y)`` of the image as the model sees it (default: the centre); the token it falls in is
``(y * H // image_height, x * W // image_width)`` on each block's ``H x W`` map, and the pictures mark the centre of
that token (cyan). Token maps are drawn over the image as blocks of ``image_size / map_size`` pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw
from torch import nn

from .capture import (
    AttentionCapture,
    ChannelGroupRecord,
    ChannelWeightsRecord,
    CoordinateGatesRecord,
    RoutingRecord,
    WindowRecord,
)

__all__ = [
    "ATTENTION_VIEWS",
    "ROUTED_COLOR",
    "ROUTING_CAPTION_HEIGHT",
    "image_to_tensor",
    "render_attention_maps",
    "render_routing",
    "routing_zoom",
    "token_of_pixel",
]

ATTENTION_VIEWS = ("coordinate", "channel_weights", "routing", "token", "window", "channel_groups")
ROUTED_COLOR = (255, 140, 0)
QUERY_COLOR = (0, 220, 255)
ROUTING_CAPTION_HEIGHT = 20
_DIM = 0.35  # NOTE: unrouted pixels keep 35 % of their brightness, so a routed pixel has R >= 140 and they never do
_TINT = 0.55
_MIN_DISPLAY = 256


def image_to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> normalised ``(1, 3, H, W)`` float tensor."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return ((array - mean_t) / std_t).unsqueeze(0)


def token_of_pixel(x: float, y: float, image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[int, int]:
    """Token ``(row, col)`` of a ``map_size`` map under pixel ``(x, y)`` of an image of ``image_size = (H, W)``."""
    (ih, iw), (h, w) = image_size, map_size
    return min(int(y) * h // ih, h - 1), min(int(x) * w // iw, w - 1)


def _token_centre(row: int, col: int, image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[float, float]:
    """Pixel ``(x, y)`` at the centre of token ``(row, col)``."""
    return (col + 0.5) * image_size[1] / map_size[1], (row + 0.5) * image_size[0] / map_size[0]


def _pixel_to_token(n_pixels: int, n_tokens: int) -> np.ndarray:
    return np.minimum(np.arange(n_pixels) * n_tokens // n_pixels, n_tokens - 1)


def routing_zoom(image_size: tuple[int, int]) -> int:
    """Integer upscaling of the routing picture so that its long side is at least 256 pixels."""
    return max(1, math.ceil(_MIN_DISPLAY / max(image_size)))


def _spread(records: list, count: int) -> list:
    """At most ``count`` records, evenly spaced over the model's depth (first and last included)."""
    if len(records) <= count:
        return records
    return [records[i] for i in np.linspace(0, len(records) - 1, count).round().astype(int)]


def _short(name: str) -> str:
    return name.replace(".", "_")


def _stage(name: str) -> str:
    parts = name.split(".")
    return f"stage {int(parts[parts.index('stages') + 1]) + 1}" if "stages" in parts else name


# ----- bi-level routing -----
def render_routing(record: RoutingRecord, image: Image.Image, query: tuple[float, float], path: Path) -> Path:
    """The image with the query region's routed key regions tinted, the others dimmed, the query region outlined.

    Pixel-exact: the picture is the image upscaled by :func:`routing_zoom` below a caption strip of
    ``ROUTING_CAPTION_HEIGHT`` pixels; a pixel is tinted exactly when the token under it lies in a routed region.
    """
    zoom = routing_zoom((image.height, image.width))
    width, height = image.width * zoom, image.height * zoom
    base = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
    row, col = token_of_pixel(*query, (image.height, image.width), record.size)
    region = record.region_of(row, col)
    routed = record.routed_regions(region)
    rows = _pixel_to_token(height, record.size[0])
    cols = _pixel_to_token(width, record.size[1])
    mask = record.region_mask(routed).cpu().numpy()[rows][:, cols]
    out = np.where(mask[..., None], (1 - _TINT) * base + _TINT * np.array(ROUTED_COLOR), _DIM * base)
    picture = Image.new("RGB", (width, height + ROUTING_CAPTION_HEIGHT), (255, 255, 255))
    picture.paste(Image.fromarray(out.round().clip(0, 255).astype(np.uint8)), (0, ROUTING_CAPTION_HEIGHT))
    draw = ImageDraw.Draw(picture)
    query_mask = record.region_mask([region]).cpu().numpy()[rows][:, cols]
    ys, xs = np.nonzero(query_mask)
    top = ROUTING_CAPTION_HEIGHT
    draw.rectangle([xs.min(), ys.min() + top, xs.max(), ys.max() + top], outline=QUERY_COLOR, width=2)
    cx, cy = _token_centre(row, col, (image.height, image.width), record.size)
    qx, qy = int(cx * zoom), int(cy * zoom) + top
    draw.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=QUERY_COLOR)
    _, _, nh, nw = record.grid
    caption = f"{_stage(record.name)} routing: region {region} -> top-{len(routed)} of {nh * nw}"
    draw.text((4, 4), caption, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def _overlay(ax: Axes, image: Image.Image, heat: np.ndarray, title: str, cmap: str = "inferno") -> AxesImage:
    ax.imshow(image)
    shown = ax.imshow(heat, cmap=cmap, alpha=0.6, extent=(0, image.width, image.height, 0), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return shown


def _outline(ax: Axes, image: Image.Image, map_size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Outline map cells ``(top, left, bottom, right)`` on the image."""
    sy, sx = image.height / map_size[0], image.width / map_size[1]
    top, left, bottom, right = box
    ax.add_patch(
        Rectangle((left * sx, top * sy), (right - left) * sx, (bottom - top) * sy, fill=False, ec="cyan", lw=1.2)
    )


def render_token_attention(record: RoutingRecord, image: Image.Image, query: tuple[float, float], path: Path) -> Path:
    """Token attention of the query token over its routed regions: head mean on the image, then each head."""
    row, col = token_of_pixel(*query, (image.height, image.width), record.size)
    attn = record.token_attention(row, col).cpu().numpy()
    heads = min(attn.shape[0], 4)
    fig = Figure(figsize=(2.4 * (heads + 1), 2.7))
    axes = fig.subplots(1, heads + 1, squeeze=False)
    _overlay(axes[0, 0], image, attn.mean(0), f"{_stage(record.name)} BRA: query token, head mean")
    for h in range(heads):
        _overlay(axes[0, h + 1], image, attn[h], f"head {h}")
    rh, rw, _, nw = record.grid
    for ax in axes[0]:
        ax.plot(*_token_centre(row, col, (image.height, image.width), record.size), "c*", markersize=9)
        for r in record.routed_regions(record.region_of(row, col)):
            top, left = (r // nw) * rh, (r % nw) * rw
            _outline(ax, image, record.size, (top, left, min(top + rh, record.size[0]), min(left + rw, record.size[1])))
    return _save(fig, path)


# ----- DaViT -----
def render_window_attention(record: WindowRecord, image: Image.Image, query: tuple[float, float], path: Path) -> Path:
    """Spatial window attention of the query token: head mean on the image (window outlined), then each head."""
    row, col = token_of_pixel(*query, (image.height, image.width), record.size)
    attn = record.token_attention(row, col).cpu().numpy()
    top, left, bottom, right = record.window_bounds(row, col)
    heads = min(attn.shape[0], 4)
    fig = Figure(figsize=(2.4 * (heads + 1), 2.7))
    axes = fig.subplots(1, heads + 1, squeeze=False)
    _overlay(axes[0, 0], image, attn.mean(0), f"{_stage(record.name)} window attn, head mean")
    for h in range(heads):
        _overlay(axes[0, h + 1], image, attn[h], f"head {h}")
    for ax in axes[0]:
        ax.plot(*_token_centre(row, col, (image.height, image.width), record.size), "c*", markersize=9)
        _outline(ax, image, record.size, (top, left, bottom, right))
    return _save(fig, path)


def render_channel_groups(record: ChannelGroupRecord, path: Path) -> Path:
    """Each group's ``d x d`` matrix ``A``: output channel ``i`` of a group is ``sum_j A[i, j] q_j`` (rows sum to 1)."""
    attn = record.attn.cpu().numpy()
    groups = attn.shape[0]
    cols = min(groups, 4)
    rows = -(-groups // cols)
    fig = Figure(figsize=(2.3 * cols, 2.5 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for g, ax in enumerate(axes.flat):
        ax.axis("off")
        if g < groups:
            ax.imshow(attn[g], cmap="viridis", vmin=0, interpolation="nearest")
            ax.set_title(f"group {g}", fontsize=8)
    title = f"{_stage(record.name)} channel-group attention, {attn.shape[1]} channels per group"
    note = "row i: weights with which output channel i mixes the group's channels; colour 0 to each group's max"
    fig.suptitle(f"{title}\n({note})", fontsize=8)
    return _save(fig, path)


# ----- coordinate attention, SE / ECA -----
def render_coordinate_gates(
    records: list[CoordinateGatesRecord], image: Image.Image, path: Path, max_blocks: int = 8
) -> Path:
    """One row per block (at most ``max_blocks``, spread over the depth): H gate (rows x channels), W gate
    (channels x columns), channel-mean product on the image."""
    records = _spread(records, max_blocks)
    fig = Figure(figsize=(8.4, 2.6 * len(records)))
    axes = fig.subplots(len(records), 3, squeeze=False)
    for record, (ax_h, ax_w, ax_p) in zip(records, axes):
        h_gate, w_gate = record.h_gate.float().cpu().numpy(), record.w_gate.float().cpu().numpy()
        C, H, W = h_gate.shape[0], h_gate.shape[1], w_gate.shape[1]
        ax_h.imshow(h_gate.T, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax_h.set(title=f"{_stage(record.name)}: H gate a_h", xlabel=f"channel ({C})", ylabel=f"row ({H})")
        im = ax_w.imshow(w_gate, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax_w.set(title="W gate a_w", xlabel=f"column ({W})", ylabel="channel")
        fig.colorbar(im, ax=ax_w, fraction=0.046)
        product = _overlay(ax_p, image, record.product().float().mean(0).cpu().numpy(), "channel mean of a_h * a_w")
        fig.colorbar(product, ax=ax_p, fraction=0.046).ax.tick_params(labelsize=6)
        for ax in (ax_h, ax_w):
            ax.title.set_fontsize(8)
            ax.xaxis.label.set_fontsize(7)
            ax.yaxis.label.set_fontsize(7)
            ax.tick_params(labelsize=6)
    return _save(fig, path)


def render_channel_weights(records: list[ChannelWeightsRecord], path: Path, max_blocks: int = 16) -> Path:
    """One bar chart of the channel weights per SE / ECA module (at most ``max_blocks``, spread over the depth)."""
    records = _spread(records, max_blocks)
    fig = Figure(figsize=(7.0, 1.3 * len(records) + 0.3))
    axes = fig.subplots(len(records), 1, squeeze=False)
    for record, ax in zip(records, axes[:, 0]):
        weights = record.weights.float().cpu().numpy()
        ax.bar(np.arange(len(weights)), weights, width=1.0, color="tab:blue")
        ax.set_xlim(-0.5, len(weights) - 0.5)
        ax.set_ylim(0, 1)
        ax.set_title(f"{record.name} ({record.kind.upper()}, {len(weights)} channels)", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel("channel", fontsize=7)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def render_attention_maps(
    model: nn.Module,
    image: Image.Image,
    out_dir: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    query: tuple[float, float] | None = None,
    views: Sequence[str] | None = None,
) -> list[Path]:
    """Run ``model`` on ``image`` (already at the size to show) with capture on and write every view it supports.

    Args:
        model: any module; the views written are those of the blocks it contains (an empty list if none).
        image: RGB image as the model should see it (resize it first).
        out_dir: folder for the PNGs (created).
        mean: normalisation mean of the model's input.
        std: normalisation std.
        query: pixel ``(x, y)`` of the query token/region; default the image centre.
        views: the views to draw (names in ``ATTENTION_VIEWS``); default all.

    Returns:
        The written files.
    """
    views = set(ATTENTION_VIEWS if views is None else views)
    if views - set(ATTENTION_VIEWS):
        raise ValueError(f"views={sorted(views - set(ATTENTION_VIEWS))} are unknown: choose from {ATTENTION_VIEWS}")
    image = image.convert("RGB")
    if query is None:
        query = (image.width / 2, image.height / 2)
    if not (0 <= query[0] < image.width and 0 <= query[1] < image.height):
        raise ValueError(f"query={query} lies outside the {image.width}x{image.height} image; pass a pixel inside it")
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), AttentionCapture(model) as capture:
            model(image_to_tensor(image, mean, std).to(device))
    finally:
        model.train(was_training)
    written = []
    gates = capture.of_type(CoordinateGatesRecord)
    if gates and "coordinate" in views:
        written.append(render_coordinate_gates(gates, image, out_dir / "coordinate_attention.png"))
    weights = capture.of_type(ChannelWeightsRecord)
    if weights and "channel_weights" in views:
        written.append(render_channel_weights(weights, out_dir / "channel_weights.png"))
    for record in capture.of_type(RoutingRecord):
        name = _short(record.name)
        if "routing" in views:
            written.append(render_routing(record, image, query, out_dir / f"routing_{name}.png"))
        if "token" in views:
            written.append(render_token_attention(record, image, query, out_dir / f"token_attention_{name}.png"))
    for record in capture.of_type(WindowRecord) if "window" in views else []:
        written.append(
            render_window_attention(record, image, query, out_dir / f"window_attention_{_short(record.name)}.png")
        )
    for record in capture.of_type(ChannelGroupRecord) if "channel_groups" in views else []:
        written.append(render_channel_groups(record, out_dir / f"channel_groups_{_short(record.name)}.png"))
    return written
