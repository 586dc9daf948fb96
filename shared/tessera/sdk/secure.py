"""A device's side of a secure round over HTTP: train B on the round's frozen A, send it masked.

    secure = SecureRound(device, round_id)
    start = secure.start_adapter(synced.start_adapter)  # the frozen A, B to train from
    trained = device.train(images, captions, start=start, train_a=False).adapter
    secure.run(trained, num_samples=len(images))  # keys, shares, masked input, reveal

Each step is also a method of its own (`send_keys`, `send_shares`, `send_masked`,
`send_reveal`, `wait`), so that a test or the simulator can stop a device between any two.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import torch

from tessera.lora import LoraAdapter, LoraSpec
from tessera.sdk.device import DeviceClient
from tessera.secagg.protocol import Participant, Peer, group_context
from tessera.secagg.vector import FixedPoint, device_input, frozen_a, frozen_adapter, zero_b

FINISHED = ("ready", "failed")


class SecureRoundError(RuntimeError):
    """The cluster's secure aggregation failed, or a phase did not end in time."""


class SecureRound:
    """One device in its cluster's secure aggregation of one round."""

    def __init__(self, device: DeviceClient, round_id: int, *, spec: LoraSpec | None = None):
        self.device = device
        self.round_id = round_id
        self.spec = spec if spec is not None else device.base.lora_spec
        self.state = self.fetch()
        self.participant = Participant(
            client_id=device.client_id,
            context=group_context(round_id, int(self.state["label"])),
            threshold=int(self.state["threshold"]),
        )

    @property
    def path(self) -> str:
        return f"/v1/rounds/{self.round_id}/secagg"

    def fetch(self) -> dict[str, Any]:
        """The device's view of the protocol now (the server advances timed-out phases)."""
        state: dict[str, Any] = self.device._call("GET", self.path).json()
        self.state = state
        return state

    # -- what the device trains ----------------------------------------------------------------

    def frozen_a(self) -> dict[str, torch.Tensor]:
        """The round's A per module, derived from the seed the server handed out."""
        return frozen_a(self.spec, rank=int(self.state["rank"]), seed=int(self.state["a_seed"]))

    def start_adapter(self, start: LoraAdapter | None = None) -> LoraAdapter:
        """The frozen A, with B from `start` (the cluster's adapter) when `start` was trained on
        the same A (a cluster's earlier secure round), else B = 0."""
        rank, alpha = int(self.state["rank"]), float(self.state["alpha"])
        a = self.frozen_a()
        b = zero_b(self.spec, rank=rank)
        same = (
            start is not None
            and start.rank == rank
            and set(start.modules) == set(a)
            and all(torch.allclose(start.flat_pair(m)[0], a[m].flatten(1), atol=1e-3) for m in a)
        )
        if start is not None and same:
            # the start's products on this round's exact A: its B rescaled to this alpha
            b = {m: start.pair(m)[1].float() * (start.scale * rank / alpha) for m in a}
        return frozen_adapter(self.spec, a, b, rank=rank, alpha=alpha)

    # -- the protocol's steps --------------------------------------------------------------------

    def send_keys(self) -> dict[str, Any]:
        body = {
            "c_public": _b64(self.participant.c.public),
            "s_public": _b64(self.participant.s.public),
        }
        return self._post("/keys", body)

    def send_shares(self) -> dict[str, Any]:
        self.participant.threshold = int(self.state["threshold"])  # fixed with U1
        peers = [
            Peer(
                client_id=int(p["client_id"]),
                index=int(p["index"]),
                c_public=base64.b64decode(p["c_public"]),
                s_public=base64.b64decode(p["s_public"]),
            )
            for p in self.state["peers"]
        ]
        sealed = self.participant.share(peers)
        body = {
            "shares": [
                {"recipient_id": recipient, "sealed": _b64(data)}
                for recipient, data in sorted(sealed.items())
            ]
        }
        return self._post("/shares", body)

    def weight(self, num_samples: int) -> float:
        if self.state["weighting"] == "equal":
            return 1.0
        cap = int(self.state["sample_cap"])
        return min(num_samples, cap) / cap

    def encode(self, adapter: LoraAdapter, *, num_samples: int) -> np.ndarray:
        """The adapter's B (norm-clipped, weighted) as fixed-point uint32 values."""
        if adapter.rank != int(self.state["rank"]) or adapter.alpha != float(self.state["alpha"]):
            raise ValueError(
                f"a secure update has rank {self.state['rank']} and alpha {self.state['alpha']}"
            )
        values = device_input(
            adapter,
            self.spec,
            weight=self.weight(num_samples),
            clip_norm=self.state["clip_norm"],
        ).values
        fixed = FixedPoint(float(self.state["value_range"]), count=len(self.state["peers"]))
        return fixed.encode(values)

    def send_masked(self, adapter: LoraAdapter, *, num_samples: int) -> dict[str, Any]:
        """Open the shares sealed for this device, then send the masked input."""
        sealed = self.device._call("GET", f"{self.path}/shares").json()
        self.participant.receive(
            {int(s["sender_id"]): base64.b64decode(s["sealed"]) for s in sealed}
        )
        masked = self.participant.mask(
            self.encode(adapter, num_samples=num_samples), self.state["shared"]
        )
        response = self.device._call(
            "PUT",
            f"{self.path}/masked",
            content=masked.astype("<u4").tobytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        self.state = response.json()
        return self.state

    def send_reveal(self) -> dict[str, Any]:
        reveal = self.participant.reveal(self.state["masked"])
        body = {
            "b_shares": {str(k): _b64(v) for k, v in reveal.b_shares.items()},
            "s_shares": {str(k): _b64(v) for k, v in reveal.s_shares.items()},
        }
        return self._post("/unmask", body)

    def wait(self, phase: str, *, timeout_s: float = 600.0, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll until the cluster is in `phase` (or past it); raise if it failed."""
        order = ["keys", "shares", "masked", "unmasking", "ready"]
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.fetch()
            if state["phase"] == "failed":
                raise SecureRoundError(state["error"] or "the secure aggregation failed")
            if order.index(state["phase"]) >= order.index(phase):
                return state
            if time.monotonic() > deadline:
                raise SecureRoundError(f"phase {phase} did not start within {timeout_s} s")
            time.sleep(poll_s)

    def run(
        self,
        adapter: LoraAdapter,
        *,
        num_samples: int,
        timeout_s: float = 600.0,
        poll_s: float = 0.2,
    ) -> dict[str, Any]:
        """Every step, waiting for the cluster between them (asking every `poll_s` seconds);
        the final state."""
        self.send_keys()
        self.wait("shares", timeout_s=timeout_s, poll_s=poll_s)
        self.send_shares()
        self.wait("masked", timeout_s=timeout_s, poll_s=poll_s)
        self.send_masked(adapter, num_samples=num_samples)
        self.wait("unmasking", timeout_s=timeout_s, poll_s=poll_s)
        self.send_reveal()
        return self.wait("ready", timeout_s=timeout_s, poll_s=poll_s)

    def _post(self, step: str, body: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = self.device._call("POST", f"{self.path}{step}", json=body).json()
        self.state = state
        return state


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
