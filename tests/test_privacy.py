"""Privacy accounting: the library's RDP accountant, composed per private round."""

from __future__ import annotations

import itertools

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from tessera.privacy import epsilon, noise_multiplier_for

DELTA = 1e-5


def library_epsilon(multiplier: float, rounds: int) -> float:
    accountant = RdpAccountant()
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier), rounds)
    return float(accountant.compose(event).get_epsilon(DELTA))


def test_epsilon_grows_with_rounds_and_is_the_library_number() -> None:
    values = [epsilon([2.0] * rounds, delta=DELTA) for rounds in range(1, 6)]

    assert values == [pytest.approx(library_epsilon(2.0, k), rel=1e-9) for k in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert epsilon([], delta=DELTA) == 0.0


def test_mixed_rounds_compose_in_any_order() -> None:
    mixed = epsilon([1.0, 4.0, 2.0], delta=DELTA)

    assert mixed == epsilon([4.0, 2.0, 1.0], delta=DELTA)
    assert epsilon([4.0, 2.0], delta=DELTA) < mixed < epsilon([1.0, 1.0, 1.0], delta=DELTA)


@pytest.mark.parametrize("target", [8.0, 4.0, 1.0])
def test_the_calibrated_multiplier_spends_the_budget_in_its_rounds(target: float) -> None:
    z = noise_multiplier_for(epsilon=target, delta=DELTA, rounds=8)

    assert epsilon([z] * 8, delta=DELTA) <= target * (1 + 1e-6)
    assert epsilon([z * 0.99] * 8, delta=DELTA) > target


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon([1.0], delta=0.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        epsilon([0.0], delta=DELTA)
    with pytest.raises(ValueError, match="epsilon > 0"):
        noise_multiplier_for(epsilon=0.0, delta=DELTA, rounds=8)
