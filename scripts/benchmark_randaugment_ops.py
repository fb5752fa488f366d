"""RandAugment op by op: timm's PIL ops against OpenCV/numpy versions of the same ops, and the policy's share of a
training sample, in one process on one core (torch and OpenCV limited to one thread).

Ops: the ``rand-m9-mstd0.5-inc1`` set (DeiT) of the project's pipeline, at magnitude 9, positive sign, on a real photo
(``skimage.data.astronaut`` resized to 224x224, PIL bicubic). The OpenCV versions exist only here, to measure the
alternative: ``warpAffine`` (inverse map, bicubic, constant fill) for rotate/shear/translate, lookup tables
(``cv2.LUT``) for autocontrast/invert/posterize/solarize/brightness/equalize (per-channel histogram, PIL's formula),
``addWeighted`` for colour/contrast/sharpness (``filter2D`` with PIL's SMOOTH kernel). ``mean_abs_diff`` (0-255
scale) against the PIL output says how close each is: the resampling kernels and roundings differ, not the op.
Times interleave PIL and OpenCV per op; each figure is the median over ``--repeats`` of the mean of ``--inner`` calls.

Policy share: ``--samples`` seeded samples of the DeiT train pipeline (``build_train_transform(224, ...)``) on an
ImageNet-sized JPEG (the photo ``coffee`` at 500x375, quality 90), each stage timed: decode, array to PIL, the seeded
random scope, crop+flip, RandAugment, to-tensor+normalise, random erasing. Stage costs are means per image (the
policy applies 0, 1 or 2 ops, so its median understates it). The expected OpenCV policy cost is
``n * p / 15 * sum(cv2 op times)`` (``n = 2`` slots, ``p = 0.5``), the same formula as for PIL.

Usage::

    python scripts/benchmark_randaugment_ops.py [--repeats 30] [--inner 20] [--samples 300] [--out-dir docs/benchmarks]
"""

from __future__ import annotations

import argparse
import io
import random
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch
from benchmark_common import machine_description, markdown_table, timer, write_csv
from PIL import Image

from datamodules.classification_transforms import build_train_transform
from datamodules.image_folder import decode_rgb
from datamodules.loaders import sample_seed

SPEC = "rand-m9-mstd0.5-inc1"
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13


def _lut(img: np.ndarray, table: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return cv2.LUT(img, np.clip(table(np.arange(256, dtype=np.float64)), 0, 255).astype(np.uint8))


def _warp(img: np.ndarray, matrix: Sequence[float], fill: tuple[int, ...]) -> np.ndarray:
    # NOTE: PIL's affine maps output pixel centres (x + 0.5) to input ones; OpenCV's centres are integers
    a, b, c, d, e, f = matrix
    m = np.array([[a, b, c + 0.5 * (a + b - 1)], [d, e, f + 0.5 * (d + e - 1)]], np.float64)
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(img, m, img.shape[1::-1], flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def _channel_luts(img: np.ndarray, table: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``cv2.LUT`` with one table per channel; ``table(channel)`` builds it from that channel (a 2-D view)."""
    tables = [np.clip(table(channel), 0, 255).astype(np.uint8) for channel in cv2.split(img)]
    return cv2.LUT(img, np.stack(tables, axis=1).reshape(256, 1, 3))


def _autocontrast_table(channel: np.ndarray) -> np.ndarray:
    lo, hi = cv2.minMaxLoc(channel)[:2]
    i = np.arange(256, dtype=np.float64)
    if hi <= lo:
        return i
    scale = 255.0 / (hi - lo)
    return np.floor(i * scale - lo * scale)


def _equalize_table(channel: np.ndarray) -> np.ndarray:
    hist = cv2.calcHist([channel], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    nonzero = hist[hist > 0]
    step = (hist.sum() - nonzero[-1]) // 255 if len(nonzero) else 0
    if step == 0:
        return np.arange(256)
    return (np.concatenate([[0], np.cumsum(hist)[:-1]]) + step // 2) // step


def _blend(img: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
    return cv2.addWeighted(img, factor, degenerate, 1.0 - factor, 0.0)


def _sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    smooth = cv2.filter2D(img, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]  # PIL keeps the border
    return _blend(img, smooth, factor)


def cv2_op(name: str, img: np.ndarray, args: tuple, fill: tuple[int, ...]) -> np.ndarray:
    """The OpenCV/numpy version of timm's op ``name`` with timm's level arguments ``args``."""
    h, w = img.shape[:2]
    if name == "AutoContrast":
        return _channel_luts(img, _autocontrast_table)
    if name == "Equalize":
        return _channel_luts(img, _equalize_table)
    if name == "Invert":
        return cv2.bitwise_not(img)
    if name == "Rotate":
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), args[0], 1.0)
        return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC, borderValue=fill)
    if name.startswith("Posterize"):
        return _lut(img, lambda i: i.astype(np.int64) & ~(2 ** (8 - args[0]) - 1))
    if name.startswith("SolarizeAdd"):
        return _lut(img, lambda i: np.where(i < 128, np.minimum(255, i + args[0]), i))
    if name.startswith("Solarize"):
        return _lut(img, lambda i: np.where(i < args[0], i, 255 - i))
    if name.startswith("Brightness"):
        return _lut(img, lambda i: np.round(i * args[0]))
    if name.startswith("Color"):
        return _blend(img, cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB), args[0])
    if name.startswith("Contrast"):
        mean = int(cv2.mean(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))[0] + 0.5)
        return cv2.addWeighted(img, args[0], img, 0.0, (1.0 - args[0]) * mean)
    if name.startswith("Sharpness"):
        return _sharpness(img, args[0])
    matrix = {
        "ShearX": lambda f: (1, f, 0, 0, 1, 0),
        "ShearY": lambda f: (1, 0, 0, f, 1, 0),
        "TranslateXRel": lambda p: (1, 0, p * w, 0, 1, 0),
        "TranslateYRel": lambda p: (1, 0, 0, 0, 1, p * h),
    }[name](args[0])
    return _warp(img, matrix, fill)


def _median_call(fn: Callable[[], object], clock: Callable[[], float], inner: int) -> float:
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / inner


def time_ops(repeats: int, inner: int) -> list[dict[str, object]]:
    tf = build_train_transform(224, rand_augment=SPEC, interpolation="bicubic")
    pil = Image.fromarray(skimage.data.astronaut()).resize((224, 224), Image.Resampling.BICUBIC)
    arr = np.asarray(pil).copy()
    clock, _ = timer("cpu")
    rows = []
    for op in tf.rand_augment.ops:
        positive = next(s for s in range(100) if random.Random(s).random() <= 0.5)  # NOTE: timm negates if > 0.5
        random.seed(positive)
        args = op.level_fn(9, op.hparams) if op.level_fn is not None else ()
        fill = op.kwargs["fillcolor"]
        ref = np.asarray(op.aug_fn(pil, *args, **op.kwargs)).astype(np.int16)
        diff = np.abs(cv2_op(op.name, arr, args, fill).astype(np.int16) - ref)
        pil_t, cv2_t = [], []
        for _ in range(repeats):
            pil_t.append(_median_call(lambda op=op, args=args: op.aug_fn(pil, *args, **op.kwargs), clock, inner))
            cv2_t.append(
                _median_call(lambda op=op, args=args, fill=fill: cv2_op(op.name, arr, args, fill), clock, inner)
            )
        row: dict[str, object] = dict(op=op.name, args=", ".join(f"{a:.3g}" for a in args) or "-")
        row["pil_ms"], row["cv2_ms"] = 1e3 * statistics.median(pil_t), 1e3 * statistics.median(cv2_t)
        row["pil_over_cv2"] = row["pil_ms"] / row["cv2_ms"]
        row["mean_abs_diff"], row["max_abs_diff"] = float(diff.mean()), int(diff.max())
        rows.append(row)
        print(row, flush=True)
    return rows


def _jpeg(folder: Path) -> Path:
    path = folder / "coffee_500x375.jpg"
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).resize((500, 375), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


def time_stages(samples: int, folder: Path) -> dict[str, float]:
    """Mean ms per image of each stage of the seeded DeiT pipeline (decode included)."""
    tf = build_train_transform(224, rand_augment=SPEC, random_erasing=0.25, interpolation="bicubic")
    crop, flip, policy, to_tensor, normalize, erasing = tf.transform.transforms
    path, clock = str(_jpeg(folder)), timer("cpu")[0]
    spent = dict.fromkeys(
        ["decode", "to_pil", "seeded_scope", "crop_flip", "randaugment", "tensor_norm", "erasing"], 0.0
    )
    for index in range(samples):
        t = [clock()]
        image = decode_rgb(path)
        t.append(clock())
        pil = Image.fromarray(image)
        t.append(clock())
        tf.set_random_seed(sample_seed(0, 0, index))
        with tf.random_streams():
            t.append(clock())
            pil = flip(crop(pil))
            t.append(clock())
            pil = policy(pil)
            t.append(clock())
            x = normalize(to_tensor(pil))
            t.append(clock())
            erasing(x)
            t.append(clock())
        t.append(clock())
        d = np.diff(t)
        for key, value in zip(spent, [d[0], d[1], d[2] + d[7], d[3], d[4], d[5], d[6]]):
            spent[key] += value
    return {key: 1e3 * value / samples for key, value in spent.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--inner", type=int, default=20, help="calls per timed repeat")
    parser.add_argument("--samples", type=int, default=300, help="seeded pipeline samples for the stage costs")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    rows = time_ops(args.repeats, args.inner)
    with tempfile.TemporaryDirectory() as folder:
        stages = time_stages(args.samples, Path(folder))
    expected = {k: 2 * 0.5 / len(rows) * sum(r[f"{k}_ms"] for r in rows) for k in ("pil", "cv2")}  # type: ignore[misc]
    total = sum(stages.values())
    summary = [
        dict(stage=name, ms=ms, share=ms / total) for name, ms in stages.items()
    ] + [
        dict(stage="whole sample (sum)", ms=total, share=1.0),
        dict(stage="policy expected, PIL ops", ms=expected["pil"], share=expected["pil"] / total),
        dict(stage="policy expected, cv2 ops", ms=expected["cv2"], share=expected["cv2"] / total),
    ]  # fmt: skip
    op_columns = [
        ("op", "{}"), ("args", "{}"), ("pil_ms", "{:.3f}"), ("cv2_ms", "{:.3f}"), ("pil_over_cv2", "{:.2f}"),
        ("mean_abs_diff", "{:.2f}"), ("max_abs_diff", "{}"),
    ]  # fmt: skip
    stage_columns = [("stage", "{}"), ("ms", "{:.3f}"), ("share", "{:.3f}")]
    out = Path(args.out_dir)
    write_csv(out / "randaugment_ops.csv", rows, [k for k, _ in op_columns])
    write_csv(out / "randaugment_stages.csv", summary, [k for k, _ in stage_columns])
    machine = machine_description("cpu")
    command = " ".join(["python scripts/benchmark_randaugment_ops.py", *map(shlex.quote, argv or sys.argv[1:])])
    text = (
        f"Machine: {', '.join(f'{k} {v}' for k, v in machine.items())}.\n\nCommand: `{command}`\n\n"
        f"Ops at magnitude 9 on 224x224 (median of {args.repeats} x {args.inner} calls):\n\n"
        + markdown_table(rows, op_columns)
        + f"\nDeiT training sample, 500x375 JPEG -> 224 (mean over {args.samples} seeded samples):\n\n"
        + markdown_table(summary, stage_columns)
    )
    (out / "randaugment_ops.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
