"""String-keyed registry of the attention blocks, with the block contract and the ``strata.blocks`` plugin group.

The block contract (docs/blocks.md tells it in full):

* ``create_block(key, dim, **kwargs)`` calls the registered constructor with the channel count ``dim`` as its first
  positional argument (timm's ``create_attn`` convention) and the keyword arguments of the config; the backbone adds
  ``drop_path=rate`` when the stage's stochastic depth rate is above 0, so a block used in a stage takes
  ``drop_path``.
* The block maps ``(B, dim, H, W) -> (B, dim, H, W)`` for any ``H, W >= 1`` (it may return a channels-last tensor).
* A block declares its keyword arguments by its signature. A constructor that forwards ``**kwargs`` names the
  callables it forwards them to with ``register_block(..., accepts=(Target, ...))``; their named parameters count
  as the block's, so a config is checked before anything is built (``check_block_kwargs``). ``check=fn`` adds a
  block's own constraint: ``fn(dim, kwargs) -> message or None``.
* ``kind`` is ``"block"`` for a residual token mixer (a stage's block: ``mbconv``, ``bra``, ``dual``, ...) or
  ``"attention"`` for a gate ``y = x * a(x)`` plugged into another block (``se``, ``eca``, ``ca``: ``mbconv``'s
  ``attn``, the ``attn_layer`` of timm's ResNet and EfficientNet builders).
* MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (``core.model_cost.count_macs``). A block whose
  fast kernel multiplies more than its algorithm needs, or hides a product from the counter, defines
  ``mac_counting(self) -> contextlib.AbstractContextManager`` that switches it to a kernel whose FLOPs are the
  algorithm's while the count runs.

Plugins: a separately installed package declares an entry point in the group ``strata.blocks`` whose object is a
module (importing it registers its blocks) or a callable taking no arguments (called once); the registry loads
every plugin the first time it is asked for a block, so plugin blocks appear in ``list_blocks()``, in YAML and in
the ablation command with no change to Strata.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from torch import nn

__all__ = [
    "PLUGIN_GROUP",
    "BlockPluginError",
    "BlockSpec",
    "block_spec",
    "check_block_kwargs",
    "closest_blocks",
    "create_block",
    "list_blocks",
    "register_block",
]

PLUGIN_GROUP = "strata.blocks"
BLOCK_KINDS = ("block", "attention")

BlockCheck = Callable[[int, dict[str, Any]], str | None]


class BlockPluginError(ImportError):
    """A package registered in the ``strata.blocks`` entry-point group failed to load."""


@dataclass(frozen=True)
class BlockSpec:
    """A registered block: its key, constructor, kind, the callables its ``**kwargs`` reach and its own check."""

    name: str
    build: Callable[..., nn.Module]
    kind: str = "block"
    accepts: tuple[Callable[..., Any], ...] = ()
    check: BlockCheck | None = None
    source: str = field(default="strata")

    def parameters(self) -> dict[str, inspect.Parameter] | None:
        """The keyword arguments the block takes (``dim`` excluded), or None when they cannot be known."""
        return _keyword_parameters(self.build, self.accepts)


_BLOCKS: dict[str, BlockSpec] = {}
_plugins_loaded = False
_loading_plugin: str | None = None


def _keyword_parameters(
    fn: Callable[..., Any], accepts: Iterable[Callable[..., Any]]
) -> dict[str, inspect.Parameter] | None:
    params = list(inspect.signature(fn).parameters.values())  # NOTE: a class's signature has no self
    named = {p.name: p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return named
    accepts = tuple(accepts)
    if not accepts:
        return None
    for target in accepts:
        inner = _keyword_parameters(target, ())
        if inner is None:
            return None
        for name, param in inner.items():
            named.setdefault(name, param)
    return named


def register_block(
    name: str,
    *,
    kind: str = "block",
    accepts: Iterable[Callable[..., Any]] = (),
    check: BlockCheck | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a block class (or constructor) under a short lowercase key; see the module docstring."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {BLOCK_KINDS}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BLOCKS:
            raise ValueError(f"block {name!r} is already registered by {_BLOCKS[name].build!r}")
        source = _loading_plugin or "strata"
        _BLOCKS[name] = BlockSpec(name, fn, kind, tuple(accepts), check, source)
        return fn

    return wrap


def _load_plugins() -> None:
    """Import every ``strata.blocks`` entry point once; a failing plugin is a one-line ``BlockPluginError``."""
    global _plugins_loaded, _loading_plugin
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=PLUGIN_GROUP):
        package = point.dist.name if point.dist is not None else point.value
        _loading_plugin = package
        try:
            loaded = point.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()
        except Exception as error:  # NOTE: any failure of third-party code, reported with its package
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BlockPluginError(
                f"block plugin {point.name!r} ({package}, entry point {point.value}) failed to load: {message}; "
                f"fix or uninstall {package}"
            ) from None
        finally:
            _loading_plugin = None


def list_blocks(kind: str | None = None) -> list[str]:
    """The registered block keys (plugins included), sorted; ``kind`` keeps one kind ('block' or 'attention')."""
    _load_plugins()
    return sorted(k for k, spec in _BLOCKS.items() if kind is None or spec.kind == kind)


def closest_blocks(name: str, n: int = 3) -> list[str]:
    """The registered keys closest to ``name``."""
    return difflib.get_close_matches(name, list_blocks(), n=n, cutoff=0.3)


def _unknown_block(name: str) -> ValueError:
    close = closest_blocks(name)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"unknown block {name!r}.{hint} Registered blocks: {', '.join(list_blocks())}")


def block_spec(name: str) -> BlockSpec:
    """The registration of ``name``.

    Raises:
        ValueError: for an unknown name, listing the closest registered names.
    """
    _load_plugins()
    if name not in _BLOCKS:
        raise _unknown_block(name)
    return _BLOCKS[name]


def check_block_kwargs(name: str, dim: int, kwargs: dict[str, Any]) -> list[str]:
    """What is wrong with building ``name`` for ``dim`` channels with ``kwargs``, without building it.

    Each entry is one sentence: a keyword the block does not take (with the closest ones it does), ``num_heads``
    that does not divide ``dim``, or the block's own ``check``. An unknown ``name`` raises ``ValueError``.
    """
    spec = block_spec(name)
    params = spec.parameters()
    problems = []
    if params is not None:
        for key in kwargs:
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=3, cutoff=0.5)
                hint = f" (closest: {', '.join(close)})" if close else ""
                problems.append(f"block {name!r} takes no argument {key!r}{hint}; it takes {', '.join(sorted(params))}")
    heads = kwargs.get("num_heads")
    if heads is None and params is not None and "num_heads" in params:
        default = params["num_heads"].default
        heads = default if isinstance(default, int) else None
    if isinstance(heads, int) and (heads < 1 or dim % heads):
        problems.append(f"width {dim} is not divisible by num_heads={heads} of block {name!r}; pick a divisor")
    if spec.check is not None and not problems:
        message = spec.check(dim, dict(kwargs))
        if message:
            problems.append(message)
    return problems


def create_block(name: str, dim: int, **kwargs: Any) -> nn.Module:
    """Build the block registered as ``name`` for ``dim`` channels.

    Raises:
        ValueError: for an unknown name, listing the closest registered names.
    """
    return block_spec(name).build(dim, **kwargs)
