"""The frozen stage 0 a ``--c1 recompute`` cache carries: C1 (stride 4) recomputed from the image.

Format and why. Stage 0 (the backbone's stem and first stage, whatever produced ``DetectorOutput.c1``)
is traced once with :func:`torch.export.export` (dynamic H and W) and stored inside the store as two
files: ``stage0/program.json`` — a *data-only* list of ATen calls (op name, arguments as JSON scalars,
lists and references to earlier results or to named weights) — and ``stage0/weights.pt`` — a flat
``{name: tensor}`` dict. The manifest records the sha256 of both.

``torch.export.save``/``load`` are not used for storage: ``load`` unpickles parts of the archive with
``torch.load(weights_only=False)`` and ``pickle.loads`` (chosen by flags inside the file), and its graph
deserializer resolves any ``torch.*`` attribute path as a call target and parses shape expressions with
``sympy.sympify`` (an ``eval``); a hostile store could run code through each of these. Here, loading
reads the weights with ``torch.load(weights_only=True)`` (tensors only), and :class:`Stage0Program`
executes the node list itself: every op must be in :data:`ALLOWED_OPS` (pure tensor ATen ops and
``operator`` arithmetic for dynamic sizes), every argument is plain data; nothing from the file is
imported, evaluated or unpickled. Because the stored calls are the exact ATen ops the detector ran
(no decomposition), C1 recomputed on the same input is bit-identical to the detector's in float32
(checked at write time by :func:`export_stage0` on two input sizes).

This module never imports a detector: the writer hands it the stage-0 ``nn.Module``
(``Backbone.stage0()``), the engine loads the program from the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mfdetr.errors import MfdetrError

FORMAT = "mfdetr-stage0"
PROGRAM_FILE = "stage0/program.json"
WEIGHTS_FILE = "stage0/weights.pt"

#: ATen ops (``name.overload``) a stored stage 0 may call: pure tensor math of conv / BN / pooling /
#: token backbones. Anything else is refused at export and at load.
ALLOWED_ATEN = frozenset(
    """
    conv2d.default convolution.default batch_norm.default _native_batch_norm_legit_no_training.default relu.default
    relu_.default gelu.default silu.default sigmoid.default tanh.default max_pool2d.default
    max_pool2d_with_indices.default avg_pool2d.default adaptive_avg_pool2d.default add.Tensor add_.Tensor
    add.Scalar sub.Tensor sub.Scalar mul.Tensor mul_.Tensor mul.Scalar div.Tensor div.Scalar rsqrt.default
    sqrt.default pow.Tensor_Scalar mean.dim sum.dim_IntList layer_norm.default group_norm.default linear.default
    matmul.default bmm.default softmax.int _softmax.default view.default reshape.default permute.default
    transpose.int contiguous.default clone.default flatten.using_ints unsqueeze.default squeeze.dim expand.default
    slice.Tensor select.int cat.default stack.default split.Tensor chunk.default pad.default
    constant_pad_nd.default roll.default to.dtype _to_copy.default sym_size.int dropout.default unbind.int
    masked_fill.Scalar index.Tensor index_select.default gather.default split_with_sizes.default unfold.default
    t.default addmm.default baddbmm.default _unsafe_view.default where.self abs.default exp.default log.default
    amax.default max.dim eq.Scalar ne.Scalar gt.Scalar lt.Scalar zeros.default new_zeros.default zeros_like.default
    ones_like.default full_like.default full.default arange.default arange.start fill_.Scalar
""".split()
)
#: Python-level calls in an exported graph: result indexing and integer arithmetic on dynamic sizes.
PY_OPS: dict[str, Callable[..., Any]] = {
    "getitem": operator.getitem,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "neg": operator.neg,
}
#: exported bookkeeping calls that compute nothing (dropped when converting)
_SKIP = frozenset({"_assert_tensor_metadata.default"})
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.bool,
        torch.uint8,
    )
}
_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return "aten." + target.__name__.split(".", 1)[0] + "." + target._overloadname
    name = getattr(target, "__name__", repr(target))
    if getattr(target, "__module__", None) in ("_operator", "operator") and name in PY_OPS:
        return name
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '?')}.{name}"


def _encode(v: Any) -> Any:
    if isinstance(v, torch.fx.Node):
        return {"ref": v.name}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_encode(x) for x in v]
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": "input"}  # runs on the device of the images
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"layout": "strided"}
    raise MfdetrError(f"stage 0 cannot be stored: argument {v!r} of type {type(v).__name__} is not plain data")


def program_from_export(ep: torch.export.ExportedProgram) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The data-only program and its weights of an exported stage 0 (one image-batch input)."""
    from torch.export.graph_signature import InputKind

    sig = ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    weights: dict[str, Tensor] = {}
    user_inputs: list[str] = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(spec.arg.name)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            weights[spec.arg.name] = state[spec.target].detach().clone().contiguous()
        else:
            raise MfdetrError(f"stage 0 cannot be stored: graph input of kind {spec.kind.name}")
    if len(user_inputs) != 1:
        raise MfdetrError(f"stage 0 must take exactly one input (the images), the export has {user_inputs}")
    nodes: list[dict[str, Any]] = []
    output: Any = None
    for n in ep.graph.nodes:
        if n.op == "call_function":
            op = _op_name(n.target)
            if op.removeprefix("aten.") in _SKIP:
                continue
            if not (op in PY_OPS or (op.startswith("aten.") and op[5:] in ALLOWED_ATEN)):
                raise MfdetrError(
                    f"stage 0 calls {op}, which a stored stage 0 may not use "
                    "(only plain tensor ops are allowed); use --c1 store for this detector"
                )
            nodes.append(
                {
                    "name": n.name,
                    "op": op,
                    "args": _encode(list(n.args)),
                    "kwargs": {k: _encode(v) for k, v in n.kwargs.items()},
                }
            )
        elif n.op == "output":
            outs = n.args[0]
            if not isinstance(outs, list | tuple) or len(outs) != 1:
                raise MfdetrError("stage 0 must return exactly one tensor (C1)")
            output = _encode(outs[0])
        elif n.op != "placeholder":
            raise MfdetrError(f"stage 0 cannot be stored: graph node kind {n.op!r}")
    program = {
        "format": FORMAT,
        "version": 1,
        "input": user_inputs[0],
        "weights": sorted(weights),
        "nodes": nodes,
        "output": output,
    }
    return program, weights


class Stage0Program(nn.Module):
    """Runs a stored stage-0 program: ``images [B, 3, H, W] float32 -> C1 [B, C1, ceil(H/4), ceil(W/4)]``.

    Frozen (weights are buffers). Build with :meth:`from_bytes` / :func:`load_stage0`; every op and
    argument is checked when loading (:meth:`check`), so running never meets an unknown call.
    """

    def __init__(self, program: Mapping[str, Any], weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.program = dict(program)
        self.check(self.program, weights)
        self._names = list(program["weights"])
        for i, name in enumerate(self._names):
            self.register_buffer(f"w{i}", weights[name].detach().clone())
        self._ops = {nd["name"]: self._resolve(nd["op"]) for nd in program["nodes"]}

    @staticmethod
    def _resolve(op: str) -> Callable[..., Any]:
        if op in PY_OPS:
            return PY_OPS[op]
        name, overload = op.removeprefix("aten.").split(".")
        return getattr(getattr(torch.ops.aten, name), overload)

    @staticmethod
    def check(program: Mapping[str, Any], weights: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless ``program`` is a well-formed, allowed stage-0 program."""
        if program.get("format") != FORMAT or program.get("version") != 1:
            raise ValueError(f"not a {FORMAT} v1 program")
        names = program.get("weights")
        if not isinstance(names, list) or set(names) != set(weights):
            raise ValueError("the weights file does not hold exactly the program's weights")
        if not all(isinstance(t, Tensor) for t in weights.values()):
            raise ValueError("the weights file holds something other than tensors")
        known = {program.get("input"), *names}

        def arg_ok(v: Any) -> bool:
            if v is None or isinstance(v, bool | int | float | str):
                return True
            if isinstance(v, list):
                return all(arg_ok(x) for x in v)
            if isinstance(v, dict) and len(v) == 1:
                ((k, x),) = v.items()
                return (
                    (k == "ref" and x in known)
                    or (k == "dtype" and x in _DTYPES)
                    or (k == "memory_format" and x in _FORMATS)
                    or (k, x) in (("device", "input"), ("layout", "strided"))
                )
            return False

        for nd in program.get("nodes", []):
            op = nd.get("op")
            if not isinstance(op, str) or not (op in PY_OPS or (op.startswith("aten.") and op[5:] in ALLOWED_ATEN)):
                raise ValueError(f"op {op!r} is not allowed in a stage-0 program")
            if not (
                arg_ok(nd.get("args"))
                and isinstance(nd.get("kwargs"), dict)
                and all(isinstance(k, str) and arg_ok(v) for k, v in nd["kwargs"].items())
                and isinstance(nd.get("args"), list)
            ):
                raise ValueError(f"node {nd.get('name')!r}: arguments are not plain data or refer to unknown values")
            if not isinstance(nd.get("name"), str) or nd["name"] in known:
                raise ValueError(f"node name {nd.get('name')!r} is missing or repeated")
            known.add(nd["name"])
        if not arg_ok(program.get("output")) or not isinstance(program.get("output"), dict):
            raise ValueError("the program's output is not a reference to a computed value")

    def forward(self, images: Tensor) -> Tensor:
        env: dict[str, Any] = {self.program["input"]: images}
        env.update({name: getattr(self, f"w{i}") for i, name in enumerate(self._names)})

        def val(v: Any) -> Any:
            if isinstance(v, list):
                return [val(x) for x in v]
            if isinstance(v, dict):
                ((k, x),) = v.items()
                return {
                    "ref": lambda: env[x],
                    "dtype": lambda: _DTYPES[x],
                    "device": lambda: images.device,
                    "memory_format": lambda: _FORMATS[x],
                    "layout": lambda: torch.strided,
                }[k]()
            return v

        for nd in self.program["nodes"]:
            env[nd["name"]] = self._ops[nd["name"]](*val(nd["args"]), **{k: val(v) for k, v in nd["kwargs"].items()})
        return val(self.program["output"])

    @classmethod
    def from_bytes(cls, program: bytes, weights: bytes) -> Stage0Program:
        """Parse the two stored files (JSON; tensors through ``torch.load(weights_only=True)``)."""
        prog = json.loads(program.decode("utf-8"))
        w = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        if not isinstance(w, dict):
            raise ValueError("the weights file is not a dict of tensors")
        return cls(prog, w)


def export_stage0(module: nn.Module, example: Tensor) -> tuple[bytes, bytes]:
    """Export ``module`` (frozen stage 0, ``images -> C1``) as the two stored files' bytes.

    Traced on a batch of two (``example`` and its mirror image) with batch, H and W dynamic. Verifies the
    stored program against ``module`` on ``example`` and on a smaller batch of two of another aspect: both
    must match bit for bit, else :class:`MfdetrError` (then use ``--c1 store``).
    """
    module = module.eval()
    # a batch of 2 so that no size is 0/1-specialised: batch, H and W stay dynamic in the program
    pair = torch.cat([example[:1], example[:1].flip(-1)])
    dims = ({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)
    with torch.no_grad():
        ep = torch.export.export(module, (pair,), dynamic_shapes=dims)
    program, weights = program_from_export(ep)
    prog_bytes = (json.dumps(program, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
    buf = io.BytesIO()
    torch.save({k: weights[k].cpu() for k in sorted(weights)}, buf)
    w_bytes = buf.getvalue()
    stored = Stage0Program.from_bytes(prog_bytes, w_bytes).to(example.device)
    h, w = example.shape[-2:]
    for x in (example[:1], pair[..., : max(8, h * 2 // 3 + 1), : max(8, w // 2 + 3)].contiguous()):
        with torch.inference_mode():
            want, got = module(x), stored(x)
        if want.shape != got.shape or not torch.equal(want, got):
            raise MfdetrError(
                f"the exported stage 0 does not reproduce C1 at input {tuple(x.shape[-2:])} "
                "(shape-specialised ops?); use --c1 store for this detector"
            )
    return prog_bytes, w_bytes


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def load_stage0(store: str | Path, entry: Mapping[str, Any]) -> Stage0Program:
    """The stage 0 of a recompute store (``entry`` = the manifest's ``c1.stage0``), its files checked
    against the manifest's sha256; a missing, changed or malformed file is a one-line error."""
    from mfdetr.cache.location import store_location

    store = store_location(store)  # type: ignore[assignment]
    raw = {}
    for key in ("program", "weights"):
        path = store / entry[key]
        try:
            raw[key] = path.read_bytes()
        except OSError as e:
            raise MfdetrError(f"cannot read the cache's stored stage 0 ({e.strerror})", path=path) from None
        if sha256_bytes(raw[key]) != entry[f"{key}_sha256"]:
            raise MfdetrError("sha256 differs from the cache manifest (the stored stage 0 was changed)", path=path)
    try:
        return Stage0Program.from_bytes(raw["program"], raw["weights"])
    except Exception as e:  # noqa: BLE001 - any malformed content is the same user-facing problem
        raise MfdetrError(
            f"invalid stored stage 0 ({type(e).__name__}: {str(e)[:160]})", path=store / entry["program"]
        ) from None


__all__ = [
    "ALLOWED_ATEN",
    "PROGRAM_FILE",
    "PY_OPS",
    "WEIGHTS_FILE",
    "Stage0Program",
    "export_stage0",
    "load_stage0",
    "program_from_export",
    "sha256_bytes",
]
