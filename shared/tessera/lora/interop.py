"""Adapter files other tools read and write: diffusers' and kohya's LoRA layouts, both ways.

Export: `export_adapter(adapter, "diffusers" | "kohya")` gives safetensors bytes that
`StableDiffusionPipeline.load_lora_weights` (and kohya-style tools) load with the same UNet
update Tessera applies. diffusers' layout is peft's keys under `unet.`; since peft-format files
without alphas mean `alpha = rank` to every diffusers version, the scale `alpha / rank` is
folded into B and the file's `lora_adapter_metadata` says `lora_alpha = r`, so old and new
loaders agree. kohya's layout keeps A, B and one `.alpha` per module, which means the same.

Import: `import_adapter(data, spec)` detects the layout (Tessera, diffusers/peft, diffusers'
older attention-processor keys, kohya), maps names onto the base model's modules, pads
per-module ranks to the largest with zero rows, folds per-module scales into B when they
differ, fills modules the file does not adapt with zeros, and returns the adapter that
Tessera's own upload validator accepts. Every refusal is a `LoraFileError` naming the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn

from tessera.lora.adapter import (
    A_SUFFIX,
    B_SUFFIX,
    TARGET_PRESETS,
    LoraAdapter,
    LoraSpec,
    pair_shapes,
)
from tessera.lora.files import (
    FILE_FORMAT,
    LoraFileError,
    adapter_to_bytes,
    read_header,
    validate_adapter_bytes,
)

if TYPE_CHECKING:
    import torch

ExportFormat = Literal["diffusers", "kohya"]
Layout = Literal["tessera", "diffusers", "diffusers-attn-procs", "kohya"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("diffusers", "kohya")

DIFFUSERS_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
_LDM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")
_UNSUPPORTED_VARIANTS = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector")
_KOHYA_KEY = re.compile(
    r"^lora_unet_(?P<flat>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")
_ATTN_PROCS_KEY = re.compile(
    r"^(?P<base>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_PART = {
    "lora_down.weight": "A",
    "lora_up.weight": "B",
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "down": "A",
    "up": "B",
    "alpha": "alpha",
}


@dataclass(frozen=True)
class ImportedAdapter:
    """An imported adapter with what the import did: layout, zero-filled and dropped keys."""

    adapter: LoraAdapter
    layout: Layout
    filled: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


@dataclass
class _Pair:
    """One module's tensors as found in a foreign file, with the keys they came from."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    alpha: float | None = None
    a_key: str = ""
    b_key: str = ""


# -- export ---------------------------------------------------------------------------------


def export_adapter(adapter: LoraAdapter, fmt: ExportFormat, *, dtype: str = "float16") -> bytes:
    """Safetensors bytes of `adapter` in diffusers' or kohya's layout, tensors cast to `dtype`."""
    if fmt == "diffusers":
        return export_diffusers(adapter, dtype=dtype)
    if fmt == "kohya":
        return export_kohya(adapter, dtype=dtype)
    raise ValueError(f"unknown export format {fmt!r}; known formats: {', '.join(EXPORT_FORMATS)}")


def export_diffusers(adapter: LoraAdapter, *, dtype: str = "float16") -> bytes:
    """peft keys under `unet.`, the scale folded into B, `lora_adapter_metadata` with alpha = r."""
    tensors: dict[str, torch.Tensor] = {}
    for module, a, b in adapter.pairs():
        tensors[f"{DIFFUSERS_PREFIX}{module}{A_SUFFIX}"] = a
        tensors[f"{DIFFUSERS_PREFIX}{module}{B_SUFFIX}"] = b.float() * adapter.scale
    config = {
        f"{DIFFUSERS_PREFIX}r": adapter.rank,
        f"{DIFFUSERS_PREFIX}lora_alpha": adapter.rank,
        f"{DIFFUSERS_PREFIX}target_modules": adapter.modules,
    }
    metadata = {
        "format": "pt",
        ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True),
        **_provenance(adapter),
    }
    return _save(tensors, metadata, dtype)


def export_kohya(adapter: LoraAdapter, *, dtype: str = "float16") -> bytes:
    """`lora_unet_<module with _>.lora_down/.lora_up.weight` and a float32 `.alpha` per module."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for module, a, b in adapter.pairs():
        name = kohya_name(module)
        tensors[f"{name}.lora_down.weight"] = a
        tensors[f"{name}.lora_up.weight"] = b
    alphas = {
        f"{kohya_name(module)}.alpha": torch.tensor(float(adapter.alpha))
        for module in adapter.modules
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": repr(float(adapter.alpha)),
        **_provenance(adapter),
    }
    return _save(tensors, metadata, dtype, exact=alphas)


def kohya_name(module: str) -> str:
    """kohya's name of a UNet module path: `lora_unet_` and the path with "." written "_"."""
    return KOHYA_PREFIX + module.replace(".", "_")


def _provenance(adapter: LoraAdapter) -> dict[str, str]:
    return {
        "tessera_base_model_id": adapter.base_model_id,
        "tessera_base_model_hash": adapter.base_model_hash,
    }


def _save(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtype: str,
    exact: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    import torch
    from safetensors.torch import save

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must name a torch floating type, e.g. float16; got {dtype!r}")
    out = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in tensors.items()}
    out.update({k: v.to(torch.float32) for k, v in (exact or {}).items()})
    return bytes(save(out, metadata=dict(metadata)))


# -- import ---------------------------------------------------------------------------------


def detect_layout(keys: list[str], metadata: Mapping[str, str]) -> Layout:
    """Which layout a file's keys (and metadata) are in; LoraFileError if none fits."""
    if metadata.get("format") == FILE_FORMAT:
        return "tessera"
    if not keys:
        raise LoraFileError("the file holds no tensors")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(_ATTN_PROCS_KEY.match(k) for k in keys):
        return "diffusers-attn-procs"
    raise LoraFileError(
        "not a LoRA layout Tessera can read",
        key=sorted(keys)[0],
        expected="kohya (lora_unet_*.lora_down.weight), diffusers (unet.*.lora_A.weight) "
        "or Tessera keys",
        found="another key",
    )


def import_adapter(
    data: bytes, spec: LoraSpec, *, skip_text_encoder: bool = False
) -> ImportedAdapter:
    """A diffusers, kohya or Tessera file as a Tessera adapter for `spec`, validated like uploads.

    Text-encoder keys are refused unless `skip_text_encoder`, which drops them (listed in
    `skipped`): Tessera adapts the UNet only.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    header, metadata = read_header(data)
    layout = detect_layout(sorted(header), metadata)
    if layout == "tessera":
        return ImportedAdapter(validate_adapter_bytes(data, spec), layout)
    try:
        raw = load(data)
    except SafetensorError as exc:
        raise LoraFileError(f"unreadable safetensors data: {exc}") from None
    unet_keys, skipped = _split_text_encoder(raw, skip_text_encoder)
    if layout == "kohya":
        pairs = _kohya_pairs(unet_keys, spec)
    else:
        pairs = _diffusers_pairs(unet_keys, layout, _diffusers_alphas(metadata))
    if not pairs:
        raise LoraFileError("the file adapts no UNet module", expected=">= 1 module", found=0)
    adapter, filled = _build(pairs, spec, layout)
    validated = validate_adapter_bytes(adapter_to_bytes(adapter, dtype="float32"), spec)
    return ImportedAdapter(validated, layout, filled, skipped)


def _split_text_encoder(
    raw: Mapping[str, torch.Tensor], skip: bool
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    text = sorted(k for k in raw if k.startswith(_TEXT_ENCODER_PREFIXES))
    if text and not skip:
        raise LoraFileError(
            f"text-encoder LoRA is not supported, Tessera adapts the UNet only ({len(text)} "
            "text-encoder keys; skip_text_encoder / --skip-text-encoder drops them)",
            key=text[0],
        )
    for key in sorted(raw):
        if any(variant in key for variant in _UNSUPPORTED_VARIANTS):
            raise LoraFileError(
                "unsupported LoRA variant (LoHa, LoKr, DoRA or Tucker LoCon)",
                key=key,
                expected="plain LoRA pairs",
                found="a variant's tensor",
            )
    dropped = set(text)
    return {k: v for k, v in raw.items() if k not in dropped}, tuple(text)


def _kohya_pairs(raw: Mapping[str, torch.Tensor], spec: LoraSpec) -> dict[str, _Pair]:
    by_flat: dict[str, str] = {}
    for name in spec.modules:
        flat = name.replace(".", "_")
        if flat in by_flat:
            raise ValueError(f"modules {by_flat[flat]!r} and {name!r} share kohya name {flat!r}")
        by_flat[flat] = name
    pairs: dict[str, _Pair] = {}
    for key in sorted(raw):
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise LoraFileError(
                "not a kohya UNet LoRA key",
                key=key,
                expected="lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha",
                found="another key",
            )
        flat = match["flat"]
        module = by_flat.get(flat)
        if module is None:
            if flat.startswith(_LDM_BLOCKS):
                raise LoraFileError(
                    "kohya names in the original SD (ldm/sgm) UNet layout are not supported; "
                    "convert it to diffusers module names first (for SDXL, diffusers' "
                    "load_lora_weights maps them; save_lora_weights then writes diffusers keys)",
                    key=key,
                    expected="lora_unet_down_blocks_... / mid_block_... / up_blocks_...",
                    found=f"lora_unet_{flat}",
                )
            _unknown_module(key, spec)
        _put(pairs, module, match["part"], raw[key], key)
    return pairs


def _diffusers_pairs(
    raw: Mapping[str, torch.Tensor], layout: Layout, alphas: Mapping[str, float]
) -> dict[str, _Pair]:
    pairs: dict[str, _Pair] = {}
    for key in sorted(raw):
        name = key.removeprefix(DIFFUSERS_PREFIX)
        if layout == "diffusers":
            match = _PEFT_KEY.match(name)
            module = None if match is None else match["module"]
        else:
            match = _ATTN_PROCS_KEY.match(name)
            module = None if match is None else _attn_procs_module(match["base"], match["proj"])
        if match is None or module is None:
            raise LoraFileError(
                "not a diffusers UNet LoRA key",
                key=key,
                expected="unet.<module>.lora_A.weight / .lora_B.weight",
                found="another key",
            )
        _put(pairs, module, match["part"], raw[key], key)
    for module, pair in pairs.items():
        if pair.alpha is None:
            pair.alpha = _pattern_value(module, alphas)
    return pairs


def _attn_procs_module(base: str, proj: str) -> str:
    return f"{base}.{'to_out.0' if proj == 'to_out' else proj}"


def _diffusers_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """Alphas from `lora_adapter_metadata`: "" -> the default, else a module pattern -> alpha."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFileError(f"{ADAPTER_METADATA_KEY} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraFileError(f"{ADAPTER_METADATA_KEY} must be a JSON object")
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in config.items()}
    if config.get("use_dora"):
        raise LoraFileError("DoRA adapters are not supported", key=ADAPTER_METADATA_KEY)
    alphas: dict[str, float] = {}
    if config.get("lora_alpha") is not None:
        alphas[""] = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        alphas[str(pattern)] = float(value)
    return alphas


def _pattern_value(module: str, patterns: Mapping[str, float]) -> float | None:
    """The value of the first pattern naming `module` (as peft matches: the name or a suffix)."""
    for pattern, value in patterns.items():
        if pattern and (module == pattern or module.endswith("." + pattern)):
            return value
    return patterns.get("")


def _put(pairs: dict[str, _Pair], module: str, part: str, tensor: torch.Tensor, key: str) -> None:
    pair = pairs.setdefault(module, _Pair())
    role = _PART[part]
    if role == "alpha":
        if tensor.numel() != 1:
            raise LoraFileError("alpha must be a scalar", key=key, expected=[], found=tensor.shape)
        pair.alpha = float(tensor.item())
    elif role == "A":
        pair.a, pair.a_key = tensor.float(), key
    else:
        pair.b, pair.b_key = tensor.float(), key


def _unknown_module(key: str, spec: LoraSpec) -> NoReturn:
    raise LoraFileError(
        f"unknown module for base model {spec.base_model_id}: not one of its "
        f"{len(spec.modules)} {spec.targets!r} targets",
        key=key,
        expected=f"a module ending in {', '.join(TARGET_PRESETS[spec.targets])}",
        found="another module",
    )


def _build(
    pairs: Mapping[str, _Pair], spec: LoraSpec, layout: Layout
) -> tuple[LoraAdapter, tuple[str, ...]]:
    """Check each pair against `spec`, bring all to one rank and alpha, fill the rest with zeros."""
    import torch

    checked: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, pair in sorted(pairs.items()):
        if module not in spec.modules:
            _unknown_module(pair.a_key or pair.b_key or module, spec)
        a, b = _checked_pair(module, pair, spec)
        rank = int(a.shape[0])
        alpha = float(rank) if not pair.alpha else pair.alpha  # kohya: 0 or none means rank
        checked[module] = (a, b, alpha)
    ranks = {int(a.shape[0]) for a, _, _ in checked.values()}
    alphas = {alpha for _, _, alpha in checked.values()}
    rank = max(ranks)
    # one rank and alpha everywhere: keep them; else fold each scale into B, so alpha = rank.
    alpha = alphas.pop() if len(ranks) == 1 and len(alphas) == 1 else float(rank)
    tensors: dict[str, torch.Tensor] = {}
    for module, shape in spec.modules.items():
        a_shape, b_shape = pair_shapes(shape, rank)
        a_full, b_full = torch.zeros(a_shape), torch.zeros(b_shape)
        if module in checked:
            a, b, module_alpha = checked[module]
            r = int(a.shape[0])
            a_full[:r] = a
            b_full[:, :r] = b * (module_alpha / r) / (alpha / rank)
        tensors[module + A_SUFFIX], tensors[module + B_SUFFIX] = a_full, b_full
    adapter = LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=spec.base_model_id,
        base_model_hash=spec.base_model_hash,
        target_modules=TARGET_PRESETS[spec.targets],
        targets=spec.targets,
        extra={"imported_from": layout},
    )
    return adapter, tuple(m for m in spec.modules if m not in checked)


def _checked_pair(module: str, pair: _Pair, spec: LoraSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in the spec's layout for `module`, or LoraFileError naming the key and shapes."""
    if pair.a is None or pair.b is None:
        found = "only down (A)" if pair.a is not None else "only up (B)"
        raise LoraFileError(
            "incomplete LoRA pair",
            key=pair.a_key or pair.b_key or module,
            expected="down (A) and up (B)",
            found=found if pair.a_key or pair.b_key else "only alpha",
        )
    shape = spec.modules[module]
    rank = int(pair.a.shape[0]) if pair.a.dim() else 0
    if rank < 1:
        raise LoraFileError("wrong shape", key=pair.a_key, expected="[rank, ...]", found=[])
    a_shape, b_shape = pair_shapes(shape, rank)
    return _fit(pair.a, a_shape, pair.a_key), _fit(pair.b, b_shape, pair.b_key)


def _fit(tensor: torch.Tensor, want: tuple[int, ...], key: str) -> torch.Tensor:
    """`tensor` in shape `want`, allowing only trailing 1x1 kernel dims to differ (Linear/1x1)."""
    found = tuple(int(n) for n in tensor.shape)
    if found == want:
        return tensor
    squeezed = tuple(n for i, n in enumerate(found) if i < 2 or n != 1)
    if squeezed == tuple(n for i, n in enumerate(want) if i < 2 or n != 1):
        return tensor.reshape(want)
    raise LoraFileError("wrong shape", key=key, expected=list(want), found=list(found))
