"""The protocol's maths on its own: masks cancel, dropouts are recovered, misuse is refused."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.secagg.crypto import SecretSharingError, combine_secret, split_secret
from tessera.secagg.protocol import (
    Participant,
    Peer,
    ProtocolError,
    group_context,
    unmask_sum,
)
from tessera.secagg.vector import FixedPoint

CONTEXT = group_context(7, 0)
LENGTH = 257


def _setup(ids: list[int], threshold: int) -> tuple[dict[int, Participant], dict[int, Peer]]:
    """Participants past the keys and shares phases (every one in U1 and U2)."""
    devices = {i: Participant(client_id=i, context=CONTEXT, threshold=threshold) for i in ids}
    peers = {
        i: Peer(i, index, d.c.public, d.s.public)
        for index, (i, d) in enumerate(sorted(devices.items()), start=1)
    }
    outboxes = {i: d.share(list(peers.values())) for i, d in devices.items()}
    for i, device in devices.items():
        device.receive({sender: box[i] for sender, box in outboxes.items() if sender != i})
    return devices, peers


def _inputs(ids: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**32, LENGTH, dtype=np.uint64).astype(np.uint32) for i in ids}


def test_shamir_shares_give_the_secret_back_from_any_threshold_and_not_fewer() -> None:
    secret = bytes(range(48))
    shares = split_secret(secret, threshold=3, count=5)

    assert combine_secret({1: shares[0], 4: shares[3], 5: shares[4]}, threshold=3) == secret
    assert combine_secret({2: shares[1], 3: shares[2], 5: shares[4]}, threshold=3) == secret
    with pytest.raises(SecretSharingError, match="2 shares, 3 needed"):
        combine_secret({1: shares[0], 2: shares[1]}, threshold=3)


def test_masks_cancel_in_the_sum_of_all_inputs() -> None:
    ids = [3, 5, 8, 13]
    devices, peers = _setup(ids, threshold=3)
    inputs = _inputs(ids)

    masked = {i: devices[i].mask(inputs[i], ids) for i in ids}
    reveals = {i: devices[i].reveal(ids) for i in ids}
    total = unmask_sum(
        sum(masked.values(), np.zeros(LENGTH, np.uint32)),
        peers=peers,
        shared=ids,
        masked=ids,
        reveals=reveals,
        threshold=3,
        context=CONTEXT,
    )

    assert np.array_equal(total, sum(inputs.values(), np.zeros(LENGTH, np.uint32)))
    assert not any(np.array_equal(masked[i], inputs[i]) for i in ids)


def test_dropped_devices_masks_are_removed_and_survivors_sum_is_exact() -> None:
    ids = [1, 2, 3, 4, 5, 6, 7]
    devices, peers = _setup(ids, threshold=4)
    inputs = _inputs(ids, seed=1)
    survivors = [1, 3, 4, 6, 7]  # 2 and 5 sent shares, then no masked input
    masked = {i: devices[i].mask(inputs[i], ids) for i in survivors}
    answering = [1, 4, 6, 7]  # 3 sent its masked input, then dropped too

    reveals = {i: devices[i].reveal(survivors) for i in answering}
    total = unmask_sum(
        sum(masked.values(), np.zeros(LENGTH, np.uint32)),
        peers=peers,
        shared=ids,
        masked=survivors,
        reveals=reveals,
        threshold=4,
        context=CONTEXT,
    )

    assert np.array_equal(total, sum((inputs[i] for i in survivors), np.zeros(LENGTH, np.uint32)))
    assert set(reveals[1].b_shares) == set(survivors) and set(reveals[1].s_shares) == {2, 5}


def test_too_few_reveals_cannot_unmask() -> None:
    ids = [1, 2, 3, 4]
    devices, peers = _setup(ids, threshold=3)
    inputs = _inputs(ids)
    masked = {i: devices[i].mask(inputs[i], ids) for i in ids}

    with pytest.raises(ProtocolError, match="2 shares of device 1's b secret; need 3"):
        unmask_sum(
            sum(masked.values(), np.zeros(LENGTH, np.uint32)),
            peers=peers,
            shared=ids,
            masked=ids,
            reveals={i: devices[i].reveal(ids) for i in (1, 2)},
            threshold=3,
            context=CONTEXT,
        )


def test_a_device_answers_the_unmasking_once_and_never_for_itself_as_dropped() -> None:
    ids = [1, 2, 3, 4]
    devices, _ = _setup(ids, threshold=3)
    inputs = _inputs(ids)
    for i in ids:
        devices[i].mask(inputs[i], ids)
    devices[1].reveal([1, 2, 3, 4])

    with pytest.raises(ProtocolError, match="already answered"):
        devices[1].reveal([1, 2, 3])  # with 4 called dropped, b_4 and s_4 would both leak
    with pytest.raises(ProtocolError, match="U3 must hold this device"):
        devices[2].reveal([1, 3, 4])
    with pytest.raises(ProtocolError, match="need 3"):
        devices[3].reveal([3, 4])


def test_an_altered_share_does_not_authenticate() -> None:
    devices = {i: Participant(client_id=i, context=CONTEXT, threshold=2) for i in (1, 2, 3)}
    peers = [Peer(i, i, d.c.public, d.s.public) for i, d in devices.items()]
    boxes = {i: d.share(peers) for i, d in devices.items()}
    forged = bytearray(boxes[1][2])
    forged[-1] ^= 1

    with pytest.raises(ProtocolError, match="do not authenticate"):
        devices[2].receive({1: bytes(forged)})
    with pytest.raises(ProtocolError, match="do not authenticate"):
        devices[3].receive({1: boxes[1][2]})  # sealed for 2, replayed to 3


def test_fixed_point_sums_of_count_inputs_decode_within_the_rounding_error() -> None:
    fixed = FixedPoint(value_range=1.0, count=8)
    rng = np.random.default_rng(0)
    values = rng.uniform(-1.0, 1.0, (8, 1000))
    values[0, :3] = [1.0, -1.0, 5.0]  # at the range's ends, and clipped to it

    total = sum((fixed.encode(v) for v in values), np.zeros(1000, np.uint32))
    decoded = fixed.decode(total)

    expected = np.clip(values, -1.0, 1.0).sum(axis=0)
    assert np.abs(decoded - expected).max() <= 8 * fixed.step / 2 + 1e-12
    with pytest.raises(ValueError, match="too wide"):
        _ = FixedPoint(value_range=1e9, count=8).scale


def test_a_device_refuses_a_threshold_of_half_or_less() -> None:
    devices = {i: Participant(client_id=i, context=CONTEXT, threshold=2) for i in (1, 2, 3, 4)}
    peers = [Peer(i, i, d.c.public, d.s.public) for i, d in devices.items()]

    with pytest.raises(ProtocolError, match="threshold 2 is not more than half of the 4"):
        devices[1].share(peers)
