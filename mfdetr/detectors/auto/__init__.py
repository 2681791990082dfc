"""``--detector auto``: the architecture a checkpoint describes, registered as a preset.

:func:`architecture_of` reads a checkpoint file safely (``weights_only``; the official training
``args`` namespace allow-listed), merges the args with a ``--detector-config`` file's (parsed as data,
never executed; a disagreement is an error naming the setting) and infers the rest from the tensor
shapes (:mod:`mfdetr.detectors.auto.infer`). :func:`register_auto_preset` registers the result under
``auto-<checkpoint file stem>`` so every step of a command (and ``build_detector``) finds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfdetr.contracts import DetectorPreset, Preprocessing, default_enc_layer
from mfdetr.detectors.auto.infer import infer_config
from mfdetr.detectors.common.arch import DetrArchConfig, family_preset
from mfdetr.detectors.common.checkpoint import read_checkpoint, unwrap_state_dict
from mfdetr.detectors.registry import _PRESETS, register_detector, unregister_detector
from mfdetr.errors import MfdetrError

#: presets registered here (an auto or file preset may be replaced by a newer architecture; others never)
_REGISTERED: set[str] = set()


def checkpoint_args(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The training args a checkpoint embeds (``'args'``: a Namespace or a dict), else ``{}``."""
    args = obj.get("args")
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    raise MfdetrError(f"checkpoint 'args' is a {type(args).__name__}, expected a namespace or a dict")


def merge_args(from_checkpoint: Mapping[str, Any], from_config: Mapping[str, Any], *, config: str) -> dict[str, Any]:
    """Both sources' args; a setting both state with different values is an error naming it."""
    for k in sorted(set(from_checkpoint) & set(from_config)):
        a, b = from_checkpoint[k], from_config[k]
        if _plain(a) != _plain(b):
            raise MfdetrError(f"{config}: {k} = {b!r} but the checkpoint's args say {a!r}")
    return {**from_checkpoint, **from_config}


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def architecture_of(
    checkpoint: str | Path | Mapping[str, Any], *, config_file: str | Path | None = None
) -> tuple[str, DetrArchConfig]:
    """(family, config) of a checkpoint (file or loaded dict), with an optional official config file."""
    family, cfg, _, _ = _architecture(checkpoint, config_file)
    return family, cfg


def eval_preprocessing(args: Mapping[str, Any]) -> Preprocessing | None:
    """DINO's evaluation resize from its training args: the shorter side to the largest of
    ``data_aug_scales``, the longer at most ``data_aug_max_size`` (``None`` when the args state neither)."""
    scales, max_size = args.get("data_aug_scales"), args.get("data_aug_max_size")
    if scales is None and max_size is None:
        return None
    ok_scales = scales is None or (
        isinstance(scales, (list, tuple)) and scales and all(isinstance(x, int) and x > 0 for x in scales)
    )
    if not ok_scales or not (max_size is None or (isinstance(max_size, int) and max_size > 0)):
        raise MfdetrError(
            f"args.data_aug_scales = {scales!r} / data_aug_max_size = {max_size!r}: expected positive integers"
        )
    return Preprocessing(short_side=max(scales) if scales else 800, max_size=int(max_size) if max_size else 1333)


def _architecture(
    checkpoint: str | Path | Mapping[str, Any], config_file: str | Path | None
) -> tuple[str, DetrArchConfig, bool, Preprocessing | None]:
    """(family, config, whether the class slots count the dataset's categories in sorted order (detrex),
    the evaluation resize the args state)."""
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    origin = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "checkpoint"
    sd = unwrap_state_dict(obj, origin=origin)
    args = checkpoint_args(obj)
    from mfdetr.detectors.dino.detrex import (
        DETREX_DINO_ARGS,
        DETREX_HDETR_ARGS,
        is_detrex,
        to_mfdetr_layout,
    )

    contiguous = is_detrex(sd)
    defaults: dict[str, Any] = {}
    if contiguous:  # detrex states no args: its configs' values fill what the shapes cannot tell
        defaults = DETREX_DINO_ARGS if "transformer.tgt_embed.weight" in sd else DETREX_HDETR_ARGS
        try:
            sd = to_mfdetr_layout(sd)
        except MfdetrError as e:
            raise MfdetrError(f"{origin}: {e}") from None
    if config_file is not None:
        from mfdetr.detectors.auto.config_files import read_config_file

        args = merge_args(args, read_config_file(Path(config_file)), config=str(config_file))
    args = {**defaults, **args}
    try:
        return (*infer_config(sd, args), contiguous, eval_preprocessing(args))
    except MfdetrError as e:
        raise MfdetrError(f"{origin}: {e}") from None


def auto_name(checkpoint: Path) -> str:
    return "auto-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", checkpoint.stem)


def arch_preset(name: str, family: str, cfg: DetrArchConfig, *, checkpoint_file: str | None = None) -> DetectorPreset:
    return family_preset(
        name,
        family,
        cfg,
        checkpoint_file=checkpoint_file,
        box_ap=None,
        notes=f"{family} architecture read from {checkpoint_file or 'a preset file'}",
    )


def register_arch(preset: DetectorPreset, family: str, cfg: DetrArchConfig) -> DetectorPreset:
    """Register ``preset`` (replacing a same-named auto/file preset of another architecture)."""
    if preset.name in _PRESETS:
        if _PRESETS[preset.name] == preset:
            return _PRESETS[preset.name]
        if preset.name not in _REGISTERED:
            raise MfdetrError(
                f"detector preset {preset.name!r} already exists with another architecture: "
                "give the preset another name"
            )
        unregister_detector(preset.name)
    if family == "dino":
        from mfdetr.detectors.dino.presets import build_dino as build
    else:
        from mfdetr.detectors.hdetr.presets import build_hdetr as build

    def builder(*, checkpoint: Any = None, device: str = "cpu") -> Any:
        return build(cfg, preset=preset, checkpoint=checkpoint, device=device)

    register_detector(preset, builder)
    _REGISTERED.add(preset.name)
    return preset


def category_ids(path: Path) -> list[int]:
    """The category ids of a COCO annotation file, sorted."""
    try:
        cats = json.loads(Path(path).read_text())["categories"]
        return sorted(int(c["id"]) for c in cats)
    except FileNotFoundError:
        raise MfdetrError("annotation file not found", path=path) from None
    except (ValueError, KeyError, TypeError) as e:
        raise MfdetrError(f"no readable 'categories' ({type(e).__name__}: {e})", path=path) from None


def register_auto_preset(
    checkpoint: Path,
    *,
    config_file: str | Path | None = None,
    categories_file: Path | None = None,
    slot_categories: Path | None = None,
    need_categories: bool = False,
) -> DetectorPreset:
    """Read ``checkpoint``'s architecture and register it as ``auto-<stem>``.

    The class slots are matched to the categories of ``categories_file`` (the command's COCO annotation
    file) or of ``slot_categories`` (``--categories``: the slots' categories in order) by
    :func:`mfdetr.detectors.categories.slot_map`. Without either, official heads keep slot i = id i; a
    detrex head (slots in its dataset's sorted id order) is then an error when ``need_categories``."""
    from mfdetr.detectors.categories import (
        dataset_categories,
        read_categories,
        slot_map,
    )

    family, cfg, contiguous, preprocessing = _architecture(checkpoint, config_file)
    preset = arch_preset(auto_name(checkpoint), family, cfg, checkpoint_file=checkpoint.name)
    if preprocessing is not None:
        preset = dataclasses.replace(preset, preprocessing=preprocessing)
    found = slot_map(
        cfg.num_classes,
        contiguous=contiguous,
        origin=str(checkpoint),
        dataset=dataset_categories(categories_file) if categories_file is not None else None,
        dataset_path=categories_file,
        listed_path=slot_categories,
        listed=read_categories(slot_categories) if slot_categories is not None else None,
    )
    if found is not None:
        preset = dataclasses.replace(preset, class_to_category=found)
    elif contiguous and need_categories:
        raise MfdetrError(
            f"{checkpoint}: a detrex checkpoint numbers its classes in its dataset's category order: "
            "name that dataset's annotation file (--categories FILE)"
        )
    return register_arch(preset, family, cfg)


def describe_preset(preset: DetectorPreset) -> str:
    """One line per fact: what ``--detector auto`` resolved."""
    a = preset.arch
    bb = a["backbone"]
    queries = (
        f"{a['num_queries']} queries"
        if "num_queries" in a
        else f"{a['num_queries_one2one']} one-to-one + {a['num_queries_one2many']} one-to-many queries"
    )
    return (
        f"detector {preset.name}: {preset.family}, backbone {bb['kind']} {dict(bb['params'])} stages "
        f"{list(bb['out_indices'])}, {a['num_feature_levels']} levels (strides {list(preset.level_strides)}), "
        f"d={a['hidden_dim']}, {a['nheads']} heads, {a['enc_layers']}+{a['dec_layers']} layers, FFN "
        f"{a['dim_feedforward']}, points {a['enc_n_points']}/{a['dec_n_points']}, {queries}, "
        f"{a['num_classes']} classes; eval resize {preset.preprocessing.short_side}/{preset.preprocessing.max_size}; "
        f"default encoder layer {default_enc_layer(a['enc_layers'])}"
    )


__all__ = [
    "arch_preset",
    "architecture_of",
    "auto_name",
    "category_ids",
    "checkpoint_args",
    "describe_preset",
    "eval_preprocessing",
    "merge_args",
    "register_arch",
    "register_auto_preset",
]
