"""Pairwise masking with dropout recovery (Bonawitz et al., CCS 2017), for one cluster's round.

The sets, as in the paper: U1 advertised keys, U2 sent shares, U3 sent masked inputs, U4
answered the unmasking. Each device u has two X25519 key pairs (c: encrypts the shares it sends
through the server; s: agrees the pairwise masks) and a self-mask seed b_u. It Shamir-shares
b_u and its s private key among U1, threshold t, and sends
`y_u = x_u + PRG(b_u) + sum_{v in U2, u < v} PRG(s_uv) - sum_{v in U2, u > v} PRG(s_uv)`
(mod 2^32). Pairwise masks cancel in the sum over U3 except with the dropped devices U2 \\ U3;
the server asks each survivor for its shares of b_u (u in U3) and of s_v (v in U2 \\ U3),
never both for one device, rebuilds them from t shares and removes the leftover masks.
A device answers the unmasking once: asked again with other sets, it refuses.

The server is trusted to relay honestly (semi-honest model, no signatures): it learns the sum
over U3 and nothing about one input while fewer than t devices collude with it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from tessera.secagg.crypto import (
    SEED_BYTES,
    KeyPair,
    agree,
    combine_secret,
    derive,
    keystream_u32,
    public_key_of,
    seal,
    split_secret,
    unseal,
)

_IDS = struct.Struct(">QQ")
KEY_BYTES = 32


class ProtocolError(ValueError):
    """A step the protocol forbids (a set too small, a second unmasking, a forged share)."""


def group_context(round_id: int, label: int) -> bytes:
    """Bound into every key derivation and ciphertext of one cluster's round."""
    return f"tessera-secagg/v1/round={round_id}/cluster={label}".encode()


@dataclass(frozen=True)
class Peer:
    """A device of U1 as the server lists it: its share index and public keys."""

    client_id: int
    index: int
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class Reveal:
    """One survivor's answer to the unmasking: shares keyed by the device they belong to."""

    b_shares: Mapping[int, bytes]
    s_shares: Mapping[int, bytes]


@dataclass
class Participant:
    """One device's side of the protocol; its secrets never leave it in the clear."""

    client_id: int
    context: bytes
    threshold: int
    c: KeyPair = field(default_factory=KeyPair.generate)
    s: KeyPair = field(default_factory=KeyPair.generate)
    seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    peers: dict[int, Peer] = field(default_factory=dict)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (b, s) shares
    shared: tuple[int, ...] = ()
    answered: tuple[int, ...] | None = None

    def share(self, peers: Collection[Peer]) -> dict[int, bytes]:
        """Shares of b_u and s_u^SK for every other device of U1, each sealed for it."""
        self.peers = {peer.client_id: peer for peer in peers}
        me = self.peers.get(self.client_id)
        if me is None or (me.c_public, me.s_public) != (self.c.public, self.s.public):
            raise ProtocolError("the server's key list does not hold this device's keys")
        if len(self.peers) < self.threshold:
            raise ProtocolError(f"{len(self.peers)} devices advertised keys; need {self.threshold}")
        if 2 * self.threshold <= len(self.peers):
            # Each device reveals b or s of another, never both: with t > n / 2, no server can
            # gather t shares of both for one device by telling devices different stories.
            raise ProtocolError(
                f"threshold {self.threshold} is not more than half of the {len(self.peers)} "
                "devices of U1"
            )
        indexes = sorted(peer.index for peer in peers)
        if indexes != list(range(1, len(indexes) + 1)):
            raise ProtocolError("share indexes are not 1..n")
        count = len(indexes)
        b_shares = split_secret(self.seed, threshold=self.threshold, count=count)
        s_shares = split_secret(self.s.private, threshold=self.threshold, count=count)
        sealed: dict[int, bytes] = {}
        for peer in self.peers.values():
            pair = (b_shares[peer.index - 1], s_shares[peer.index - 1])
            if peer.client_id == self.client_id:
                self.held[self.client_id] = pair
                continue
            ids = _IDS.pack(self.client_id, peer.client_id)
            key = agree(self.c.private, peer.c_public, label=self.context + b"/shares")
            sealed[peer.client_id] = seal(key, ids + pair[0] + pair[1], context=self.context + ids)
        return sealed

    def receive(self, sealed: Mapping[int, bytes]) -> None:
        """Open the shares other devices sealed for this one (raises on any forgery)."""
        for sender, ciphertext in sealed.items():
            peer = self.peers.get(sender)
            if peer is None or sender == self.client_id:
                raise ProtocolError(f"shares from {sender}, who is not another device of U1")
            ids = _IDS.pack(sender, self.client_id)
            key = agree(self.c.private, peer.c_public, label=self.context + b"/shares")
            try:
                plain = unseal(key, ciphertext, context=self.context + ids)
            except Exception as error:  # cryptography's InvalidTag
                raise ProtocolError(f"the shares from {sender} do not authenticate") from error
            if plain[: _IDS.size] != ids or len(plain) != _IDS.size + SEED_BYTES + KEY_BYTES:
                raise ProtocolError(f"the shares from {sender} are malformed")
            body = plain[_IDS.size :]
            self.held[sender] = (body[:SEED_BYTES], body[SEED_BYTES:])

    def mask(self, encoded: np.ndarray, shared: Collection[int]) -> np.ndarray:
        """The masked input y_u of the encoded (uint32) input, given U2."""
        shared_set = set(shared)
        if self.client_id not in shared_set or not shared_set <= set(self.peers):
            raise ProtocolError("U2 must hold this device and only devices of U1")
        if len(shared_set) < self.threshold:
            raise ProtocolError(f"{len(shared_set)} devices sent shares; need {self.threshold}")
        missing = shared_set - set(self.held)
        if missing:
            raise ProtocolError(f"no shares held from devices {sorted(missing)} of U2")
        self.shared = tuple(sorted(shared_set))
        count = encoded.shape[0]
        masked = encoded.astype(np.uint32) + self_mask(self.seed, self.context, count)
        for other in self.shared:
            if other == self.client_id:
                continue
            pad = pair_mask(self.s.private, self.peers[other].s_public, self.context, count)
            masked = masked + pad if self.client_id < other else masked - pad
        return masked

    def reveal(self, masked: Collection[int]) -> Reveal:
        """Shares of b for U3 and of s for U2 \\ U3: once, and only for sets that make sense."""
        survivors = tuple(sorted(set(masked)))
        if self.answered is not None and self.answered != survivors:
            raise ProtocolError("already answered the unmasking for another set of survivors")
        if self.client_id not in survivors or not set(survivors) <= set(self.shared):
            raise ProtocolError("U3 must hold this device and only devices of U2")
        if len(survivors) < self.threshold:
            raise ProtocolError(f"{len(survivors)} masked inputs; need {self.threshold}")
        self.answered = survivors
        dropped = sorted(set(self.shared) - set(survivors))
        return Reveal(
            b_shares={owner: self.held[owner][0] for owner in survivors},
            s_shares={owner: self.held[owner][1] for owner in dropped},
        )


def self_mask(seed: bytes, context: bytes, count: int) -> np.ndarray:
    return keystream_u32(derive(seed, label=context + b"/self-mask"), count)


def pair_mask(private: bytes, peer_public: bytes, context: bytes, count: int) -> np.ndarray:
    return keystream_u32(agree(private, peer_public, label=context + b"/pair-mask"), count)


def unmask_sum(
    masked_sum: np.ndarray,
    *,
    peers: Mapping[int, Peer],
    shared: Collection[int],
    masked: Collection[int],
    reveals: Mapping[int, Reveal],
    threshold: int,
    context: bytes,
) -> np.ndarray:
    """The sum of the inputs of U3 from the sum of their masked inputs and U4's reveals.

    Raises ProtocolError when fewer than `threshold` devices revealed a secret, or when a
    rebuilt s key does not match the public key its device advertised.
    """
    count = masked_sum.shape[0]
    total = masked_sum.astype(np.uint32).copy()
    survivors = sorted(set(masked))
    dropped = sorted(set(shared) - set(survivors))
    for owner in survivors:
        seed = _rebuild(owner, "b", peers, reveals, threshold)
        total -= self_mask(seed, context, count)
    for gone in dropped:
        private = _rebuild(gone, "s", peers, reveals, threshold)
        if public_key_of(private) != peers[gone].s_public:
            raise ProtocolError(f"the rebuilt mask key of device {gone} does not match its own")
        for owner in survivors:
            pad = pair_mask(private, peers[owner].s_public, context, count)
            # y_owner carried +pad if owner < gone, else -pad
            total = total - pad if owner < gone else total + pad
    return total


def _rebuild(
    owner: int, kind: str, peers: Mapping[int, Peer], reveals: Mapping[int, Reveal], threshold: int
) -> bytes:
    shares = {
        peers[revealer].index: (reveal.b_shares if kind == "b" else reveal.s_shares)[owner]
        for revealer, reveal in reveals.items()
        if owner in (reveal.b_shares if kind == "b" else reveal.s_shares)
    }
    if len(shares) < threshold:
        raise ProtocolError(
            f"{len(shares)} shares of device {owner}'s {kind} secret; need {threshold}"
        )
    return combine_secret(shares, threshold=threshold)
