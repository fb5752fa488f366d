"""See what the model sees: attention pictures of a model on an image, and the training curves of a run.

Usage::

    # attention maps of a trained run (its model.safetensors) or of any registered model (random or given weights)
    python scripts/visualize.py attention --run checkpoints/NAME --image PATH [--size 224] [--query X,Y] --out DIR
    python scripts/visualize.py attention --model strata_hybrid_pico [--weights FILE] [--model-kwargs topk=4] \\
        --image PATH [--size 224] [--query X,Y] --out DIR

    # <run>/curves.png from <run>/metrics.csv
    python scripts/visualize.py curves --run checkpoints/NAME

``--size`` resizes the image (``N`` or ``HxW``; default the model's input size); ``--query X,Y`` is a pixel of the
resized image (default its centre): the token whose routing, token attention and window attention are drawn.
``--views routing,window`` draws only those views (default all: coordinate, channel_weights, routing, token,
window, channel_groups).
Prediction overlays come from ``train.py predict`` (``<run>/predictions/overlays/``) and from validation when the
``ValidationOverlays`` callback is on (``<run>/visualizations/``).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--size {text!r}: give N or HxW with positive integers, e.g. 224 or 256x320")
    return (int(parts[0]), int(parts[-1]))


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--query {text!r}: give a pixel as X,Y, e.g. 112,80") from None
    return x, y


def _kwargs(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--model-kwargs {item!r}: give key=value, e.g. topk=4")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_model(run: str | None, model: str | None, weights: str | None, kwargs: dict[str, Any]) -> Any:
    """The run's exported model (``local-dir:<run>`` plus its ``backbone_kwargs``) or a registered model."""
    import timm
    import yaml

    import backbones  # noqa: F401  (registers the project's models)
    from tasks.backbone import create_backbone

    if run is not None:
        run_dir = Path(run)
        if not (run_dir / "config.json").is_file():
            raise ValueError(f"--run {run}: no config.json (a run writes it when fit ends); pass --model and --weights")
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        init = (config.get("model") or {}).get("init_args") or {}
        kwargs = {**(init.get("backbone_kwargs") or {}), **kwargs}
        return timm.create_model(f"local-dir:{run_dir.resolve()}", pretrained=True, **kwargs)
    if weights is not None:
        # NOTE: num_classes=0 drops any classifier, so weights of any head size (or none) load
        return create_backbone(model, pretrained_file=weights, num_classes=0, **kwargs)
    return create_backbone(model, **kwargs)


def attention(args: argparse.Namespace) -> list[Path]:
    from PIL import Image

    from visualization.attention_maps import image_to_tensor, render_attention_maps

    if (args.run is None) == (args.model is None):
        raise ValueError("give exactly one of --run DIR and --model NAME")
    if args.weights is not None and args.run is not None:
        raise ValueError("--weights goes with --model; a --run uses its own model.safetensors")
    for flag, path in (("--image", args.image), ("--weights", args.weights)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path} is not a file; pass an existing path")
    model = load_model(args.run, args.model, args.weights, _kwargs(args.model_kwargs)).eval()
    cfg = model.pretrained_cfg
    size = args.size or tuple(cfg.get("input_size", (3, 224, 224))[1:])
    image = Image.open(args.image).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    views = args.views.split(",") if args.views else None
    written = render_attention_maps(model, image, args.out, cfg["mean"], cfg["std"], query=args.query, views=views)
    names = cfg.get("label_names")
    if getattr(model, "num_classes", 0) and names:
        import torch

        with torch.no_grad():
            probs = model(image_to_tensor(image, cfg["mean"], cfg["std"])).softmax(-1)[0]
        print(f"predicted: {names[int(probs.argmax())]} ({float(probs.max()):.2f})")
    for path in written:
        print(path)
    if not written:
        print("the model has no block whose attention can be drawn (CA, SE, ECA, BRA, DaViT)")
    return written


def curves(args: argparse.Namespace) -> Path | None:
    from visualization.curves import plot_training_curves

    path = plot_training_curves(args.run)
    print(path if path is not None else f"{args.run}: no metrics.csv with metrics yet")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    att = sub.add_parser("attention", help="attention pictures of a model on an image")
    att.add_argument("--run", help="run directory (uses its model.safetensors and config)")
    att.add_argument("--model", help="registered model name (the project's or timm's)")
    att.add_argument("--weights", help="weights file for --model (.safetensors / .pth)")
    att.add_argument("--model-kwargs", nargs="*", default=[], help="extra timm.create_model kwargs, key=value")
    att.add_argument("--image", required=True, help="input image")
    att.add_argument("--size", type=_size, help="resize to N or HxW (default: the model's input size)")
    att.add_argument("--query", type=_point, help="query pixel X,Y of the resized image (default: the centre)")
    att.add_argument("--out", required=True, help="output folder")
    att.add_argument(
        "--views", help="comma-separated subset of coordinate,channel_weights,routing,token,window,channel_groups"
    )
    cur = sub.add_parser("curves", help="<run>/curves.png from <run>/metrics.csv")
    cur.add_argument("--run", required=True, help="run directory")
    args = parser.parse_args(argv)
    try:
        attention(args) if args.command == "attention" else curves(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
