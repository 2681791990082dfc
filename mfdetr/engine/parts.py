"""The parts of a stage-2 run built from its config: MaskNet (sized by the cache's detector) and its
criterion, what the training loop trains, and the model's size and cost (#params, #FLOPs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mfdetr.config import from_dict
from mfdetr.engine.cache_data import open_cache
from mfdetr.engine.config import RunConfig, with_default_enc_layer
from mfdetr.engine.trainer import seed_everything
from mfdetr.engine.training.models import Supervised
from mfdetr.errors import MfdetrError

FLOPS_INPUT_HW = (800, 1200)  # the typical COCO input size used for #FLOPs▲ (like the paper's tables)


@dataclass
class Stage2Parts:
    """What one MaskNet run is made of (typed configs resolved from the run config's tables)."""

    masknet_cfg: Any
    loss_cfg: Any
    assign_cfg: Any
    model: nn.Module
    criterion: nn.Module


def resolve_masknet_config(cfg: RunConfig) -> Any:
    from mfdetr.masknet import MaskNetConfig

    return from_dict(MaskNetConfig, cfg.masknet, where="masknet")


def with_cache_enc_layer(cfg: RunConfig, cache: str | Path) -> RunConfig:
    """``cfg`` with the default ``masknet.enc_layer`` when the recipe leaves it unset: the detector's
    default layer (two thirds of its depth), or the cache's only layer if it holds just one other."""
    if "enc_layer" in cfg.masknet:
        return cfg
    from mfdetr.contracts import default_enc_layer

    store = open_cache(cache, role="training cache")
    layer = default_enc_layer(int(store.manifest["detector"]["num_encoder_layers"]))
    if layer not in store.enc_layers and len(store.enc_layers) == 1:
        layer = int(store.enc_layers[0])
    return with_default_enc_layer(cfg, layer)


def build_parts(cfg: RunConfig, manifest: Mapping[str, Any]) -> Stage2Parts:
    """MaskNet (sized by the cache's detector: d, level strides, C1 channels) and its criterion."""
    from mfdetr.masknet import build_masknet
    from mfdetr.masknet.criterion import MaskCriterion
    from mfdetr.masknet.losses import LossConfig
    from mfdetr.masknet.targets import AssignConfig

    mcfg = resolve_masknet_config(cfg)
    loss_cfg = from_dict(LossConfig, cfg.loss, where="loss")
    assign_cfg = from_dict(AssignConfig, cfg.assign, where="assign")
    seed_everything(cfg.train.seed)
    model = build_masknet(
        mcfg,
        d_model=int(manifest["hidden_dim"]),
        level_strides=manifest["level_strides"],
        c1_channels=int(manifest["c1_channels"]),
    )
    if mcfg.num_queries > int(manifest["topk"]):
        raise MfdetrError(
            f"masknet.num_queries={mcfg.num_queries} but the cache keeps only {manifest['topk']} queries per image"
        )
    crit = MaskCriterion(
        loss_cfg=loss_cfg, assign_cfg=assign_cfg, class_to_category=manifest["category_map"], seed=cfg.train.seed
    )
    return Stage2Parts(masknet_cfg=mcfg, loss_cfg=loss_cfg, assign_cfg=assign_cfg, model=model, criterion=crit)


def training_model(parts: Stage2Parts) -> Supervised:
    """What the training loop trains: target assignment, then MaskNet on the positives only
    (:class:`~mfdetr.masknet.positives.PositivesOnly`; same losses and gradients as all K queries,
    checkpoints hold the plain MaskNet state), scored by the run's criterion."""
    from mfdetr.masknet.positives import PositivesOnly

    return Supervised(PositivesOnly(parts.model, parts.criterion), parts.criterion, assigns_targets=True)


def complexity(model: nn.Module, manifest: Mapping[str, Any]) -> dict[str, float]:
    """#params▲ (M) and #FLOPs▲ (G multiply-adds, as the paper counts them) for one image, K queries."""
    from mfdetr.masknet.complexity import FeatureSpec, describe

    spec = FeatureSpec(
        d_model=int(manifest["hidden_dim"]),
        level_strides=tuple(manifest["level_strides"]),
        c1_channels=int(manifest["c1_channels"]),
        input_hw=FLOPS_INPUT_HW,
        num_classes=int(manifest["num_classes"]),
    )
    rep = describe(model, spec, num_queries=int(getattr(model, "num_queries", 100)))  # type: ignore[arg-type]
    return {"params_m": rep.params["total"] / 1e6, "flops_g": rep.flops["total"] / 2e9}
