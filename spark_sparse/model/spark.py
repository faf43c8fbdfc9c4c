"""SparK: mask -> sparsify -> sparse encoder -> densify -> decoder -> loss, in one module."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .decoder import LightDecoder
from .densify import Densify, visible_sites
from .loss import masked_patch_loss
from ..mask import check_inputs, random_active, upsample_active
from ..encoders.registry import create_encoder
from ..encoders.base import Encoder
from ..transfer import to_device


class MaskPlan(NamedTuple):
    """What one batch's mask decides, made before its forward pass (``SparK.plan``)."""

    active: Tensor  # (B, 1, gh, gw) bool on the CPU, where the engines read it
    on_device: Tensor  # the same on the images' device
    visible: list[Tensor]  # per decoder scale, coarsest first: (B, 1, h, w) bool on the device
    sites: list[Tensor]  # ... and the flat indices of its visible sites
    encoder: Any  # the encoder's own plan (``Encoder.plan``), None when it makes nothing ahead


class SparK(nn.Module):
    """Masked image modelling for a convnet encoder with a hierarchical decoder.

    ``hierarchy`` is how many encoder scales (coarsest first) feed the decoder: by default all of
    them (the paper's 4; Visformer's and NesT's 3), 1 the single-scale ablation. ``densify_norm``
    is 'bn', 'ln' or 'none'.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder_width: int = 768,
        hierarchy: int | None = None,
        densify_norm: str = "bn",
        mask_ratio: float = 0.6,
        mask_seed: int = 0,
        decoder_checkpoint: bool = False,
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        hierarchy = len(encoder.strides) if hierarchy is None else hierarchy
        if not 1 <= hierarchy <= len(encoder.strides):
            raise ValueError(f"hierarchy must be in 1..{len(encoder.strides)}, got {hierarchy}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.hierarchy = hierarchy
        self.stride = encoder.stride
        self.decoder = LightDecoder(decoder_width, encoder.stride, checkpoint=decoder_checkpoint)
        coarse_first = list(reversed(encoder.channels))[:hierarchy]
        self.densify = nn.ModuleList(
            Densify(c, self.decoder.widths[i], densify_norm, kernel_size=1 if i == 0 else 3)
            for i, c in enumerate(coarse_first)
        )
        # masks drawn without a generator of the caller's come from the model's own: reproducible
        self.generator = torch.Generator().manual_seed(mask_seed)

    @classmethod
    def build(cls, model: str, engine: str = "sparse", drop_path_rate: float = 0.0, **kwargs) -> "SparK":
        return cls(create_encoder(model, engine, drop_path_rate=drop_path_rate), **kwargs)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and norms (timm's convention):
        the mask tokens and what the encoder's timm model exempts (position tables)."""
        return self.mask_tokens() | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def mask_tokens(self) -> set[str]:
        return {f"densify.{i}.mask_token" for i in range(len(self.densify))}

    def random_mask(self, images: Tensor, rank: int = 0, world_size: int = 1,
                    generator: torch.Generator | None = None) -> Tensor:
        """Visible patches for ``images``, drawn from ``generator`` (by default the model's own).
        In data-parallel training ``images`` is slice ``rank`` of a global batch ``world_size``
        times larger: every rank draws the mask of the whole global batch (same generator, same
        seed) and keeps its slice, so each image is masked exactly as a single process would mask
        it. The mask stays on the CPU, where the sparse engine reads it without waiting for the GPU."""
        b, _, h, w = images.shape
        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h}x{w} is not divisible by the encoder stride {self.stride}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        grid = (h // self.stride, w // self.stride)
        active = random_active(b * world_size, grid, self.mask_ratio, generator or self.generator)
        return active[rank * b:(rank + 1) * b]

    def plan(self, active: Tensor, device: torch.device | str, like: MaskPlan | None = None) -> MaskPlan:
        """Everything the mask ``active`` (on the CPU) decides, made now for a forward on
        ``device`` later: the mask and each decoder scale's visible sites there, and the
        encoder's coordinates and index tables (with ``like``, an earlier batch's plan, every
        table that batch read). Made while a GPU runs the previous step, it leaves the step only
        the GPU's work to queue; nothing here waits for the GPU."""
        gh, gw = active.shape[-2:]
        sizes = [(gh * self.stride // s, gw * self.stride // s) for s in self.encoder.strides[::-1][: self.hierarchy]]
        visible = [upsample_active(active, size) for size in sizes]
        # each scale's visible set and its sites are made where the mask is, then copied
        on_device = to_device((active, visible, [visible_sites(v) for v in visible]), torch.device(device))
        encoder = self.encoder.plan(active, device, like.encoder if like is not None else None)
        return MaskPlan(active, *on_device, encoder)

    def copy_plan_(self, plan: MaskPlan, other: MaskPlan) -> None:
        """Overwrite ``plan`` in place with ``other``, a later batch's plan made ``like=plan``
        with as many visible patches per image: a step captured on ``plan`` (a CUDA graph,
        ``graphed.py``) then computes ``other``'s batch. Queued copies; nothing waits."""
        if other.active.shape != plan.active.shape or not torch.equal(other.active.sum((1, 2, 3)),
                                                                      plan.active.sum((1, 2, 3))):
            raise ValueError("a replayed step needs every batch of the same size with as many visible patches "
                             "per image (one mask ratio)")
        plan.active.copy_(other.active)
        for mine, theirs in zip([plan.on_device, *plan.visible, *plan.sites],
                                [other.on_device, *other.visible, *other.sites], strict=True):
            mine.copy_(theirs, non_blocking=True)
        self.encoder.copy_plan_(plan.encoder, other.encoder)

    def forward(self, images: Tensor, active: Tensor | MaskPlan | None = None) -> dict[str, Tensor]:
        """Returns the loss, the prediction (B, 3, H, W) in normalised-patch units, and the mask
        (on the images' device). ``active``: the mask, best on the CPU, as ``random_mask`` makes
        it, or its ``plan`` (by default a random mask)."""
        if active is None:
            active = self.random_mask(images)
        if isinstance(active, MaskPlan):
            plan = active
        else:
            check_inputs(images, active, self.stride)
            plan = self.plan(active, images.device)
        feats = self.encoder.dense_features(images, plan.active, plan.encoder)[::-1][: self.hierarchy]
        to_decoder = [d(f, v, s) for d, f, v, s in zip(self.densify, feats, plan.visible, plan.sites)]
        pred = self.decoder(to_decoder)
        loss = masked_patch_loss(pred, images, plan.on_device, self.stride)
        return {"loss": loss, "pred": pred, "active": plan.on_device}

    @classmethod
    def from_config(cls, cfg) -> "SparK":
        """Build from a pretraining config (conf/pretrain.yaml; a checkpoint's from before
        ``decoder.checkpoint`` existed builds the plain decoder)."""
        return cls.build(cfg.model, engine=cfg.engine, drop_path_rate=cfg.drop_path_rate,
                         decoder_width=cfg.decoder.width, hierarchy=cfg.decoder.hierarchy,
                         densify_norm=cfg.decoder.densify_norm, mask_ratio=cfg.mask_ratio,
                         mask_seed=cfg.seed, decoder_checkpoint=cfg.decoder.get("checkpoint", False))
