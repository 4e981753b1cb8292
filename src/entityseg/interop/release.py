"""The released CropFormer / Mask2Former checkpoints (qqlu/Entity, detectron2) in entityseg.

A release checkpoint is a detectron2 state dict (``.pth`` with ``{"model": ...}``, or ``.pkl``
with numpy arrays) next to the ``config.yaml`` it was trained from. Conversion has three steps:

1. :func:`load_release_config` reads the yaml (``_BASE_`` files resolved relative to it) and
   :func:`net_config_from_release` turns it into :class:`~entityseg.models.cropformer.CropFormer`
   arguments; :func:`test_views_from_release` keeps the release's test-time view settings.
2. :data:`RENAME_RULES` maps every release tensor name to ours (a table of regular expressions,
   tried in order); :data:`IGNORED` lists what is not a network weight (the loss's
   ``empty_weight``, Swin's constant index and mask buffers).
3. :func:`convert_state_dict` checks that every tensor of the network is given exactly once with
   its shape, and reports every missing, unexpected or wrongly shaped tensor in one error.

The written checkpoint carries the network configuration (``entityseg_net``), so ``predict``,
``evaluate`` and ``train model.init_from=...`` rebuild the right network from it alone.
"""

from __future__ import annotations

import ast
import codecs
import collections
import dataclasses
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from entityseg.data.views import ViewConfig
from entityseg.models.checkpoint import (
    LIGHTNING_PREFIX,
    NET_CONFIG_KEY,
    TEST_VIEWS_KEY,
    load_error_reason,
    refused_global,
)
from entityseg.models.cropformer import CropFormer

#: Tensors of a release checkpoint that are not weights of the network.
IGNORED = (
    r"criterion\w*\.empty_weight",  # the loss's no-entity class weight
    r"backbone\..*\.relative_position_index",  # Swin's constant index (timm rebuilds it)
    r"backbone\..*\.attn_mask",  # Swin's shifted-window mask for the pre-training size
    r"backbone\.(head|norm)\.(weight|bias)",  # an ImageNet classifier and its final norm
)

_PD = r"sem_seg_head\.pixel_decoder\."
_PRED = r"sem_seg_head\.predictor\."


@dataclass(frozen=True)
class _Context:
    """What a rename depends on beyond the name: the number of FPN levels of the decoder."""

    num_fpn_levels: int


Rename = str | Callable[[re.Match, _Context], str]

#: ``(release name pattern, entityseg name)``, first full match wins; a string is a ``re``
#: replacement template, a function computes the name (index shifts).
RENAME_RULES: tuple[tuple[str, Rename], ...] = (
    # Swin: the release merges patches at the end of stage i, timm at the start of stage i + 1;
    # the release's per-output LayerNorms norm0..3 are our backbone.out_norms.
    (
        r"backbone\.layers\.(\d+)\.downsample\.(.+)",
        lambda m, _: f"backbone.body.layers_{int(m[1]) + 1}.downsample.{m[2]}",
    ),
    (r"backbone\.layers\.(\d+)\.(.+)", r"backbone.body.layers_\1.\2"),
    (r"backbone\.patch_embed\.(.+)", r"backbone.body.patch_embed.\1"),
    (r"backbone\.norm(\d)\.(.+)", lambda m, _: f"backbone.out_norms.res{int(m[1]) + 2}.{m[2]}"),
    # HorNet: the same module tree as entityseg.models.hornet (timm nests it under "model.")
    (r"backbone\.(downsample_layers|stages)\.(.+)", r"backbone.body.model.\1.\2"),
    # pixel decoder (see entityseg.models.pixel_decoder for the table)
    (_PD + r"transformer\.level_embed", "pixel_decoder.level_embed"),
    (_PD + r"transformer\.encoder\.(.+)", r"pixel_decoder.encoder.\1"),
    (_PD + r"input_proj\.(.+)", r"pixel_decoder.input_proj.\1"),
    (
        _PD + r"adapter_(\d+)\.(weight|norm\..+)",
        lambda m, c: f"pixel_decoder.lateral_convs.{c.num_fpn_levels - int(m[1])}."
        + ("conv.weight" if m[2] == "weight" else m[2]),
    ),
    (
        _PD + r"layer_(\d+)\.(weight|norm\..+)",
        lambda m, c: f"pixel_decoder.output_convs.{c.num_fpn_levels - int(m[1])}."
        + ("conv.weight" if m[2] == "weight" else m[2]),
    ),
    (_PD + r"mask_features\.(.+)", r"pixel_decoder.mask_features.\1"),
    # image-level decoder (shared by the batch level, as released)
    (_PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)",
     r"image_decoder.self_attention.\1.attn.\2"),
    (_PRED + r"transformer_self_attention_layers\.(\d+)\.norm\.(.+)",
     r"image_decoder.self_attention.\1.norm.\2"),
    (_PRED + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)",
     r"image_decoder.cross_attention.\1.attn.\2"),
    (_PRED + r"transformer_cross_attention_layers\.(\d+)\.norm\.(.+)",
     r"image_decoder.cross_attention.\1.norm.\2"),
    (_PRED + r"transformer_ffn_layers\.(\d+)\.(.+)", r"image_decoder.ffn.\1.\2"),
    (_PRED + r"(decoder_norm|class_embed|mask_embed)\.(.+)", r"image_decoder.heads.\1.\2"),
    (_PRED + r"(query_feat|query_embed|level_embed)\.weight", r"image_decoder.\1.weight"),
    (_PRED + r"input_proj\.(\d+)\.(weight|bias)", r"image_decoder.input_proj.\1.\2"),
    # association module Q_b = FFN(SAtt(XAtt(...))): the release's make_3d
    (_PRED + r"make_3d\.enc_crosattn_3d\.(\d+)\.multihead_attn\.(.+)",
     r"association.cross_attention.\1.attn.\2"),
    (_PRED + r"make_3d\.enc_crosattn_3d\.(\d+)\.norm\.(.+)",
     r"association.cross_attention.\1.norm.\2"),
    (_PRED + r"make_3d\.enc_selfattn_3d\.(\d+)\.self_attn\.(.+)",
     r"association.self_attention.\1.attn.\2"),
    (_PRED + r"make_3d\.enc_selfattn_3d\.(\d+)\.norm\.(.+)",
     r"association.self_attention.\1.norm.\2"),
    (_PRED + r"make_3d\.enc_ffn_3d\.(\d+)\.(.+)", r"association.ffn.\1.\2"),
)  # fmt: skip

_LISTED = 12  # names shown per kind of problem


class ReleaseConversionError(ValueError):
    """A release checkpoint or config that does not convert; the message lists every problem."""


# --------------------------------------------------------------------------- config

#: The release's defaults (its ``mask2former/config.py`` and detectron2's) for the keys read
#: here, under a training yaml that may omit them (``cropformer_hornet_3x.yaml`` has no HORNET).
RELEASE_DEFAULTS = {
    "INPUT": {"MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333},
    "ENTITY": {
        "CROP_AREA_RATIO": 0.7,
        "CROP_STRIDE_RATIO": 0.6,
        "CROP_SAMPLE_NUM_TEST": 4,
        "FUSE_NUM_LAYERS": 1,
        "FUSE_ENC_HIDDIEN_DIM": 256,
        "FUSE_ENC_NHEADS": 8,
        "FUSE_ENC_PRE_NORM": False,
        "FUSE_ENC_DIM_FEEDFORWARD": 2048,
    },
    "MODEL": {
        "MASK_FORMER": {
            "NHEADS": 8,
            "DIM_FEEDFORWARD": 2048,
            "DEC_LAYERS": 6,
            "PRE_NORM": False,
            "HIDDEN_DIM": 256,
            "NUM_OBJECT_QUERIES": 100,
        },
        "SEM_SEG_HEAD": {
            "MASK_DIM": 256,
            "TRANSFORMER_ENC_LAYERS": 0,
            "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
            "COMMON_STRIDE": 4,
            "NORM": "GN",
        },
        "SWIN": {
            "PATCH_SIZE": 4,
            "EMBED_DIM": 96,
            "DEPTHS": [2, 2, 6, 2],
            "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7,
            "MLP_RATIO": 4.0,
            "QKV_BIAS": True,
            "QK_SCALE": None,
            "DROP_PATH_RATE": 0.3,
            "APE": False,
            "PATCH_NORM": True,
        },
        "HORNET": {
            "DEPTHS": [2, 3, 18, 2],
            "BASE_DIM": 192,
            "GCONV": [
                "partial(gnconv, order=2, s=1/3)",
                "partial(gnconv, order=3, s=1/3)",
                "partial(gnconv, order=4, s=1/3, h=24, w=13, gflayer=GlobalLocalFilter)",
                "partial(gnconv, order=5, s=1/3, h=12, w=7, gflayer=GlobalLocalFilter)",
            ],
            "DROP_PATH_RATE": 0.6,
        },
    },
}


def load_release_config(path: str | Path) -> dict:
    """A detectron2 yaml as a dict: its ``_BASE_`` chain merged in, over the release's defaults.

    A file that is missing, does not parse, is not a mapping at its top level, or whose
    ``_BASE_`` chain is broken or loops raises ReleaseConversionError in one line naming it.
    """
    return _merge(RELEASE_DEFAULTS, _read_yaml_chain(Path(path)))


def _read_yaml_chain(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The yaml at ``path`` over its ``_BASE_`` files; ``chain``: the files that named it."""
    config = _read_yaml(path)
    base = config.pop("_BASE_", None)
    if base is None:
        return config
    if not isinstance(base, str) or not base:
        raise ReleaseConversionError(f"{path}: _BASE_ must be a file name, not {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ReleaseConversionError(f"{path}: _BASE_ {base} not found ({base_path})")
    chain = (*chain, path)
    if base_path.resolve() in {p.resolve() for p in chain}:
        loop = " -> ".join(p.name for p in (*chain, base_path))
        raise ReleaseConversionError(f"{path}: _BASE_ loop {loop}")
    return _merge(_read_yaml_chain(base_path, chain), config)


def _read_yaml(path: Path) -> dict:
    """One yaml file's mapping (an empty file is an empty one)."""
    if not path.is_file():
        raise ReleaseConversionError(f"{path}: config not found")
    try:
        config = yaml.safe_load(path.read_bytes())
    except OSError as err:
        raise ReleaseConversionError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = problem + where if problem else load_error_reason(err)
        raise ReleaseConversionError(f"{path}: not valid yaml ({detail})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ReleaseConversionError(
            f"{path}: the top level is a {type(config).__name__}, not a mapping of config keys"
        )
    return config


def _merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_gnconv(spec: str) -> dict:
    """``partial(gnconv, order=4, s=1/3, h=24, w=13, gflayer=GlobalLocalFilter)`` -> its keywords.

    Read with ``ast`` (numbers, names and arithmetic only), never evaluated.
    """
    try:
        call = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as err:
        raise ReleaseConversionError(f"HorNet block {spec!r}: not a call ({err.msg})") from None
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "partial"
        and [getattr(a, "id", None) for a in call.args] == ["gnconv"]
    ):
        raise ReleaseConversionError(f"HorNet block {spec!r}: expected partial(gnconv, ...)")
    return {kw.arg: _literal(kw.value, spec) for kw in call.keywords}


def _literal(node: ast.expr, spec: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.Name):  # a class name such as GlobalLocalFilter
        return node.id
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand, spec)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div | ast.Mult):
        left, right = _literal(node.left, spec), _literal(node.right, spec)
        return left / right if isinstance(node.op, ast.Div) else left * right
    raise ReleaseConversionError(f"HorNet block {spec!r}: cannot read {ast.unparse(node)!r}")


_SWIN_NAMES = {  # (embed dim, depths, window) -> the timm model with these defaults
    (96, (2, 2, 6, 2), 7): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), 7): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), 7): "swin_base_patch4_window7_224",
    (128, (2, 2, 18, 2), 12): "swin_base_patch4_window12_384",
    (192, (2, 2, 18, 2), 7): "swin_large_patch4_window7_224",
    (192, (2, 2, 18, 2), 12): "swin_large_patch4_window12_384",
}
_HORNET_NAMES = {64: "hornet_tiny_gf", 96: "hornet_small_gf", 128: "hornet_base_gf"}


def net_config_from_release(config: Mapping) -> dict:
    """``CropFormer(**result)`` arguments for a release config (see ``conf/model``)."""
    try:
        return _net_config(config)
    except KeyError as err:
        raise ReleaseConversionError(f"the release config has no {err.args[0]} key") from None


def _net_config(config: Mapping) -> dict:
    model = config["MODEL"]
    former, head, entity = model["MASK_FORMER"], model["SEM_SEG_HEAD"], config.get("ENTITY", {})
    arch = model["META_ARCHITECTURE"]
    if arch not in ("CropFormer", "MaskFormer"):
        raise ReleaseConversionError(f"MODEL.META_ARCHITECTURE={arch}: not CropFormer/MaskFormer")
    if head["NUM_CLASSES"] != 1:
        raise ReleaseConversionError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={head['NUM_CLASSES']}: not an entity (1-class) model"
        )
    in_features = list(head["IN_FEATURES"])
    encoder_features = list(head["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"])
    association = {"enabled": arch == "CropFormer", "share_decoder": True}
    if arch == "CropFormer":
        if entity["FUSE_ENC_HIDDIEN_DIM"] != former["HIDDEN_DIM"]:
            raise ReleaseConversionError(
                "ENTITY.FUSE_ENC_HIDDIEN_DIM must equal MODEL.MASK_FORMER.HIDDEN_DIM"
            )
        association.update(
            num_layers=entity["FUSE_NUM_LAYERS"],
            num_heads=entity["FUSE_ENC_NHEADS"],
            ffn_dim=entity["FUSE_ENC_DIM_FEEDFORWARD"],
            pre_norm=entity["FUSE_ENC_PRE_NORM"],
        )
    return {
        "backbone": {**_backbone_config(model), "out_features": in_features},
        "pixel_decoder": {
            "transformer_in_features": encoder_features,
            "conv_dim": head["CONVS_DIM"],
            "mask_dim": head["MASK_DIM"],
            "num_layers": head["TRANSFORMER_ENC_LAYERS"],
            "num_heads": former["NHEADS"],  # the release's encoder uses the decoder's heads
            "num_points": 4,  # fixed in the release
            "ffn_dim": 1024,  # fixed in the release ("use 1024 for deformable encoder")
            "norm": head["NORM"],
            "common_stride": head["COMMON_STRIDE"],
        },
        "decoder": {
            "hidden_dim": former["HIDDEN_DIM"],
            "num_queries": former["NUM_OBJECT_QUERIES"],
            "num_heads": former["NHEADS"],
            "ffn_dim": former["DIM_FEEDFORWARD"],
            "num_layers": former["DEC_LAYERS"] - 1,  # + the prediction on learnable queries
            "pre_norm": former["PRE_NORM"],
        },
        "association": association,
    }


def _backbone_config(model: Mapping) -> dict:
    name = model["BACKBONE"]["NAME"]
    if name == "D2SwinTransformer":
        swin = model["SWIN"]
        unsupported = {
            "APE": (swin["APE"], False),
            "PATCH_NORM": (swin["PATCH_NORM"], True),
            "QKV_BIAS": (swin["QKV_BIAS"], True),
            "QK_SCALE": (swin["QK_SCALE"], None),
            "PATCH_SIZE": (swin["PATCH_SIZE"], 4),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ReleaseConversionError(f"MODEL.SWIN.{key}={value}: only {supported} is")
        shape = (swin["EMBED_DIM"], tuple(swin["DEPTHS"]), swin["WINDOW_SIZE"])
        return {
            "name": _SWIN_NAMES.get(shape, "swin_tiny_patch4_window7_224"),
            "embed_dim": swin["EMBED_DIM"],
            "depths": list(swin["DEPTHS"]),
            "num_heads": list(swin["NUM_HEADS"]),
            "window_size": swin["WINDOW_SIZE"],
            "mlp_ratio": swin["MLP_RATIO"],
            "drop_path_rate": swin["DROP_PATH_RATE"],
            "out_norm": True,
        }
    if name == "D2HorNet":
        hornet = model["HORNET"]
        blocks = [parse_gnconv(spec) for spec in hornet["GCONV"]]
        return {
            "name": _HORNET_NAMES.get(hornet["BASE_DIM"], "hornet_large_gf"),
            "base_dim": hornet["BASE_DIM"],
            "depths": list(hornet["DEPTHS"]),
            "orders": [b["order"] for b in blocks],
            "scale": blocks[0].get("s", 1.0),
            "gf_sizes": [
                [b["h"], b["w"]] if b.get("gflayer") == "GlobalLocalFilter" else None
                for b in blocks
            ],
            "drop_path_rate": hornet["DROP_PATH_RATE"],
            "out_norm": True,
            "out_norm_eps": 1e-6,  # the release's HorNet output norms
        }
    raise ReleaseConversionError(
        f"MODEL.BACKBONE.NAME={name}: only D2SwinTransformer and D2HorNet are supported"
    )


def test_views_from_release(config: Mapping) -> dict:
    """The release's test-time views: sizes, crops and normalisation (for ``compat=release``)."""
    entity, inputs, model = config.get("ENTITY", {}), config["INPUT"], config["MODEL"]
    return {
        "short_size": int(inputs["MIN_SIZE_TEST"]),
        "max_size": int(inputs["MAX_SIZE_TEST"]),
        "crop_delta": float(entity.get("CROP_AREA_RATIO", 0.7)),
        "crop_stride": float(entity.get("CROP_STRIDE_RATIO", 0.6)),
        "num_crops": int(entity.get("CROP_SAMPLE_NUM_TEST", 4))
        if model["META_ARCHITECTURE"] == "CropFormer"
        else 0,
        "pixel_mean": [float(v) for v in model["PIXEL_MEAN"]],
        "pixel_std": [float(v) for v in model["PIXEL_STD"]],
    }


# --------------------------------------------------------------------------- weights


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes call it, for latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}, not latin1")
    return codecs.encode(text, "latin1")


#: The only globals a detectron2 ``.pkl`` may name, and what each builds: numpy's own pickles
#: of arrays (``_reconstruct``; ``_frombuffer`` from protocol 5) and scalars, dtypes,
#: ``OrderedDict`` and protocol 2's bytes. numpy 1.x writes ``numpy.core.*``, 2.x
#: ``numpy._core.*``: both are read without importing either (the functions are taken from
#: what this numpy's pickles call).
PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    **{
        (f"numpy.{core}.{module}", name): function
        for core in ("core", "_core")
        for module, name, function in (
            ("multiarray", "_reconstruct", np.ndarray.__reduce__(np.zeros(1))[0]),
            ("multiarray", "scalar", np.float32(0).__reduce__()[0]),
            ("numeric", "_frombuffer", np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]),
        )
    },
}


class _ReleaseUnpickler(pickle.Unpickler):
    """An unpickler that builds :data:`PICKLE_GLOBALS` and refuses every other global (a
    ``.pkl`` that names ``os.system`` or ``builtins.exec`` runs nothing)."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles' byte strings
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return PICKLE_GLOBALS[module, name]
        except KeyError:
            raise ReleaseConversionError(
                f"{self.path}: refused to unpickle {module}.{name}: a detectron2 .pkl holds "
                "only numpy arrays, dicts, lists and scalars"
            ) from None


def _read_pth(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a refusal or an unreadable file in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails anywhere in torch.load
        refused = refused_global(err)
        if refused:
            raise ReleaseConversionError(
                f"{path}: refused to unpickle {refused}: a release .pth holds only tensors, "
                "dicts, lists and numbers"
            ) from None
        raise ReleaseConversionError(
            f"{path}: not a readable PyTorch checkpoint ({load_error_reason(err)})"
        ) from None


def _read_pkl(path: Path) -> Any:
    """A detectron2 ``.pkl`` through :class:`_ReleaseUnpickler`; failures in one line."""
    with path.open("rb") as f:
        try:
            return _ReleaseUnpickler(f, path).load()
        except ReleaseConversionError:
            raise
        except Exception as err:  # a damaged pickle fails in any opcode's own way
            raise ReleaseConversionError(
                f"{path}: not a readable .pkl ({load_error_reason(err)})"
            ) from None


def read_release_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a release ``.pth`` (``{"model": ...}``) or detectron2 ``.pkl`` file.

    Neither runs code from the file: a ``.pkl`` is unpickled with only numpy arrays and
    scalars, dicts and lists allowed (:data:`PICKLE_GLOBALS`), a ``.pth`` by
    ``torch.load(weights_only=True)``. A file that names anything else, or does not read
    (empty, truncated, not a checkpoint), raises ReleaseConversionError in one line naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ReleaseConversionError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise ReleaseConversionError(f"{path}: empty file, not a checkpoint")
    content = _read_pkl(path) if path.suffix == ".pkl" else _read_pth(path)
    state = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(state, dict):
        raise ReleaseConversionError(f"{path}: no state dict (expected {{'model': ...}})")
    tensors = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise ReleaseConversionError(f"{path}: {key} is a {value.dtype} array, not numbers")
            value = torch.from_numpy(np.require(value, requirements=["C", "W"]))
        if isinstance(value, torch.Tensor):
            tensors[key] = value
    return tensors


def release_name(name: str, context: _Context) -> str | None:
    """Our name for a release tensor, or None when no rule covers it."""
    for pattern, rename in RENAME_RULES:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(rename) if isinstance(rename, str) else rename(match, context)
    return None


def name_table(release_names: Iterable[str], net_config: Mapping) -> dict[str, str]:
    """Release name -> our name for every release tensor a rule covers (gradients, optimiser
    settings and other per-parameter records of the release, read in our names)."""
    context = _Context(num_fpn_levels(net_config))
    table = {name: release_name(name, context) for name in release_names}
    return {name: ours for name, ours in table.items() if ours is not None}


def convert_state_dict(
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, torch.Size],
    num_fpn_levels: int,
    allow_missing: tuple[str, ...] = (),
    origin: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename a release state dict to ours and check it against the network's shapes.

    Args:
        source: release tensors.
        target_shapes: name -> shape of every tensor of the entityseg network.
        num_fpn_levels: FPN levels of the pixel decoder (renames ``adapter_k`` / ``layer_k``).
        allow_missing: name prefixes of our network that the source may lack (e.g.
            ``("association.",)`` for a Mask2Former checkpoint used to start a CropFormer).
        origin: the file, for the error message.

    Raises:
        ReleaseConversionError: listing every unmapped, duplicated, unexpected, missing and
            wrongly shaped tensor.
    """
    context = _Context(num_fpn_levels)
    converted: dict[str, torch.Tensor] = {}
    kinds = ("no rule for", "unexpected", "duplicate", "wrong shape")
    problems: dict[str, list[str]] = {kind: [] for kind in kinds}
    mapped = set()
    for name, tensor in source.items():
        if any(re.fullmatch(p, name) for p in IGNORED):
            continue
        ours = release_name(name, context)
        if ours is None:
            problems["no rule for"].append(name)
        elif ours not in target_shapes:
            problems["unexpected"].append(f"{name} (-> {ours})")
        elif ours in mapped:
            problems["duplicate"].append(f"{name} (-> {ours})")
        elif tuple(tensor.shape) != tuple(target_shapes[ours]):
            mapped.add(ours)
            problems["wrong shape"].append(
                f"{name} {list(tensor.shape)} (-> {ours} {list(target_shapes[ours])})"
            )
        else:
            mapped.add(ours)
            converted[ours] = tensor
    problems["missing"] = [
        k for k in target_shapes if k not in mapped and not k.startswith(allow_missing)
    ]
    listed = [
        f"{len(names)} {kind}: " + ", ".join(names[:_LISTED])
        + (f", ... and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
        for kind, names in problems.items()
        if names
    ]  # fmt: skip
    if listed:
        raise ReleaseConversionError(f"{origin}: does not convert: " + "; ".join(listed))
    return converted


def network_shapes(net_config: Mapping) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the network, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = CropFormer(**net_config)
    return {k: v.shape for k, v in net.state_dict().items()}


def num_fpn_levels(net_config: Mapping) -> int:
    """FPN levels of the pixel decoder: backbone outputs the deformable encoder does not take."""
    features = net_config["backbone"].get("out_features", ("res2", "res3", "res4", "res5"))
    return len(set(features) - set(net_config["pixel_decoder"]["transformer_in_features"]))


def convert_release_weights(
    weights_path: str | Path, net_config: Mapping, allow_missing: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a release checkpoint in our names, checked against the network of
    ``net_config`` (float32, contiguous), and whether the file held a backbone only.
    ``allow_missing``: parts of our network the file may lack (``("association.",)``: a
    Mask2Former file for a CropFormer network).

    A file whose names carry no ``backbone.`` / ``sem_seg_head.`` prefix is taken as the
    release's backbone-only pre-training (e.g. a converted ImageNet Swin): it fills the
    backbone, and the rest of the network starts fresh when fine-tuning (``init_from``).
    """
    source = read_release_weights(weights_path)
    backbone_only = not any(k.startswith(("backbone.", "sem_seg_head.")) for k in source)
    if backbone_only:
        source = {f"backbone.{k}": v for k, v in source.items()}
    state = convert_state_dict(
        source,
        network_shapes(net_config),
        num_fpn_levels(net_config),
        allow_missing=("pixel_decoder.", "image_decoder.", "association.", "backbone.out_norms.")
        if backbone_only
        else allow_missing,
        origin=str(weights_path),
    )
    return {k: v.float().contiguous() for k, v in state.items()}, backbone_only


def convert_release(
    weights_path: str | Path, config_path: str | Path, out_path: str | Path
) -> dict[str, Any]:
    """Convert a release checkpoint with its yaml; write an entityseg checkpoint; return a
    summary (:func:`convert_release_weights` converts the tensors).

    ``out_path`` is written through a temporary file renamed over it, so it is always either
    the previous file or the complete new checkpoint (nothing is written when a step fails).
    """
    config = load_release_config(config_path)
    net_config = net_config_from_release(config)
    state, backbone_only = convert_release_weights(weights_path, net_config)
    checkpoint = {
        "state_dict": {LIGHTNING_PREFIX + k: v for k, v in state.items()},
        NET_CONFIG_KEY: net_config,
        TEST_VIEWS_KEY: test_views_from_release(config),
        "entityseg_source": {
            "weights": str(weights_path),
            "config": str(config_path),
            "backbone_only": backbone_only,
        },
    }
    # imported here: entityseg.atomic_checkpoint imports Lightning, which reading needs not
    from entityseg.atomic_checkpoint import save_atomically

    save_atomically(checkpoint, out_path)  # a killed conversion leaves no half file
    return {
        "tensors": len(state),
        "values": sum(v.numel() for v in state.values()),
        "backbone_only": backbone_only,
        "architecture": config["MODEL"]["META_ARCHITECTURE"],
        "backbone": net_config["backbone"]["name"],
    }


def release_view_keys(test_views: Mapping) -> dict:
    """The test-view keys (``ViewConfig.TEST_KEYS``) of a converted release checkpoint's
    stored test settings (:func:`test_views_from_release`): the release config's sizes, crops
    and normalisation. How its crop views are sized is :func:`release_sized`'s to decide."""
    if test_views["num_crops"] not in (0, 4) or test_views["crop_stride"] != 0.6:
        raise ReleaseConversionError(
            f"release test crops {test_views['num_crops']} at stride {test_views['crop_stride']}:"
            " only the released 4 crops on the 0.6-stride grid (fixed4) are reproduced"
        )
    return {
        "test_short_size": test_views["short_size"],
        "test_max_size": test_views["max_size"],
        "size_scale": 1.0,
        "crop_delta": test_views["crop_delta"],
        "test_crop_layout": "fixed4",
        "pixel_mean": list(test_views["pixel_mean"]),
        "pixel_std": list(test_views["pixel_std"]),
    }


def release_sized(views: ViewConfig) -> ViewConfig:
    """``views`` with their crops sized as the release sizes them at test time, under
    ``inference.compat=release``: each crop view resized by its own shortest edge, its long
    side uncapped, so a crop view can be larger than the full view (``crop_resize="own"``).

    The one place that decides the release's test-view sizing; an explicit
    ``test_crop_resize`` given by a user is applied after it.
    """
    return dataclasses.replace(views, crop_resize="own")
