"""Target presets: which UNet layers each preset adapts, and LoCon pairs on conv layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

from tessera.lora import (
    TARGET_PRESETS,
    LoraSpec,
    lora_spec,
    random_adapter,
    zeros_like_spec,
)
from tessera.lora.adapter import A_SUFFIX, B_SUFFIX
from tessera.model.base import UNET_CONFIG, BaseModel, default_base_model_path
from tessera.model.synthetic import Family, build_random_folder

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def spec_of(unet: torch.nn.Module, targets: str) -> LoraSpec:
    return lora_spec(unet, base_model_id="test/base", base_model_hash="00" * 32, targets=targets)


def suffixes(spec: LoraSpec) -> set[str]:
    found = set()
    for module in spec.modules:
        found |= {t for t in TARGET_PRESETS["full"] if module == t or module.endswith("." + t)}
    return found


@pytest.fixture(scope="module")
def random_unets(tmp_path_factory: pytest.TempPathFactory) -> dict[Family, Any]:
    """Random SD-1.x-like (1x1 conv proj_in) and SD-2-like (linear proj_in) UNets."""
    unets: dict[Family, Any] = {}
    for family in ("sd1", "sd2"):
        folder = build_random_folder(tmp_path_factory.mktemp(family) / family, family)
        unets[family] = diffusers.UNet2DConditionModel.from_pretrained(Path(folder) / "unet")
    return unets


def test_presets_nest_and_name_their_layers() -> None:
    assert TARGET_PRESETS["attention"] == ATTENTION
    assert TARGET_PRESETS["attention+ff"] == (*ATTENTION, "ff.net.0.proj", "ff.net.2")
    assert set(TARGET_PRESETS["full"]) == {
        *TARGET_PRESETS["attention+ff"],
        *("proj_in", "proj_out", "conv1", "conv2"),
    }


def test_attention_preset_adapts_the_attention_projections_only(base_model: BaseModel) -> None:
    spec = spec_of(base_model.unet, "attention")

    assert spec.targets == "attention"
    assert suffixes(spec) == set(ATTENTION)
    assert all(len(shape) == 2 for shape in spec.modules.values())


def test_auto_takes_the_preset_the_model_folder_recommends(
    base_model: BaseModel, tmp_path: Path
) -> None:
    from tessera.model.facts import resolve_targets

    bundled = default_base_model_path()
    assert base_model.targets == "full"  # TESSERA_LORA_TARGETS=auto, the bundled model's choice
    assert base_model.lora_spec.modules == spec_of(base_model.unet, "full").modules
    assert resolve_targets("auto", bundled) == "full"
    assert resolve_targets("attention", bundled) == "attention"  # a set preset wins
    assert resolve_targets("auto", tmp_path) == "attention"  # no recommendation


def test_full_preset_on_the_tiny_unet_adds_ff_projections_and_3x3_resnet_convs(
    base_model: BaseModel,
) -> None:
    attention = spec_of(base_model.unet, "attention")
    with_ff = spec_of(base_model.unet, "attention+ff")
    full = spec_of(base_model.unet, "full")

    assert set(attention.modules) < set(with_ff.modules) < set(full.modules)
    assert suffixes(full) == set(TARGET_PRESETS["full"])
    ff_in = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert with_ff.modules[ff_in] == (512, 64)  # GEGLU's Linear, not the GEGLU module
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.0" not in with_ff.modules
    assert full.modules["up_blocks.0.resnets.0.conv1"] == (64, 128, 3, 3)
    assert full.modules["mid_block.resnets.1.conv2"] == (64, 64, 3, 3)
    assert full.modules["mid_block.attentions.0.proj_in"] == (64, 64, 1, 1)
    for name, shape in full.modules.items():
        layer = base_model.unet.get_submodule(name)
        assert tuple(layer.weight.shape) == shape


@pytest.mark.parametrize(
    ("family", "proj_in"), [("sd1", (32, 32, 1, 1)), ("sd2", (32, 32))], ids=["sd1", "sd2"]
)
def test_proj_in_is_a_conv_in_sd1_and_linear_in_sd2(
    random_unets: dict[Family, Any], family: Family, proj_in: tuple[int, ...]
) -> None:
    unet = random_unets[family]

    full = spec_of(unet, "full")
    with_ff = spec_of(unet, "attention+ff")

    assert full.modules["down_blocks.0.attentions.0.proj_in"] == proj_in
    assert full.modules["down_blocks.0.attentions.0.proj_out"] == proj_in
    assert len(full.modules["down_blocks.0.resnets.0.conv1"]) == 4
    assert not any(m.endswith(("proj_in", "proj_out", "conv1")) for m in with_ff.modules)
    for name, shape in full.modules.items():
        assert tuple(unet.get_submodule(name).weight.shape) == shape


def test_spec_reads_no_weights_so_a_meta_unet_will_do(base_model: BaseModel) -> None:
    with torch.device("meta"):
        unet: Any = diffusers.UNet2DConditionModel(**UNET_CONFIG)

    spec = spec_of(unet, "full")

    assert spec.modules == spec_of(base_model.unet, "full").modules


def test_unknown_preset_names_the_known_ones(base_model: BaseModel) -> None:
    with pytest.raises(ValueError, match=r"'everything'.*'attention', 'attention\+ff', 'full'"):
        spec_of(base_model.unet, "everything")
    with pytest.raises(ValueError, match="unknown LoRA target preset 'x'"):
        LoraSpec(base_model_id="b", base_model_hash="h", modules={"m": (2, 2)}, targets="x")


def test_a_preset_matching_nothing_is_refused() -> None:
    norms_only = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.GroupNorm(2, 4))
    named_like_targets = torch.nn.ModuleDict({"to_q": torch.nn.LayerNorm(4)})

    for model in (norms_only, named_like_targets):
        with pytest.raises(ValueError, match=r"preset 'full' matches no nn\.Linear or nn\.Conv2d"):
            spec_of(model, "full")


def test_conv_pairs_use_the_locon_layout_and_delta_is_their_composition() -> None:
    conv = torch.nn.Conv2d(6, 5, kernel_size=3, padding=1, bias=False)
    spec = spec_of(torch.nn.ModuleDict({"conv1": conv}), "full")
    adapter = random_adapter(spec, 2, 4.0, seed=0, std=0.5)
    x = torch.randn(1, 6, 7, 7, generator=torch.Generator().manual_seed(1))

    a, b = adapter.pair("conv1")
    a_flat, b_flat = adapter.flat_pair("conv1")
    down_then_up = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=1), b)

    assert spec.modules == {"conv1": (5, 6, 3, 3)}
    assert (a.shape, b.shape) == ((2, 6, 3, 3), (5, 2, 1, 1))
    assert (a_flat.shape, b_flat.shape) == ((2, 54), (5, 2))
    assert adapter.delta("conv1").shape == conv.weight.shape
    torch.testing.assert_close(
        torch.nn.functional.conv2d(x, adapter.delta("conv1"), padding=1),
        down_then_up * adapter.scale,
        rtol=1e-4,
        atol=1e-5,
    )


def test_spec_built_adapters_carry_the_preset_and_conv_shapes(base_model: BaseModel) -> None:
    spec = spec_of(base_model.unet, "full")

    zeros = zeros_like_spec(spec, 4, 4.0)
    noise = random_adapter(spec, 4, 4.0, seed=0)

    for adapter in (zeros, noise):
        assert adapter.targets == "full"
        assert adapter.target_modules == TARGET_PRESETS["full"]
        assert set(adapter.tensors) == spec.keys
        a = adapter.tensors["mid_block.resnets.0.conv1" + A_SUFFIX]
        b = adapter.tensors["mid_block.resnets.0.conv1" + B_SUFFIX]
        assert (a.shape, b.shape) == ((4, 64, 3, 3), (64, 4, 1, 1))
    assert float(zeros.delta("mid_block.resnets.0.conv1").abs().max()) == 0.0
