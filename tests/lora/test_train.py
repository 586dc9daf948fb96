"""train_lora: deterministic, leaves the base alone, starts from an init, and learns the style."""

from __future__ import annotations

import pytest
import torch

from tessera.data import style_dataset, to_tensor
from tessera.lora import adapter_to_bytes, validate_adapter_bytes
from tessera.lora.train import denoising_loss, train_lora
from tessera.model.base import BaseModel
from tessera.model.encoder import encode_prompts

Data = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def stripes() -> Data:
    data = style_dataset("stripes", 24, 0)
    tokens, _ = encode_prompts(data.captions)
    return to_tensor(data.images), tokens


def test_same_seed_same_adapter_and_base_untouched(base_model: BaseModel, stripes: Data) -> None:
    before = base_model.fingerprint
    first = train_lora(base_model, *stripes, rank=4, steps=4, batch_size=4, seed=7)
    second = train_lora(base_model, *stripes, rank=4, steps=4, batch_size=4, seed=7)
    other = train_lora(base_model, *stripes, rank=4, steps=4, batch_size=4, seed=8)

    assert first.losses == second.losses and len(first.losses) == 4
    for key, value in first.adapter.tensors.items():
        assert torch.equal(value, second.adapter.tensors[key])
    assert first.losses != other.losses
    base_model.__dict__.pop("fingerprint")  # recompute from the weights now
    assert base_model.fingerprint == before


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
    images, tokens = stripes
    with pytest.raises(ValueError, match=r"images must be \[n, 3, 32, 32\]"):
        train_lora(base_model, images[:, :, :16], tokens, steps=1)
    with pytest.raises(ValueError, match="one per image"):
        train_lora(base_model, images, tokens[:3], steps=1)


def test_training_lowers_the_denoising_loss_on_the_style(
    base_model: BaseModel, stripes: Data
) -> None:
    images, tokens = stripes
    result = train_lora(base_model, images, tokens, rank=8, steps=40, batch_size=8, seed=0)

    before = denoising_loss(base_model, images, tokens, seed=3)
    after = denoising_loss(base_model, images, tokens, result.adapter, seed=3)

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
    init = type(trained)(**{**trained.__dict__, "tensors": tensors})

    result = train_lora(base_model, *stripes, init=init, steps=1, lr=0.0, batch_size=2)

    module = init.modules[0]
    revived = result.adapter.tensors[module + ".lora_A.weight"]
    assert revived[3].abs().sum() > 0
    torch.testing.assert_close(result.adapter.delta(module), init.delta(module))
