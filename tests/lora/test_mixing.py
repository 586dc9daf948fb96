"""Mixing adapters into a shared UNet: unmerged terms equal the merged weights, per context."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from tessera.lora import LoraAdapter, LoraSpec, lora_spec, random_adapter
from tessera.lora.adapter import A_SUFFIX, B_SUFFIX
from tessera.lora.mixing import (
    MixedConv2d,
    MixedLinear,
    SampleTerms,
    SampleWeights,
    active_mix,
    install_mixing,
    merge_mix,
    per_sample_mix,
    place_adapter,
    tensor_bytes,
    unmerged_mix,
    use_mix,
)
from tessera.model.base import BaseModel

HASH = "ab" * 32
RANK = 3


def spec_of(model: torch.nn.Module, modules: list[str]) -> LoraSpec:
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in modules}
    return LoraSpec(base_model_id="test/base", base_model_hash=HASH, modules=shapes)


def pairs_adapter(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> LoraAdapter:
    """An adapter from A/B pairs given directly (conv: A [r, in, kh, kw], B [out, r, 1, 1])."""
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[module + A_SUFFIX] = a
        tensors[module + B_SUFFIX] = b
    rank = int(next(iter(pairs.values()))[0].shape[0])
    return LoraAdapter(tensors, rank, alpha, "test/base", HASH)


def with_deltas(model: torch.nn.Module, mix: list[tuple[LoraAdapter, float]]) -> torch.nn.Module:
    """The reference: a copy of `model` whose weights are W + sum w * scale * B @ A."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for adapter, weight in mix:
            for module in adapter.modules:
                layer = reference.get_submodule(module)
                layer.weight += weight * adapter.delta(module).to(layer.weight.dtype)
    return reference


def linear_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 12), torch.nn.Linear(12, 5)
    )


def conv_model() -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(6, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
        torch.nn.Conv2d(6, 5, 1),  # a 1x1 conv, as SD-1.x's proj_in
        torch.nn.Conv2d(5, 3, 3, padding=1, bias=False),
    )


def conv_pairs(model: torch.nn.Module, modules: list[str], seed: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in modules:
        out, inp, kh, kw = model.get_submodule(name).weight.shape
        a = torch.randn(RANK, inp, kh, kw, generator=generator) * 0.3
        b = torch.randn(out, RANK, 1, 1, generator=generator) * 0.3
        pairs[name] = (a, b)
    return pairs_adapter(pairs, alpha=2.0)


def test_unmerged_linear_layers_equal_the_merged_weights() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    first = random_adapter(spec, RANK, 2.0, seed=1, std=0.3)
    second = random_adapter(spec, RANK, 6.0, seed=2, std=0.3)
    mix = [(first, 0.7), (second, 0.4)]
    reference = with_deltas(model, mix)
    install_mixing(model, spec)
    x = torch.randn(2, 7, 8)

    with use_mix(unmerged_mix(model, spec, mix)):
        unmerged = model(x)
    with use_mix(merge_mix(model, spec, mix)):
        merged = model(x)

    assert isinstance(model[0], MixedLinear) and "0.weight" in model.state_dict()
    torch.testing.assert_close(unmerged, reference(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, reference(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmerged, model(x), atol=1e-3)  # outside the block: the base


def test_unmerged_conv_pairs_equal_the_merged_weights() -> None:
    model = conv_model()
    names = ["0", "2", "3", "4"]
    spec = spec_of(model, names)
    mix = [(conv_pairs(model, names, seed=3), 0.5), (conv_pairs(model, ["2", "4"], seed=4), 1.5)]
    reference = with_deltas(model, mix)
    install_mixing(model, spec)
    x = torch.randn(2, 4, 9, 11)

    with use_mix(unmerged_mix(model, spec, mix)):
        unmerged = model(x)
    with use_mix(merge_mix(model, spec, mix)):
        merged = model(x)

    assert all(isinstance(model.get_submodule(n), MixedConv2d) for n in names)
    torch.testing.assert_close(unmerged, reference(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, reference(x), atol=1e-5, rtol=1e-5)


def test_a_layer_no_adapter_of_the_mix_touches_costs_exactly_the_base() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    only_first = pairs_adapter({"0": (torch.randn(RANK, 8), torch.randn(16, RANK))}, alpha=1.0)
    install_mixing(model, spec)
    x = torch.randn(3, 8)
    hidden = model[1](model[0](x))
    with torch.no_grad():
        base_rest = model[3](model[2](hidden))

    mix = unmerged_mix(model, spec, [(only_first, 1.0)])
    with use_mix(mix), torch.no_grad():
        rest = model[3](model[2](hidden))

    assert set(mix.terms) == {"0"} and not mix.merged
    assert torch.equal(rest, base_rest)


def test_a_mix_of_placed_adapters_owns_no_bytes_and_a_merge_owns_its_weights() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    adapter = place_adapter(model, random_adapter(spec, RANK, 2.0, seed=5))

    unmerged = unmerged_mix(model, spec, [(adapter, 1.0)])
    merged = merge_mix(model, spec, [(adapter, 1.0)])

    assert unmerged.nbytes == 0
    held = [t for terms in unmerged.terms.values() for term in terms for t in (term.a, term.b)]
    assert all(any(t is a for a in adapter.tensors.values()) for t in held)
    weights = sum(model.get_submodule(n).weight.numel() * 4 for n in spec.modules)
    assert merged.nbytes == tensor_bytes(merged.merged) == weights


def test_adapters_are_cast_once_to_the_layer_dtype() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    adapter = random_adapter(spec, RANK, 2.0, seed=6, std=0.3)
    reference = with_deltas(model, [(adapter, 0.8)])
    low = copy.deepcopy(model).to(torch.bfloat16)
    install_mixing(low, spec)
    x = torch.randn(4, 8)

    placed = place_adapter(low, adapter)
    mix = unmerged_mix(low, spec, [(placed, 0.8)])
    with use_mix(mix):
        out = low(x.to(torch.bfloat16))

    assert all(t.dtype == torch.bfloat16 for t in placed.tensors.values())
    assert mix.nbytes == 0  # placed already: nothing cast per mix
    assert unmerged_mix(low, spec, [(adapter, 0.8)]).nbytes == tensor_bytes(placed.tensors)
    torch.testing.assert_close(out.float(), reference(x), atol=0.1, rtol=0.05)


def test_two_threads_with_different_mixes_never_see_each_others_adapters() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    adapters = [random_adapter(spec, RANK, 2.0, seed=s, std=0.3) for s in (7, 8)]
    install_mixing(model, spec)
    mixes = [
        unmerged_mix(model, spec, [(adapters[0], 1.0)]),
        merge_mix(model, spec, [(a, 0.5) for a in adapters]),
    ]
    x = torch.randn(5, 8)
    expected = []
    for mix in mixes:
        with use_mix(mix), torch.no_grad():
            expected.append(model(x))
    start = threading.Barrier(2)
    wrong: list[int] = []

    def run(index: int) -> None:
        start.wait()
        with use_mix(mixes[index]), torch.no_grad():
            for _ in range(50):
                if not torch.equal(model(x), expected[index]):
                    wrong.append(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert wrong == [] and active_mix() is None
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)


@pytest.mark.parametrize("targets", ["attention", "full"])
def test_on_a_unet_unmerged_equals_merged(base_model: BaseModel, targets: str) -> None:
    unet = copy.deepcopy(base_model.unet).float()
    spec = lora_spec(unet, base_model_id="test/base", base_model_hash=HASH, targets=targets)
    mix = [(random_adapter(spec, 4, 4.0, seed=s, std=0.05), w) for s, w in ((9, 0.6), (10, 0.4))]
    install_mixing(unet, spec)
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(2, 6, unet.config.cross_attention_dim, generator=generator)

    with torch.no_grad():
        base = unet(x, 10, encoder_hidden_states=context).sample
        with use_mix(unmerged_mix(unet, spec, mix)):
            unmerged = unet(x, 10, encoder_hidden_states=context).sample
        with use_mix(merge_mix(unet, spec, mix)):
            merged = unet(x, 10, encoder_hidden_states=context).sample

    if targets == "full":
        assert any(isinstance(m, MixedConv2d) for m in unet.modules())
    torch.testing.assert_close(unmerged, merged, atol=1e-4, rtol=1e-4)
    assert (unmerged - base).abs().max() > 1e-3  # the adapters did something


def each_alone(
    model: torch.nn.Module, spec: LoraSpec, mixes: list, x: torch.Tensor
) -> torch.Tensor:
    """Row i of `x` through the model under mixes[i % len(mixes)], one row at a time."""
    rows = []
    for index in range(x.shape[0]):
        mix = mixes[index % len(mixes)]
        active = unmerged_mix(model, spec, mix) if mix else None
        with use_mix(active), torch.no_grad():
            rows.append(model(x[index : index + 1]))
    return torch.cat(rows)


def test_each_sample_of_a_batch_gets_its_own_mix_on_linear_layers() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    adapters = [random_adapter(spec, r, 2.0, seed=10 + r, std=0.3) for r in (2, 3, 5)]
    only_first = pairs_adapter({"0": (torch.randn(RANK, 8), torch.randn(16, RANK))}, alpha=1.0)
    mixes = [
        [(adapters[0], 0.7), (adapters[1], 0.4)],
        [],  # the base alone
        [(adapters[2], 1.0)],
        [(only_first, 0.5), (adapters[0], 0.2)],  # a layer only some samples' adapters touch
    ]
    install_mixing(model, spec)
    batch = per_sample_mix([unmerged_mix(model, spec, m) if m else None for m in mixes])
    x = torch.randn(8, 7, 8)  # two rows per sample, as classifier-free guidance doubles them

    with use_mix(batch), torch.no_grad():
        together = model(x)

    assert batch.samples == 4 and set(batch.per_sample) == {"0", "2", "3"}
    stacked = batch.per_sample["2"]
    assert isinstance(stacked, SampleTerms)
    assert stacked.a.shape == (4, 16, 5)  # A transposed, zero-padded to the largest rank
    torch.testing.assert_close(together, each_alone(model, spec, mixes, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1::4], model(x[1::4]), atol=1e-6, rtol=0)


def test_each_sample_of_a_batch_gets_its_own_mix_on_conv_pairs() -> None:
    model = conv_model()
    names = ["0", "2", "3", "4"]
    spec = spec_of(model, names)
    mixes = [
        [(conv_pairs(model, names, seed=3), 0.5), (conv_pairs(model, ["2", "4"], seed=4), 1.5)],
        [(conv_pairs(model, names, seed=5), 1.0)],
        [],
    ]
    install_mixing(model, spec)
    batch = per_sample_mix([unmerged_mix(model, spec, m) if m else None for m in mixes])
    x = torch.randn(6, 4, 9, 11)

    with use_mix(batch), torch.no_grad():
        together = model(x)

    torch.testing.assert_close(together, each_alone(model, spec, mixes, x), atol=1e-5, rtol=1e-5)
    stacks = [s for s in batch.per_sample.values() if isinstance(s, SampleTerms)]
    assert len(stacks) == 4 and batch.nbytes == tensor_bytes(
        [t for s in stacks for t in (s.a, s.b)]
    )


def test_each_sample_gets_its_merged_weights_on_linear_layers_within_the_budget() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    shared = random_adapter(spec, 2, 2.0, seed=20, std=0.3)
    own = [random_adapter(spec, 3, 3.0, seed=21 + i, std=0.3) for i in range(3)]
    mixes = [
        [(shared, 0.5), (own[0], 1.0)],
        [(shared, 0.5), (own[1], 0.3)],  # two samples sharing an adapter at the same weight
        [(own[2], 0.0)],  # a zero-weight adapter: the base alone
        [(own[2], 0.8), (shared, 0.1)],
    ]
    install_mixing(model, spec)
    samples = [unmerged_mix(model, spec, m) for m in mixes]
    # Rank 5 against each layer: "3" (12 -> 5) costs most, then "0" (8 -> 16), then "2".
    budget = 4 * 4 * (12 * 5 + 8 * 16)  # four samples' float32 copies of "3" and "0"
    batch = per_sample_mix(samples, unet=model, merge_bytes=budget)
    x = torch.randn(8, 7, 8)

    with use_mix(batch), torch.no_grad():
        together = model(x)

    kinds = {module: type(stacked) for module, stacked in batch.per_sample.items()}
    assert kinds == {"3": SampleWeights, "0": SampleWeights, "2": SampleTerms}
    torch.testing.assert_close(together, each_alone(model, spec, mixes, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[2::4], model(x[2::4]), atol=1e-6, rtol=0)
    everything = per_sample_mix(samples, unet=model, merge_bytes=1 << 20)
    assert all(isinstance(s, SampleWeights) for s in everything.per_sample.values())
    with use_mix(everything), torch.no_grad():
        torch.testing.assert_close(model(x), together, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the unet"):
        per_sample_mix(samples, merge_bytes=budget)


def test_each_sample_gets_its_merged_weights_on_conv_layers() -> None:
    model = conv_model()  # strides, dilation, reflect padding, a 1x1 and a bias-free conv
    names = ["0", "2", "3", "4"]
    spec = spec_of(model, names)
    mixes = [
        [(conv_pairs(model, names, seed=6), 0.5), (conv_pairs(model, ["2", "4"], seed=7), 1.5)],
        [],
        [(conv_pairs(model, names, seed=8), 1.0)],
    ]
    install_mixing(model, spec)
    batch = per_sample_mix(
        [unmerged_mix(model, spec, m) if m else None for m in mixes],
        unet=model,
        merge_bytes=1 << 20,
    )
    x = torch.randn(6, 4, 9, 11)

    with use_mix(batch), torch.no_grad():
        together = model(x)

    weights = [s for s in batch.per_sample.values() if isinstance(s, SampleWeights)]
    assert len(weights) == 4
    torch.testing.assert_close(together, each_alone(model, spec, mixes, x), atol=1e-5, rtol=1e-5)
    assert batch.nbytes == tensor_bytes(
        [t for s in weights for t in (s.weight, s.bias) if t is not None]
    )


def test_a_per_sample_mix_refuses_a_batch_it_was_not_built_for() -> None:
    model = linear_model()
    spec = spec_of(model, ["0", "2", "3"])
    adapter = random_adapter(spec, RANK, 2.0, seed=9)
    install_mixing(model, spec)
    batch = per_sample_mix([unmerged_mix(model, spec, [(adapter, 1.0)]), None, None])

    with use_mix(batch), pytest.raises(ValueError, match="4 rows cannot carry 3"):
        model(torch.randn(4, 8))
    with pytest.raises(ValueError, match="built from unmerged mixes"):
        per_sample_mix([merge_mix(model, spec, [(adapter, 1.0)])])
