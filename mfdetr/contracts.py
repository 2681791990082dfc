"""Typed contracts shared by every floor of mfdetr (ground floor: imports nothing else of mfdetr).

- :class:`DetectorOutput` — what every frozen detector returns, what the cache stores per image and
  what MaskNet reads. Stage 2 (the mask network) only ever sees these tensors.
- :class:`Preprocessing` — a detector's evaluation preprocessing (resize + normalise).
- :class:`DetectorPreset` — metadata of a named detector preset; the cache manifest copies it.
- :class:`ShapeSpec` — (channels, stride) of one feature map.
- :class:`GTInstances` — ground-truth instances of one image (original pixel frame).
- :class:`ImageBatch` — a preprocessed, padded image batch (what a detector consumes).
- :class:`FrozenDetector` — the protocol every frozen detector implements.

Conventions:

- boxes are **normalised cxcywh relative to the unpadded network-input image** (``input_hw``);
- ``input_hw`` is the resized, unpadded network-input size; ``orig_hw`` the original image size;
- feature maps may carry padding beyond their valid size; ``level_valid_hw`` gives each level's valid
  (unpadded) size, so consumers never depend on how much padding a batch or a cache canvas added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (in input pixels) of one feature map."""

    channels: int
    stride: int


@dataclass(frozen=True)
class Preprocessing:
    """DETR-family evaluation preprocessing.

    Resize so the shorter side is ``short_side`` unless the longer side would exceed ``max_size``
    (then the longer side is ``max_size``), scale to [0, 1], normalise with ``mean``/``std``.
    """

    short_side: int = 800
    max_size: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {
            "short_side": self.short_side,
            "max_size": self.max_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        return cls(
            short_side=int(d["short_side"]),
            max_size=int(d["max_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),
        )  # type: ignore[arg-type]


@dataclass(frozen=True)
class DetectorPreset:
    """Metadata of a named frozen-detector preset (architecture lives in its builder).

    Args:
        name: preset name, e.g. ``"dino_focal"``.
        family: detector family (``"dino"``, ``"hdetr"``).
        arch: the architecture config as plain data (kwargs of the family's config dataclass).
        checkpoint_file: the released checkpoint file name the preset expects.
        checkpoint_sha256: sha256 of that file when known, else ``None``.
        box_ap: the official COCO val box AP of that checkpoint (README), if known.
        num_classes: size of the classification head (91 id slots for official COCO models).
        class_to_category: category id of every head slot (``0`` = unused slot).
        preprocessing: evaluation preprocessing.
        level_strides: stride of each encoder level, e.g. ``(8, 16, 32, 64)``.
        hidden_dim: transformer width ``d`` (width of queries and encoder maps).
        c1_channels: channels of the stride-4 backbone map C1.
        num_encoder_layers: encoder depth (valid ``enc_layers`` are 1..this).
        num_queries: decoder queries run at inference (top-K can keep at most this many).
    """

    name: str
    family: str
    arch: Mapping[str, Any]
    checkpoint_file: str | None
    checkpoint_sha256: str | None
    box_ap: float | None
    num_classes: int
    class_to_category: tuple[int, ...]
    preprocessing: Preprocessing
    level_strides: tuple[int, ...]
    hidden_dim: int
    c1_channels: int
    num_encoder_layers: int
    num_queries: int | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if len(self.class_to_category) != self.num_classes:
            raise ValueError(
                f"preset {self.name}: class_to_category has {len(self.class_to_category)} "
                f"entries, num_classes is {self.num_classes}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["arch"] = dict(self.arch)
        d["class_to_category"] = list(self.class_to_category)
        d["level_strides"] = list(self.level_strides)
        return d


def default_enc_layer(num_encoder_layers: int) -> int:
    """The encoder layer MaskNet reads by default (1-based): paper Table 15 takes layer 4 of 6,
    generalised to the layer at about two thirds of the depth (3 → 2, 1 → 1)."""
    return max(1, min(int(num_encoder_layers), round(2 * int(num_encoder_layers) / 3)))


def coco91_identity() -> tuple[int, ...]:
    """Slot → category id for official COCO DETR heads: slot ``i`` is category id ``i`` (0 unused).

    COCO category ids run 1..90 with gaps; official DETR-family models use 91 slots indexed by the id
    itself, so the map is the identity (slots that are not COCO ids never match a category).
    """
    return tuple(range(91))


@dataclass
class DetectorOutput:
    """What a frozen detector returns for a padded batch of B images (K kept queries).

    Fields (all tensors on one device; float fields float32, or float16 when read from a cache):

    - ``queries`` [B, K, d] — last-decoder-layer hidden states that feed the heads, sorted by score
      (max sigmoid class probability), descending.
    - ``boxes`` [B, K, 4] — normalised cxcywh w.r.t. the unpadded network-input image
      (``input_hw``); 0 ≤ cx, cy ≤ 1.
    - ``logits`` [B, K, C] — class logits of those queries (scores = sigmoid, max over classes).
    - ``enc_maps`` {layer: [ [B, d, H_l, W_l] per level ]} — encoder memory after the given encoder
      layers (1-based; default layer 4 of 6, paper Table 15), per feature level in the detector's
      level order (highest resolution first). Values beyond ``level_valid_hw`` are padding.
    - ``c1`` [B, C1, H1, W1] — backbone stage-1 output (stride 4), before any input projection.
      Valid region: ``ceil(input_hw / 4)``.
    - ``input_hw`` [B, 2] int64 — unpadded network-input (resized) size (h, w).
    - ``orig_hw`` [B, 2] int64 — original image size (h, w).
    - ``level_valid_hw`` [B, L, 2] int64 — valid (unpadded) size of every encoder level.
    """

    queries: Tensor
    boxes: Tensor
    logits: Tensor
    enc_maps: dict[int, list[Tensor]]
    c1: Tensor
    input_hw: Tensor
    orig_hw: Tensor
    level_valid_hw: Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.queries.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[1])

    @property
    def scores(self) -> Tensor:
        """[B, K] max sigmoid class probability (the ``c_i`` of eq. 2)."""
        return self.logits.float().sigmoid().amax(dim=-1)

    def map(self, fn: Callable[[Tensor], Tensor], *, sizes: Callable[[Tensor], Tensor] | None = None) -> DetectorOutput:
        """A new output with ``fn`` applied to every feature tensor — ``queries``, ``boxes``, ``logits``,
        each map of every ``enc_maps`` layer, ``c1`` — and ``sizes`` to the integer size tensors
        (``input_hw``, ``orig_hw``, ``level_valid_hw``; kept as they are when ``sizes`` is ``None``).

        ``extras`` (per-image side data: ids, damage lists, images) is carried into a new dict, its values
        untouched. For a change of some fields only, use :func:`dataclasses.replace`.
        """
        size = sizes if sizes is not None else (lambda t: t)
        return DetectorOutput(
            queries=fn(self.queries),
            boxes=fn(self.boxes),
            logits=fn(self.logits),
            enc_maps={k: [fn(m) for m in v] for k, v in self.enc_maps.items()},
            c1=fn(self.c1),
            input_hw=size(self.input_hw),
            orig_hw=size(self.orig_hw),
            level_valid_hw=size(self.level_valid_hw),
            extras=dict(self.extras),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DetectorOutput:
        """Move to ``device``; float tensors are cast to ``dtype`` when given."""

        def mv(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        return self.map(mv, sizes=lambda t: t.to(device))

    def select(self, index: Sequence[int] | Tensor) -> DetectorOutput:
        """The sub-batch of the given image indices."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.queries.device)
        return self.map(lambda t: t[idx.to(t.device)], sizes=lambda t: t[idx.to(t.device)])

    def validate(self) -> DetectorOutput:
        """Check shapes, dtypes and invariants; raise ``ValueError`` naming the broken field."""
        q, b, lg = self.queries, self.boxes, self.logits
        if q.dim() != 3:
            raise ValueError(f"queries must be [B,K,d], got {tuple(q.shape)}")
        bsz, k, d = q.shape
        if tuple(b.shape) != (bsz, k, 4):
            raise ValueError(f"boxes must be [B,K,4]=({bsz},{k},4), got {tuple(b.shape)}")
        if lg.dim() != 3 or tuple(lg.shape[:2]) != (bsz, k):
            raise ValueError(f"logits must be [B,K,C] with B,K=({bsz},{k}), got {tuple(lg.shape)}")
        if not self.enc_maps:
            raise ValueError("enc_maps is empty: at least one encoder layer must be returned")
        n_levels = None
        for layer, maps in self.enc_maps.items():
            if not isinstance(layer, int) or layer < 1:
                raise ValueError(f"enc_maps keys are 1-based encoder layer indices, got {layer!r}")
            if n_levels is None:
                n_levels = len(maps)
            if len(maps) != n_levels:
                raise ValueError(f"enc_maps[{layer}] has {len(maps)} levels, expected {n_levels}")
            for lvl, m in enumerate(maps):
                if m.dim() != 4 or m.shape[0] != bsz or m.shape[1] != d:
                    raise ValueError(
                        f"enc_maps[{layer}][{lvl}] must be [B,d,H,W] with B={bsz}, d={d}, got {tuple(m.shape)}"
                    )
        if self.c1.dim() != 4 or self.c1.shape[0] != bsz:
            raise ValueError(f"c1 must be [B,C1,H/4,W/4] with B={bsz}, got {tuple(self.c1.shape)}")
        for name in ("input_hw", "orig_hw"):
            t = getattr(self, name)
            if tuple(t.shape) != (bsz, 2) or t.is_floating_point():
                raise ValueError(f"{name} must be an integer [B,2]=({bsz},2) tensor, got {tuple(t.shape)} {t.dtype}")
        if tuple(self.level_valid_hw.shape) != (bsz, n_levels, 2):
            raise ValueError(
                f"level_valid_hw must be [B,L,2]=({bsz},{n_levels},2), got {tuple(self.level_valid_hw.shape)}"
            )
        if torch.compiler.is_exporting():  # value checks need data a traced graph does not have
            return self
        if k and bool(((b < -1e-3) | (b > 1 + 1e-3)).any()):
            raise ValueError("boxes must be normalised cxcywh in [0, 1]")
        for name in ("queries", "boxes", "logits", "c1"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name} has non-finite values")
        return self


@dataclass
class GTInstances:
    """Ground-truth instances of one image, in the **original image** pixel frame.

    - ``boxes`` [N, 4] float32 absolute xyxy pixels (from the masks where a mask exists).
    - ``labels`` [N] int64 COCO category ids.
    - ``masks`` [N, H0, W0] bool visible-part masks at original resolution.
    - ``iscrowd`` [N] bool; crowd regions are never positives.
    - ``image_id`` COCO image id; ``orig_hw`` (H0, W0).
    """

    boxes: Tensor
    labels: Tensor
    masks: Tensor
    iscrowd: Tensor
    image_id: int
    orig_hw: tuple[int, int]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> GTInstances:
        return GTInstances(
            boxes=self.boxes.to(device),
            labels=self.labels.to(device),
            masks=self.masks.to(device),
            iscrowd=self.iscrowd.to(device),
            image_id=self.image_id,
            orig_hw=self.orig_hw,
        )


@dataclass
class ImageBatch:
    """A preprocessed, zero-padded image batch (what :class:`FrozenDetector` consumes).

    - ``images`` [B, 3, Hp, Wp] float32, normalised; padding is zeros at the bottom/right.
    - ``pad_mask`` [B, Hp, Wp] bool, True at padding.
    - ``input_hw`` [B, 2] int64 resized unpadded size; ``orig_hw`` [B, 2] int64 original size.
    - ``image_ids`` [B] COCO image ids; ``file_names`` their files.
    - ``targets`` GT instances per image, or ``None`` where not loaded.
    """

    images: Tensor
    pad_mask: Tensor
    input_hw: Tensor
    orig_hw: Tensor
    image_ids: list[int]
    file_names: list[str]
    targets: list[GTInstances] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(
            images=self.images.to(device, non_blocking=True),
            pad_mask=self.pad_mask.to(device, non_blocking=True),
            input_hw=self.input_hw,
            orig_hw=self.orig_hw,
            image_ids=list(self.image_ids),
            file_names=list(self.file_names),
            targets=self.targets,
        )


@runtime_checkable
class FrozenDetector(Protocol):
    """What stage 1 (the cache writer) and the online mode need of a frozen detector.

    Implementations are ``nn.Module``s put in ``eval()`` with ``requires_grad_(False)``.
    """

    preset: DetectorPreset

    def detect(self, batch: ImageBatch, *, topk: int = 100, enc_layers: Sequence[int] = (4,)) -> DetectorOutput:
        """Run the detector on a batch; return the top-``topk`` queries and the encoder maps after
        each layer in ``enc_layers`` (1-based), C1 and sizes, as a validated :class:`DetectorOutput`."""
        ...
