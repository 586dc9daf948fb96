"""Privacy accounting of the federation's DP rounds, by Google's `dp-accounting` library.

A DP round releases, per cluster, the Gaussian mechanism on the sum of its updates' clipped
products (`tessera.lora.aggregate.aggregate_private`): L2 sensitivity `clip_norm`, noise
`N(0, (noise_multiplier * clip_norm)^2)` on every coordinate. One device's loss in one round is
therefore a `GaussianDpEvent(noise_multiplier)`, and its loss over the rounds it took part in is
their composition, which the library's RDP accountant turns into epsilon at a delta.

Assumptions, stated where the numbers are shown:
- *No amplification by sampling.* A device decides itself whether it uploads to a round, so no
  sampling probability is claimed: each round a device took part in counts in full.
- *Zero-out neighbours.* Two neighbouring rounds differ in one device's update being replaced
  by the zero update; who took part, and how many, is public (the round shows it). Under
  "replace one update by any other" the sensitivity doubles: epsilon is that of half the
  noise multiplier.
- Rounds a device uploaded to count from the moment it uploads (collecting, aggregating or
  published), whether its update was used or excluded: only a cancelled or failed round, which
  releases no adapter, does not count.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import dp_accounting
from dp_accounting.rdp import RdpAccountant

ACCOUNTANT = "dp-accounting RDP, Gaussian mechanism, no sampling amplification"


@functools.lru_cache(maxsize=4096)
def _epsilon(multipliers: tuple[float, ...], delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(
        dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in multipliers])
    )
    return float(accountant.get_epsilon(delta))


def epsilon(multipliers: Sequence[float], *, delta: float) -> float:
    """A device's epsilon at `delta` after one DP round per noise multiplier (0.0 for none)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if any(not z > 0 for z in multipliers):
        raise ValueError("every noise multiplier must be > 0")
    return _epsilon(tuple(sorted(multipliers)), delta) if multipliers else 0.0


def noise_multiplier_for(*, epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier whose `rounds` rounds cost at most `epsilon` at `delta`."""
    if epsilon <= 0 or rounds < 1:
        raise ValueError(f"need epsilon > 0 and rounds >= 1, got {epsilon} and {rounds}")
    return float(
        dp_accounting.calibrate_dp_mechanism(
            RdpAccountant,
            lambda z: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds),
            epsilon,
            delta,
            dp_accounting.mechanism_calibration.LowerEndpointAndGuess(1e-2, 1.0),
        )
    )
