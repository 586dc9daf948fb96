"""Adapter files in diffusers' and kohya's layouts: diffusers loads them with Tessera's update,
and importing them back gives the same per-module products; refusals name the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save
from sqlalchemy.orm import Session

from tessera.cli import _download_version, main
from tessera.config import Settings
from tessera.lora import (
    LoraAdapter,
    LoraFileError,
    LoraSpec,
    adapter_from_bytes,
    adapter_to_bytes,
    lora_spec,
    random_adapter,
    read_header,
)
from tessera.lora.interop import (
    ExportFormat,
    export_adapter,
    export_diffusers,
    export_kohya,
    import_adapter,
    kohya_name,
)
from tessera.model.base import load_base_model
from tessera.models import AdapterKind
from tessera.storage import ObjectStore

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.model.synthetic import build_random_folder

    return Path(build_random_folder(tmp_path_factory.mktemp("interop") / "sd1", "sd1"))


def pipeline(folder: Path) -> Any:
    import diffusers

    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def spec_for(unet: Any, targets: str = "attention") -> LoraSpec:
    return lora_spec(unet, base_model_id="test/sd1", base_model_hash="cd" * 32, targets=targets)


def unet_output(unet: Any) -> torch.Tensor:
    """One UNet forward on fixed inputs."""
    config = unet.config
    generator = torch.Generator().manual_seed(1)
    size = config.sample_size
    sample = torch.randn(1, config.in_channels, size, size, generator=generator)
    context = torch.randn(1, 8, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def tessera_output(unet: Any, adapter: LoraAdapter) -> torch.Tensor:
    """The reference: each target weight of a copy of the UNet plus the adapter's delta."""
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for module in adapter.modules:
            weight = modules[module].weight
            weight += adapter.delta(module).reshape(weight.shape)
    return unet_output(merged)


def products(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {module: adapter.delta(module) for module in adapter.modules}


def assert_same_products(got: LoraAdapter, want: LoraAdapter) -> None:
    want_products = products(want)
    got_products = products(got)
    assert set(got_products) == set(want_products)
    for module, product in want_products.items():
        torch.testing.assert_close(got_products[module], product, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("targets", ["attention", "full"])
def test_diffusers_loads_the_export_with_tesseras_update(
    folder: Path, tmp_path: Path, fmt: ExportFormat, targets: str
) -> None:
    pipe = pipeline(folder)
    spec = spec_for(pipe.unet, targets)
    adapter = random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0, std=0.1)
    base = unet_output(pipe.unet)
    want = tessera_output(pipe.unet, adapter)
    path = tmp_path / f"{fmt}.safetensors"
    path.write_bytes(export_adapter(adapter, fmt, dtype="float32"))

    pipe.load_lora_weights(str(path))
    got = unet_output(pipe.unet)

    assert (want - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_diffusers_export_needs_no_metadata(folder: Path, tmp_path: Path) -> None:
    """Loaders that ignore `lora_adapter_metadata` (diffusers < 0.35) take alpha = rank."""
    pipe = pipeline(folder)
    adapter = random_adapter(spec_for(pipe.unet), rank=RANK, alpha=ALPHA, seed=0, std=0.1)
    want = tessera_output(pipe.unet, adapter)
    path = tmp_path / "bare.safetensors"
    path.write_bytes(save(load(export_diffusers(adapter, dtype="float32"))))

    pipe.load_lora_weights(str(path))

    torch.testing.assert_close(unet_output(pipe.unet), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("targets", ["attention", "full"])
def test_round_trip_keeps_every_product(folder: Path, fmt: ExportFormat, targets: str) -> None:
    spec = spec_for(load_base_model(folder).unet, targets)
    adapter = random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0, std=0.1)

    imported = import_adapter(export_adapter(adapter, fmt, dtype="float32"), spec)

    assert imported.layout == fmt
    assert imported.filled == () and imported.skipped == ()
    assert imported.adapter.rank == RANK
    assert_same_products(imported.adapter, adapter)


def test_kohya_export_keeps_rank_and_alpha(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    adapter = random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0)
    data = export_kohya(adapter)
    _, metadata = read_header(data)
    tensors = load(data)
    module = adapter.modules[0]

    assert metadata["ss_network_dim"] == str(RANK)
    assert float(metadata["ss_network_alpha"]) == ALPHA
    assert tensors[f"{kohya_name(module)}.alpha"].item() == ALPHA
    assert kohya_name(module) == "lora_unet_" + module.replace(".", "_")
    assert import_adapter(data, spec).adapter.alpha == ALPHA


def test_diffusers_export_folds_the_scale(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    adapter = random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0)
    data = export_diffusers(adapter, dtype="float32")
    _, metadata = read_header(data)
    config = json.loads(metadata["lora_adapter_metadata"])
    module = adapter.modules[0]

    assert config["unet.r"] == config["unet.lora_alpha"] == RANK
    torch.testing.assert_close(
        load(data)[f"unet.{module}.lora_B.weight"], adapter.pair(module)[1] * (ALPHA / RANK)
    )


def test_mixed_ranks_and_alphas_are_padded_and_folded(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    first, second, *_ = spec.modules
    wide = random_adapter(spec, rank=6, alpha=3.0, seed=1, std=0.1)
    narrow = random_adapter(spec, rank=2, alpha=5.0, seed=2, std=0.1)
    tensors = {}
    for adapter, module in ((wide, first), (narrow, second)):
        a, b = adapter.pair(module)
        tensors[f"{kohya_name(module)}.lora_down.weight"] = a
        tensors[f"{kohya_name(module)}.lora_up.weight"] = b
        tensors[f"{kohya_name(module)}.alpha"] = torch.tensor(adapter.alpha)

    imported = import_adapter(save(tensors), spec)

    result = imported.adapter
    assert result.rank == 6 and result.alpha == 6.0
    torch.testing.assert_close(result.delta(first), wide.delta(first), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.delta(second), narrow.delta(second), rtol=1e-5, atol=1e-6)
    assert set(imported.filled) == set(spec.modules) - {first, second}
    assert all(float(result.delta(m).abs().max()) == 0 for m in imported.filled)


def test_older_diffusers_attention_processor_keys(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    adapter = random_adapter(spec, rank=RANK, alpha=float(RANK), seed=3)
    tensors = {}
    for module, a, b in adapter.pairs():
        base, proj = (
            module.rsplit(".", 1)
            if not module.endswith("to_out.0")
            else (
                module.removesuffix(".to_out.0"),
                "to_out",
            )
        )
        tensors[f"unet.{base}.processor.{proj}_lora.down.weight"] = a
        tensors[f"unet.{base}.processor.{proj}_lora.up.weight"] = b

    imported = import_adapter(save(tensors), spec)

    assert imported.layout == "diffusers-attn-procs"
    assert_same_products(imported.adapter, adapter)


def test_tessera_file_is_validated_as_is(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    adapter = random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0)

    imported = import_adapter(adapter_to_bytes(adapter, dtype="float32"), spec)

    assert imported.layout == "tessera"
    assert_same_products(imported.adapter, adapter)


def kohya_tensors(spec: LoraSpec) -> dict[str, torch.Tensor]:
    return load(export_kohya(random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0)))


def test_text_encoder_keys_are_refused_unless_skipped(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    tensors = kohya_tensors(spec)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[f"{te}.lora_down.weight"] = torch.zeros(RANK, 32)
    tensors[f"{te}.lora_up.weight"] = torch.zeros(32, RANK)

    with pytest.raises(LoraFileError, match="text-encoder LoRA is not supported") as refused:
        import_adapter(save(tensors), spec)
    imported = import_adapter(save(tensors), spec, skip_text_encoder=True)

    assert refused.value.key == f"{te}.lora_down.weight"
    assert imported.skipped == (f"{te}.lora_down.weight", f"{te}.lora_up.weight")


def test_unknown_module_is_refused(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    tensors = kohya_tensors(spec)
    tensors[
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight"
    ] = torch.zeros(RANK, 64)

    with pytest.raises(LoraFileError, match="unknown module") as refused:
        import_adapter(save(tensors), spec)

    assert "ff_net_2" in refused.value.key


def test_ldm_layout_names_are_refused(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight"

    with pytest.raises(LoraFileError, match="ldm/sgm"):
        import_adapter(save({key: torch.zeros(RANK, 32), **kohya_tensors(spec)}), spec)


def test_wrong_shape_names_the_key_and_both_shapes(folder: Path) -> None:
    spec = spec_for(load_base_model(folder).unet)
    adapter = random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0)
    tensors = load(export_diffusers(adapter))
    module = adapter.modules[0]
    key = f"unet.{module}.lora_A.weight"
    tensors[key] = torch.zeros(RANK, 7)

    with pytest.raises(LoraFileError, match="wrong shape") as refused:
        import_adapter(save(tensors), spec)

    assert refused.value.key == key
    assert refused.value.found == [RANK, 7]
    assert refused.value.expected == [RANK, spec.modules[module][1]]


def test_cli_export_and_import(folder: Path, tmp_path: Path) -> None:
    spec = load_base_model(folder).lora_spec
    adapter = random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0, std=0.1)
    source = tmp_path / "adapter.safetensors"
    source.write_bytes(adapter_to_bytes(adapter))
    kohya = tmp_path / "kohya.safetensors"
    back = tmp_path / "back.safetensors"

    run(["adapter", "export", str(source), "--format", "kohya", "--out", str(kohya)])
    run(["adapter", "import", str(kohya), "--out", str(back), "--model", str(folder)])

    assert any(k.startswith("lora_unet_") for k in load(kohya.read_bytes()))
    imported = adapter_from_bytes(back.read_bytes(), spec)
    assert imported.extra["imported_from"] == "kohya"
    want = adapter_from_bytes(source.read_bytes())
    for module in adapter.modules:  # fp16 on the wire both ways
        torch.testing.assert_close(imported.delta(module), want.delta(module), rtol=2e-3, atol=2e-4)


def test_cli_import_refusal_is_a_usage_error(folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "te.safetensors"
    bad.write_bytes(save({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}))

    with pytest.raises(SystemExit) as exited:
        main(
            ["adapter", "import", str(bad), "--out", str(tmp_path / "o"), "--model", str(folder)],
            standalone_mode=True,
        )

    assert exited.value.code == 1
    assert not (tmp_path / "o").exists()


def test_export_fetches_a_published_version(
    settings: Settings, session: Session, store: ObjectStore
) -> None:
    from services.aggregator.main import create_app
    from tests.services.aggregator.factories import publish

    spec = LoraSpec(
        base_model_id="test/base",
        base_model_hash="ab" * 32,
        modules={"blocks.0.attn1.to_q": (16, 24), "blocks.0.conv1": (8, 4, 3, 3)},
    )
    data = adapter_to_bytes(random_adapter(spec, rank=RANK, alpha=ALPHA, seed=0))
    version = publish(session, store, "global", data, kind=AdapterKind.GLOBAL)
    token = settings.operator_token.get_secret_value()

    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as http:
        fetched = _download_version(http, version.id)
        with pytest.raises(click.ClickException, match="404"):
            _download_version(http, version.id + 1000)

    assert fetched == data


def run(args: list[str]) -> None:
    try:
        main(args, standalone_mode=False)
    except SystemExit as exited:  # pragma: no cover - a failure shows the message
        assert exited.code in (0, None)


def test_a_trained_adapter_exported_serves_as_in_tessera(folder: Path, tmp_path: Path) -> None:
    """Trained by train_lora, served unmerged by Tessera, loaded by diffusers: one output."""
    from tessera.lora.mixing import install_mixing, unmerged_mix, use_mix
    from tessera.lora.train import train_lora
    from tessera.model.base import load_base_model

    base = load_base_model(folder, device="cpu", dtype="float32", targets="full")
    captions = base.prompts.encode(["a red circle", "a blue square"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    trained = train_lora(base, images, captions, rank=4, steps=3, batch_size=2, lr=5e-2).adapter
    install_mixing(base.unet, base.lora_spec)
    with use_mix(unmerged_mix(base.unet, base.lora_spec, [(trained, 1.0)])):
        served = unet_output(base.unet)
    path = tmp_path / "trained.safetensors"
    path.write_bytes(export_adapter(trained, "diffusers", dtype="float32"))
    pipe = pipeline(folder)
    plain = unet_output(pipe.unet)

    pipe.load_lora_weights(str(path))

    assert (served - plain).abs().max() > 1e-4  # training moved the output
    torch.testing.assert_close(unet_output(pipe.unet), served, rtol=1e-4, atol=1e-4)
