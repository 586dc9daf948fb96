"""train_lora: deterministic, leaves the base alone, starts from an init, and learns the style."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from tessera.data import style_dataset, to_tensor
from tessera.lora import adapter_to_bytes, validate_adapter_bytes
from tessera.lora.train import denoising_loss, train_lora
from tessera.model.base import BaseModel
from tessera.model.conditioning import Conditioning

Data = tuple[torch.Tensor, Conditioning]


@pytest.fixture(scope="module")
def stripes(base_model: BaseModel) -> Data:
    data = style_dataset("stripes", 24, 0)
    return to_tensor(data.images), base_model.prompts.encode(data.captions)


def test_same_seed_same_adapter(base_model: BaseModel, stripes: Data) -> None:
    first = train_lora(base_model, *stripes, rank=4, steps=4, batch_size=4, seed=7)
    second = train_lora(base_model, *stripes, rank=4, steps=4, batch_size=4, seed=7)
    other = train_lora(base_model, *stripes, rank=4, steps=4, batch_size=4, seed=8)

    assert first.losses == second.losses and len(first.losses) == 4
    for key, value in first.adapter.tensors.items():
        assert torch.equal(value, second.adapter.tensors[key])
    assert first.losses != other.losses


def test_training_leaves_the_base_unet_as_it_was(base_model: BaseModel, stripes: Data) -> None:
    unet = base_model.unet
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    init = train_lora(base_model, *stripes, rank=4, steps=2, batch_size=2, seed=3).adapter

    train_lora(base_model, *stripes, init=init, steps=2, batch_size=2, seed=4)

    after = unet.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not [name for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    assert not [name for name, _ in unet.named_modules() if "lora" in name.lower()]
    assert not getattr(unet, "peft_config", None)
    assert not any(p.requires_grad for p in unet.parameters()) and not unet.training


def test_images_of_any_size_are_resized_to_the_model(base_model: BaseModel, stripes: Data) -> None:
    images, captions = stripes
    larger = torch.nn.functional.interpolate(images, size=(48, 64), mode="nearest")

    small = train_lora(base_model, images, captions, rank=4, steps=2, batch_size=2, seed=5)
    large = train_lora(base_model, larger, captions, rank=4, steps=2, batch_size=2, seed=5)

    assert len(large.losses) == 2 and all(loss > 0 for loss in large.losses)
    assert set(large.adapter.tensors) == set(small.adapter.tensors)
    assert denoising_loss(base_model, larger, captions, large.adapter, repeats=1) > 0


def test_adapter_fits_the_base_spec_and_survives_the_wire(
    base_model: BaseModel, stripes: Data
) -> None:
    result = train_lora(base_model, *stripes, rank=4, alpha=8.0, steps=2, batch_size=2, seed=0)
    adapter = result.adapter

    assert adapter.rank == 4 and adapter.scale == 2.0
    assert set(adapter.modules) == set(base_model.lora_spec.modules)
    assert adapter.base_model_hash == base_model.fingerprint
    loaded = validate_adapter_bytes(adapter_to_bytes(adapter), base_model.lora_spec)
    assert loaded.parameters == adapter.parameters


def test_training_from_an_init_with_zero_lr_returns_the_init(
    base_model: BaseModel, stripes: Data
) -> None:
    init = train_lora(base_model, *stripes, rank=4, steps=3, batch_size=2, seed=1).adapter
    result = train_lora(base_model, *stripes, init=init, steps=2, lr=0.0, batch_size=2)

    assert result.adapter.rank == init.rank
    for key, value in init.tensors.items():
        assert torch.equal(result.adapter.tensors[key], value)
    with pytest.raises(ValueError, match="differs from the init"):
        train_lora(base_model, *stripes, init=init, rank=8, steps=1)


def test_bad_data_is_refused_with_shapes(base_model: BaseModel, stripes: Data) -> None:
    images, captions = stripes
    with pytest.raises(ValueError, match=r"images must be \[n, 3, H, W\]"):
        train_lora(base_model, images[:, :1], captions, steps=1)
    with pytest.raises(ValueError, match="24 images, 3 captions"):
        train_lora(base_model, images, captions.rows(slice(0, 3)), steps=1)
    with pytest.raises(ValueError, match=r"captions must be \[n, T, 384\]"):
        train_lora(base_model, images, captions.embeds[:, :, :100], steps=1)


def test_training_lowers_the_denoising_loss_on_the_style(
    base_model: BaseModel, stripes: Data
) -> None:
    images, captions = stripes
    result = train_lora(base_model, images, captions, rank=8, steps=40, batch_size=8, seed=0)

    before = denoising_loss(base_model, images, captions, seed=3)
    after = denoising_loss(base_model, images, captions, result.adapter, seed=3)

    assert after < 0.9 * before, (before, after)


def test_dead_directions_of_an_init_are_revived_without_changing_the_start(
    base_model: BaseModel, stripes: Data
) -> None:
    trained = train_lora(base_model, *stripes, rank=4, steps=2, batch_size=2, seed=1).adapter
    tensors = dict(trained.tensors)
    for module in trained.modules:  # zero direction 3, as an SVD re-factorisation below rank does
        tensors[module + ".lora_A.weight"] = tensors[module + ".lora_A.weight"].clone()
        tensors[module + ".lora_A.weight"][3] = 0
        tensors[module + ".lora_B.weight"] = tensors[module + ".lora_B.weight"].clone()
        tensors[module + ".lora_B.weight"][:, 3] = 0
    init = dataclasses.replace(trained, tensors=tensors)

    result = train_lora(base_model, *stripes, init=init, steps=1, lr=0.0, batch_size=2)

    module = init.modules[0]
    revived = result.adapter.tensors[module + ".lora_A.weight"]
    assert revived[3].abs().sum() > 0
    torch.testing.assert_close(result.adapter.delta(module), init.delta(module))


def test_training_b_alone_keeps_the_frozen_a(base_model: BaseModel, stripes: Data) -> None:
    from tessera.secagg.vector import frozen_a, frozen_adapter, zero_b

    spec = base_model.lora_spec
    a = frozen_a(spec, rank=4, seed=11)
    start = frozen_adapter(spec, a, zero_b(spec, rank=4), rank=4, alpha=4.0)

    trained = train_lora(
        base_model, *stripes, init=start, steps=2, batch_size=2, seed=6, train_a=False
    ).adapter

    for module, a_trained, _ in trained.pairs():
        assert torch.equal(a_trained, a[module]), module
    assert any(float(b.abs().max()) > 0 for _, _, b in trained.pairs())
    with pytest.raises(ValueError, match="needs an init adapter"):
        train_lora(base_model, *stripes, rank=4, steps=1, train_a=False)
