"""A generic four-stage hierarchical backbone: stem, stages of blocks at strides 4/8/16/32, norm, classifier head.

One assembler for every pyramid backbone of the project, in the anatomy of timm's ``metaformer.py`` / ``davit.py``
(a block type chosen per stage, per-stage lists broadcast from a scalar, the full timm model API). The paper models
are thin configurations of it: ``backbones/biformer.py`` (BiFormer, arXiv 2303.08810) and
``backbones/dual_attention_vit.py`` (DaViT, arXiv 2204.03645).

Layout (module names are the state-dict prefixes)::

    stem                        'deep':  conv3x3 s2 -> norm -> GELU -> conv3x3 s2 -> norm   (BiFormer)
                                'patch': conv7x7 s4 -> norm                                 (DaViT)
    stages.{i}.downsample       i > 0, 'conv_norm': conv3x3 s2 -> norm (BiFormer)
                                       'norm_conv': norm -> conv2x2 s2 (DaViT)
    stages.{i}.blocks.{j}       block(embed_dims[i], drop_path=rate, **block_kwargs[i]), (B, C, H, W) in and out
    norm_pre                    final norm on the map (BiFormer's BatchNorm2d) or Identity
    head                        'linear': pool -> dropout -> fc; 'norm': pool -> norm -> dropout -> fc (DaViT)

Every spatial reduction rounds up (``ceil(H / 2)``), so any input size works.

Defining a new variant: write an entrypoint that fills in the arguments of :class:`HierarchicalNet`. A block is a
``blocks`` factory key (``create_block(key, dim, **kwargs)``) or any callable ``(dim, **kwargs) -> nn.Module`` that
maps ``(B, dim, H, W)`` to the same shape; it must accept ``drop_path`` when ``drop_path_rate > 0``. ``block`` and
``block_kwargs`` take one value for all stages or a list with one per stage, so a hybrid is e.g.::

    HierarchicalNet(
        depths=(2, 2, 6, 2), embed_dims=(32, 64, 128, 256),
        block=(MBConvCA, MBConvCA, "dual", "bra_full"),     # conv stages with coordinate attention, then attention
        block_kwargs=(dict(expand_ratio=4), dict(expand_ratio=4), dict(window_size=7), {}),
        stem_type="deep", downsample_type="conv_norm", norm_layer="batchnorm2d", final_norm="batchnorm2d",
    )
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, NormMlpClassifierHead, get_norm_layer, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from torch import Tensor, nn

from blocks import create_block

__all__ = ["ConvStem", "Downsample", "HierarchicalNet", "HierarchicalStage", "PatchStem", "build_hierarchical"]

BlockType = str | Callable[..., nn.Module]
_STEMS = ("deep", "patch")
_DOWNSAMPLES = ("conv_norm", "norm_conv")
_HEADS = ("linear", "norm")


@register_notrace_function  # NOTE: shape-dependent padding; a leaf for FX (which skips "_" names)
def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the bottom/right of an NCHW map up to a multiple of ``multiple``."""
    pad_b, pad_r = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_r, 0, pad_b)) if pad_b or pad_r else x


class ConvStem(nn.Module):
    """Two stride-2 3x3 convolutions (UniFormer / BiFormer stem, arXiv 2303.08810): stride 4, ``ceil(H / 4)``.

    ``y = norm2(conv2(GELU(norm1(conv1(x)))))``, ``conv1: in_chs -> out_chs // 2``. Shapes ``(B, in_chs, H, W) ->
    (B, out_chs, ceil(H / 4), ceil(W / 4))``.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        norm_layer: norm after each conv.
        act_layer: activation between the convs.
    """

    def __init__(
        self, in_chs: int, out_chs: int, norm_layer: Callable[..., nn.Module], act_layer: type[nn.Module] = nn.GELU
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, 3, stride=2, padding=1)
        self.norm1 = norm_layer(out_chs // 2)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, 3, stride=2, padding=1)
        self.norm2 = norm_layer(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class PatchStem(nn.Module):
    """Overlapping patch embedding (DaViT stem, arXiv 2204.03645): ``y = norm(conv7x7_s4_p3(x))``.

    With padding ``k // 2`` and stride 4 the output is ``ceil(H / 4)`` for any ``H`` and equals zero-padding the
    input to a multiple of 4 first (timm's DaViT ``Stem``). Shapes ``(B, in_chs, H, W) -> (B, out_chs, ceil(H / 4),
    ceil(W / 4))``.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        norm_layer: norm after the conv.
        kernel_size: odd conv kernel size >= 4.
    """

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Callable[..., nn.Module], kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 4:
            raise ValueError(f"kernel_size={kernel_size} must be odd and >= 4 so that the output is ceil(H / 4)")
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=4, padding=kernel_size // 2)
        self.norm = norm_layer(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Downsample(nn.Module):
    """Stride-2 convolution with a norm before (DaViT) or after (BiFormer) it; output ``ceil(H / 2)``.

    Odd kernels pad ``k // 2`` on both sides; even kernels (DaViT's 2x2) zero-pad the bottom/right to an even size.
    Shapes ``(B, in_chs, H, W) -> (B, out_chs, ceil(H / 2), ceil(W / 2))``.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        norm_layer: norm layer.
        kernel_size: conv kernel size.
        norm_first: ``norm -> conv`` (norm over ``in_chs``) instead of ``conv -> norm``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        norm_layer: Callable[..., nn.Module],
        kernel_size: int = 3,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.even = kernel_size % 2 == 0
        padding = (kernel_size - 2) // 2 if self.even else kernel_size // 2
        if norm_first:
            self.norm = norm_layer(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=2, padding=padding)
        if not norm_first:
            self.norm = norm_layer(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = self.norm(x)
        x = self.conv(pad_to_multiple(x, 2) if self.even else x)
        return x if self.norm_first else self.norm(x)


class HierarchicalStage(nn.Module):
    """One resolution stage: an optional downsample, then ``depth`` blocks of one type; owns gradient checkpointing.

    Args:
        in_chs: input channels.
        out_chs: channels of the blocks.
        depth: number of blocks.
        block: ``blocks`` factory key or constructor ``(dim, **kwargs) -> nn.Module`` (NCHW in and out).
        block_kwargs: keyword arguments of every block.
        drop_path_rates: stochastic depth rate per block (passed as ``drop_path`` when > 0).
        downsample: module reducing ``in_chs`` maps to ``out_chs`` at half resolution, or None.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        block: BlockType,
        block_kwargs: dict[str, Any],
        drop_path_rates: Sequence[float],
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if downsample is None and in_chs != out_chs:
            raise ValueError(f"a stage without downsample keeps its width, got in_chs={in_chs} != out_chs={out_chs}")
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*[_make_block(block, out_chs, rate, block_kwargs) for rate in drop_path_rates])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _make_block(block: BlockType, dim: int, drop_path: float, kwargs: dict[str, Any]) -> nn.Module:
    if drop_path > 0:
        kwargs = {**kwargs, "drop_path": drop_path}
    return create_block(block, dim, **kwargs) if isinstance(block, str) else block(dim, **kwargs)


def _per_stage(value: Any, n: int, name: str) -> list:
    """Broadcast a scalar (a str, dict or callable counts as one value) to ``n`` stages, or check a per-stage list."""
    if isinstance(value, (str, dict)) or callable(value) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but there are {n} stages; give one value or one per stage")
    return list(value)


class HierarchicalNet(nn.Module):
    """Hierarchical (pyramid) vision backbone with a block type per stage; see the module docstring for the layout.

    Stage ``i`` runs at stride ``4 * 2**i`` with ``embed_dims[i]`` channels; drop path rates grow linearly from 0 to
    ``drop_path_rate`` over all blocks. Input ``(B, in_chans, H, W)``, any ``H, W >= 1``; features
    ``(B, embed_dims[-1], ceil(H / 32), ceil(W / 32))``; logits ``(B, num_classes)``.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for pooled features.
        global_pool: timm pooling type of the head ('avg', 'max', ...; '' for none).
        depths: blocks per stage.
        embed_dims: channels per stage.
        block: block type for all stages or one per stage (factory key or constructor).
        block_kwargs: block keyword arguments for all stages or one dict per stage.
        stem_type: 'deep' (two 3x3 s2 convs, BiFormer) or 'patch' (one 7x7 s4 conv, DaViT).
        downsample_type: 'conv_norm' (3x3 s2 conv then norm, BiFormer) or 'norm_conv' (norm then 2x2 s2, DaViT).
        downsample_kernel_size: conv kernel of the downsample; default 3 for 'conv_norm', 2 for 'norm_conv'.
        norm_layer: timm norm name of the stem and downsample norms ('batchnorm2d', 'layernorm2d', ...).
        final_norm: norm name applied to the last map (``norm_pre``), or None.
        head_type: 'linear' (pool -> fc) or 'norm' (pool -> norm -> fc, timm's ``NormMlpClassifierHead``).
        head_norm_layer: norm name of the 'norm' head.
        norm_eps: epsilon of all the norms above (not the blocks' own).
        drop_rate: dropout before the classifier.
        drop_path_rate: final stochastic depth rate.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 6, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        block: BlockType | Sequence[BlockType] = "bra",
        block_kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        stem_type: str = "deep",
        downsample_type: str = "conv_norm",
        downsample_kernel_size: int | None = None,
        norm_layer: str = "batchnorm2d",
        final_norm: str | None = "batchnorm2d",
        head_type: str = "linear",
        head_norm_layer: str = "layernorm2d",
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        depths, embed_dims = list(depths), list(embed_dims)
        n = len(depths)
        if n < 1 or len(embed_dims) != n or min(depths) < 1:
            raise ValueError(f"depths={depths} and embed_dims={embed_dims} need one positive entry per stage each")
        for name, value, allowed in (
            ("stem_type", stem_type, _STEMS),
            ("downsample_type", downsample_type, _DOWNSAMPLES),
            ("head_type", head_type, _HEADS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {allowed}")
        blocks = _per_stage(block, n, "block")
        kwargs = [dict(k) for k in _per_stage(block_kwargs or {}, n, "block_kwargs")]
        norm = partial(get_norm_layer(norm_layer), eps=norm_eps)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        if stem_type == "deep":
            self.stem = ConvStem(in_chans, embed_dims[0], norm)
        else:
            self.stem = PatchStem(in_chans, embed_dims[0], norm)
        norm_first = downsample_type == "norm_conv"
        down_k = downsample_kernel_size or (2 if norm_first else 3)

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(depths)
        stages, self.feature_info = [], []
        for i in range(n):
            down = Downsample(embed_dims[i - 1], embed_dims[i], norm, down_k, norm_first) if i > 0 else None
            dims = (embed_dims[max(i - 1, 0)], embed_dims[i])
            stages.append(HierarchicalStage(*dims, depths[i], blocks[i], kwargs[i], rates[i].tolist(), down))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.norm_pre = get_norm_layer(final_norm)(self.num_features, eps=norm_eps) if final_norm else nn.Identity()
        if head_type == "linear":
            self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        else:
            head_norm = partial(get_norm_layer(head_norm_layer), eps=norm_eps)
            self.head = NormMlpClassifierHead(
                self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, norm_layer=head_norm
            )
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm_pre", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (NCHW) for ``indices`` (last n if int, all if None), plus the final features.

        ``norm=True`` applies ``norm_pre`` to the last stage's intermediate (the only one it is sized for).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; use 'NCHW'")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]

        x = self.stem(x)
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = checkpoint(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm_pre(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm_pre(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm / head) not needed to produce the intermediates at ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm_pre = nn.Identity()
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.num_classes = 0
            self.head.reset(0, "", reset_other=True, in_features=self.num_features)
            self.head_hidden_size = self.head.num_features
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm_pre(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_hierarchical(
    variant: str, pretrained: bool, filter_fn: Callable[..., dict[str, Tensor]], **kwargs: Any
) -> HierarchicalNet:
    """``build_model_with_cfg`` for a :class:`HierarchicalNet` variant, with four feature levels (strides 4-32)."""
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        HierarchicalNet,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )
