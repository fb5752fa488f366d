"""The ablation file: one base config, a grid of overrides, seeds; expanded into one run config per cell and seed.

An ablation file (``configs/demo/ablate.yaml``)::

    base: [configs/demo/classify.yaml]        # run configs merged in order, as repeated --config would
    out_dir: checkpoints/ablate-demo          # every cell is the run directory <out_dir>/<cell>-s<seed>
    seeds: [0, 1]
    param_margin: 0.10                        # flag a cell whose parameters differ from the first cell's by more
    grid:                                     # axes; the cells are their Cartesian product
      stage3:                                 # axis -> level -> {dotted.path: value}
        se:
          model.init_args.backbone_kwargs.block.2: mbconv
          model.init_args.backbone_kwargs.block_kwargs.2: {attn: se}
        bra: {model.init_args.backbone_kwargs.block.2: bra}

A dotted path walks mappings by key and lists by index (``block.2`` is the third stage's block); the value replaces
what is there. An axis may also be a plain list of values of one dotted path (``trainer.max_epochs: [4, 8]``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError

__all__ = ["Ablation", "Cell", "apply_override", "load_ablation"]


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its name, the level of each axis and the dotted overrides that make it."""

    name: str
    levels: dict[str, str]
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Ablation:
    """A parsed ablation file (see the module docstring)."""

    path: Path
    base: dict[str, Any]
    out_dir: Path
    seeds: list[int]
    cells: list[Cell]
    param_margin: float
    args: list[str]

    def cell_config(self, cell: Cell) -> dict[str, Any]:
        """The base config with the cell's overrides applied."""
        config = copy.deepcopy(self.base)
        for path, value in cell.overrides.items():
            apply_override(config, path, value, where=f"{self.path}: grid cell {cell.name}")
        return config


def _merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def apply_override(config: dict[str, Any], path: str, value: Any, where: str = "override") -> None:
    """Set ``config[path]`` for a dotted ``path`` (list items by index); a path that does not exist is an error,
    except a new key of an existing mapping."""
    node: Any = config
    parts = path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{where}: {path!r} indexes a list of {len(node)} items with {part!r}; use 0..{len(node) - 1}"
                )
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
            if not last and key not in node:
                node[key] = {}
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:i])!r} is {node!r}, not a mapping or list, in {path!r}")
        if last:
            node[key] = copy.deepcopy(value)
        else:
            node = node[key]


def _axis_levels(axis: str, levels: Any, where: Path) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(levels, list):
        return [(str(v), {axis: v}) for v in levels]
    if isinstance(levels, dict) and all(isinstance(v, dict) for v in levels.values()):
        return [(str(name), dict(overrides)) for name, overrides in levels.items()]
    raise ConfigError(f"{where}: grid.{axis} must be a list of values or a mapping level -> {{dotted.path: value}}")


def load_ablation(path: str | Path) -> Ablation:
    """Read and check an ablation file; every error is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ablation file {path} does not exist: pass --config with an ablation YAML")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"base", "out_dir", "seeds", "grid", "param_margin", "args"}
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; the fields are base, out_dir, "
                          "seeds, grid, param_margin, args")  # fmt: skip
    bases = spec.get("base")
    bases = [bases] if isinstance(bases, str) else bases
    if not bases:
        raise ConfigError(f"{path}: base is missing: name the run config(s) every cell starts from")
    base: dict[str, Any] = {}
    for name in bases:
        file = Path(name)
        if not file.is_file():
            raise ConfigError(f"{path}: base config {file} does not exist")
        _merge(base, yaml.safe_load(file.read_text()) or {})
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid is missing or empty: give at least one axis")
    axes = [(axis, _axis_levels(axis, levels, path)) for axis, levels in grid.items()]
    cells = []
    for combo in itertools.product(*(levels for _, levels in axes)):
        names = [name for name, _ in combo]
        overrides: dict[str, Any] = {}
        for _, level_overrides in combo:
            overrides.update(level_overrides)
        levels = {axis: name for (axis, _), name in zip(axes, names)}
        cells.append(Cell("-".join(names).replace("/", "_"), levels, overrides))
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers")
    args = [str(a) for a in spec.get("args") or []]
    return Ablation(
        path=path,
        base=base,
        out_dir=Path(spec.get("out_dir") or f"checkpoints/ablate-{path.stem}"),
        seeds=seeds,
        cells=cells,
        param_margin=float(spec.get("param_margin", 0.10)),
        args=args,
    )
