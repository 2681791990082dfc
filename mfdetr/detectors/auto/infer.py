"""A DINO or H-Deformable-DETR architecture from a checkpoint's training args and tensor shapes.

The args (IDEA-Research/DINO, FocalNet-DINO and H-Deformable-DETR checkpoints embed the training
``argparse.Namespace`` as ``'args'``; or the config file the user trained with) state what they state;
every size they leave out comes from the state dict (``level_embed`` → levels and ``d``, layer counts,
FFN width, sampling points, class slots, query rows). A stated value the shapes contradict is a one-line
error naming the key; a setting mfdetr does not implement is a one-line error naming the setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mfdetr.detectors.auto.backbone import infer_backbone
from mfdetr.detectors.common.arch import DetrArchConfig
from mfdetr.errors import MfdetrError

#: settings mfdetr implements one value of: (family, arg, accepted values, what it is)
_UNSUPPORTED: tuple[tuple[str, str, tuple[Any, ...], str], ...] = (
    ("dino", "two_stage_type", ("standard",), "two-stage query selection"),
    ("dino", "transformer_activation", ("relu",), "transformer activation"),
    ("dino", "decoder_sa_type", ("sa",), "decoder self-attention"),
    ("dino", "embed_init_tgt", (True,), "learned content queries"),
    ("dino", "query_dim", (4,), "box queries"),
    ("dino", "num_patterns", (0,), "pattern embeddings"),
    ("dino", "use_deformable_box_attn", (False,), "deformable box attention"),
    ("dino", "two_stage_class_embed_share", (False,), "encoder class head sharing"),
    ("dino", "two_stage_bbox_embed_share", (False,), "encoder box head sharing"),
    ("dino", "dec_layer_number", (None,), "per-layer decoder query numbers"),
    ("dino", "masks", (False,), "a segmentation head"),
    ("hdetr", "two_stage", (True,), "two-stage"),
    ("hdetr", "with_box_refine", (True,), "iterative box refinement"),
    ("hdetr", "mixed_selection", (True,), "mixed query selection"),
    ("hdetr", "look_forward_twice", (True,), "look forward twice"),
    ("hdetr", "masks", (False,), "a segmentation head"),
)


def detect_family(sd: Mapping[str, Tensor], args: Mapping[str, Any]) -> str:
    """``"dino"`` (``transformer.tgt_embed`` + ``label_enc``) or ``"hdetr"`` (``query_embed``), args agreeing."""
    layout = "dino" if "transformer.tgt_embed.weight" in sd else "hdetr" if "query_embed.weight" in sd else None
    if layout is None:
        raise MfdetrError(
            "checkpoint: neither transformer.tgt_embed.weight (DINO) nor query_embed.weight "
            "(H-Deformable-DETR) found: not an architecture mfdetr implements"
        )
    stated = args.get("modelname")
    if stated is not None and stated != "dino":
        raise MfdetrError(f"args.modelname = {stated!r}: model not implemented in mfdetr (DINO, H-Deformable-DETR)")
    if stated == "dino" and layout != "dino":
        raise MfdetrError("args.modelname = 'dino' but transformer.tgt_embed.weight is missing")
    if "num_queries_one2one" in args and layout != "hdetr":
        raise MfdetrError("args.num_queries_one2one (H-Deformable-DETR) but query_embed.weight is missing")
    return layout


def _layers(sd: Mapping[str, Tensor], prefix: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))})


class _Sizes:
    """Collects each size from the args or the shapes; a stated value the shapes contradict is an error."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.args = args
        self.values: dict[str, Any] = {}

    def take(self, field: str, shape_value: Any, key: str, *, arg: str | None = None) -> Any:
        arg = arg or field
        stated = self.args.get(arg)
        if stated is not None and shape_value is not None and int(stated) != int(shape_value):
            raise MfdetrError(f"args.{arg} = {stated} but checkpoint key {key} implies {shape_value}")
        value = shape_value if shape_value is not None else self.args.get(arg)
        if value is None:
            raise MfdetrError(f"cannot tell {field} from the checkpoint ({key} missing) nor from its args.{arg}")
        self.values[field] = int(value)
        return int(value)


def check_supported(family: str, args: Mapping[str, Any]) -> None:
    for fam, name, ok, what in _UNSUPPORTED:
        if fam == family and name in args and args[name] not in ok:
            raise MfdetrError(f"args.{name} = {args[name]!r}: {what} other than {ok[0]!r} is not implemented in mfdetr")
    nms = args.get("nms_iou_threshold")
    if family == "dino" and nms is not None and float(nms) > 0:
        raise MfdetrError(f"args.nms_iou_threshold = {nms}: NMS in post-processing is not implemented in mfdetr")


def _shared_sizes(s: _Sizes, sd: Mapping[str, Tensor]) -> None:
    lvl = sd.get("transformer.level_embed")
    if lvl is None:
        raise MfdetrError("checkpoint key transformer.level_embed missing: not a deformable DETR")
    levels = s.take("num_feature_levels", int(lvl.shape[0]), "transformer.level_embed")
    s.take("hidden_dim", int(lvl.shape[1]), "transformer.level_embed")
    s.take("enc_layers", _layers(sd, "transformer.encoder.layers"), "transformer.encoder.layers.*")
    s.take("dec_layers", _layers(sd, "transformer.decoder.layers"), "transformer.decoder.layers.*")
    ffn = "transformer.encoder.layers.0.linear1.weight"
    s.take("dim_feedforward", int(sd[ffn].shape[0]) if ffn in sd else None, ffn)
    if s.args.get("nheads") is None:  # heads × levels × points is all the shapes tell
        raise MfdetrError(
            "cannot tell nheads from tensor shapes: state args.nheads (checkpoint args or --detector-config)"
        )
    heads = int(s.args["nheads"])
    s.values["nheads"] = heads
    for field, key in (
        ("enc_n_points", "transformer.encoder.layers.0.self_attn.attention_weights.weight"),
        ("dec_n_points", "transformer.decoder.layers.0.cross_attn.attention_weights.weight"),
    ):
        rows = int(sd[key].shape[0]) if key in sd else None
        if rows is not None and rows % (heads * levels):
            raise MfdetrError(
                f"checkpoint key {key} has {rows} rows, not a multiple of nheads ({heads}) × levels "
                f"({levels}): state args.nheads"
            )
        s.take(field, rows // (heads * levels) if rows is not None else None, key)
    s.take(
        "num_classes",
        int(sd["class_embed.0.bias"].shape[0]) if "class_embed.0.bias" in sd else None,
        "class_embed.0.bias",
    )


def infer_config(sd: Mapping[str, Tensor], args: Mapping[str, Any]) -> tuple[str, DetrArchConfig]:
    """(family, config) of a checkpoint's state dict and (possibly empty) training args."""
    family = detect_family(sd, args)
    check_supported(family, args)
    s = _Sizes(args)
    _shared_sizes(s, sd)
    backbone = infer_backbone(sd, args)
    if family == "dino":
        from mfdetr.detectors.dino.config import DinoConfig

        s.take("num_queries", int(sd["transformer.tgt_embed.weight"].shape[0]), "transformer.tgt_embed.weight")
        s.take(
            "dn_labelbook_size",
            int(sd["label_enc.weight"].shape[0]) - 1 if "label_enc.weight" in sd else None,
            "label_enc.weight",
        )
        extra = {k: bool(args[k]) for k in ("dec_pred_class_embed_share", "dec_pred_bbox_embed_share") if k in args}
        for ours, theirs in (("pe_temperature_h", "pe_temperatureH"), ("pe_temperature_w", "pe_temperatureW")):
            if theirs in args:
                extra[ours] = float(args[theirs])
        if "pe_offset" in args:
            extra["pe_offset"] = float(args["pe_offset"])
        extra["num_select"] = int(args.get("num_select", 300))
        return family, DinoConfig(backbone=backbone, **s.values, **extra)
    from mfdetr.detectors.hdetr.config import HDetrConfig

    rows = int(sd["query_embed.weight"].shape[0])
    if "num_queries_one2one" not in args:
        raise MfdetrError(
            f"checkpoint key query_embed.weight has {rows} rows (one-to-one + one-to-many queries): "
            "state args.num_queries_one2one (checkpoint args or --detector-config)"
        )
    one2one = int(args["num_queries_one2one"])
    one2many = int(args.get("num_queries_one2many", rows - one2one))
    if one2many < 0:
        raise MfdetrError(
            f"args.num_queries_one2one = {one2one} but checkpoint key query_embed.weight has only {rows} rows"
        )
    if one2one + one2many != rows:
        raise MfdetrError(
            f"args.num_queries_one2one + num_queries_one2many = {one2one + one2many} but checkpoint "
            f"key query_embed.weight has {rows} rows"
        )
    extra = {"inv_sigmoid_eps": float(args["inv_sigmoid_eps"])} if "inv_sigmoid_eps" in args else {}
    return family, HDetrConfig(
        backbone=backbone,
        **s.values,
        num_queries_one2one=one2one,
        num_queries_one2many=one2many,
        num_select=int(args.get("topk", 100)),
        **extra,
    )


__all__ = ["check_supported", "detect_family", "infer_config"]
