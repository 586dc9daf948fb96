"""What an edge device runs: encode locally, sync its cluster's adapter, train, upload, generate.

Only encodings and LoRA files leave the device. The device keeps its personalised adapter (its
cluster's adapter plus its own fine-tuning) in its state folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
import torch

from tessera.lora import LoraAdapter, adapter_from_bytes, adapter_to_bytes
from tessera.lora.train import TrainResult, train_lora
from tessera.model.base import BaseModel, load_base_model
from tessera.model.conditioning import Conditioning
from tessera.model.encoder import encode_tasks, task_encoder_info
from tessera.model.generate import GenerationResult, generate
from tessera.sdk.http import ApiError, RetryPolicy, Traffic, request

STATE_FILE = "device.json"
PERSONAL_FILE = "personal.safetensors"


@dataclass(frozen=True)
class Synced:
    """The device's assignment and the adapter it starts training from (None: from scratch)."""

    assignment: dict[str, Any]
    start_adapter: LoraAdapter | None
    start_version_id: int | None

    @property
    def cluster(self) -> int | None:
        """The device's cluster label, if it has one yet."""
        cluster: int | None = self.assignment.get("cluster")
        return cluster

    @property
    def current_round(self) -> dict[str, Any] | None:
        """The round now open (or closing), if any."""
        current: dict[str, Any] | None = self.assignment.get("current_round")
        return current


class DeviceClient:
    """One enrolled device talking to the aggregator; state in `state_dir` when given."""

    def __init__(
        self,
        *,
        aggregator_url: str,
        token: str,
        client_id: int,
        name: str = "",
        state_dir: Path | None = None,
        base: BaseModel | None = None,
        http: httpx.Client | None = None,
        policy: RetryPolicy | None = None,
        timeout_s: float = 60.0,
        direct_upload_max_bytes: int | None = None,
    ):
        self.aggregator_url = aggregator_url.rstrip("/")
        # Larger updates go straight to the object store through an upload slot.
        self.direct_upload_max_bytes = direct_upload_max_bytes
        self._open_slots: dict[tuple[int, str], str] = {}  # (round, sha256) -> slot token
        self.token = token
        self.client_id = client_id
        self.name = name
        self.state_dir = state_dir
        self._base = base
        self.http = http or httpx.Client(timeout=timeout_s)
        # Presigned URLs point at the object store, not the aggregator: a client of their own.
        self.downloads = httpx.Client(timeout=timeout_s)
        self.policy = policy or RetryPolicy()
        self.traffic = Traffic()
        self._personal: LoraAdapter | None = None

    # -- enrolment and state -------------------------------------------------------------

    @classmethod
    def enrol(
        cls,
        *,
        aggregator_url: str,
        operator_token: str,
        name: str,
        state_dir: Path | None = None,
        **kwargs: Any,
    ) -> DeviceClient:
        """Register a new device with an operator's token and keep its own token."""
        http = kwargs.pop("http", None) or httpx.Client(timeout=kwargs.pop("timeout_s", 60.0))
        policy = kwargs.pop("policy", None) or RetryPolicy()
        response = request(
            http,
            "POST",
            f"{aggregator_url.rstrip('/')}/v1/clients",
            policy=policy,
            json={"name": name, "role": "device"},
            headers={"Authorization": f"Bearer {operator_token}"},
        )
        body = response.json()
        device = cls(
            aggregator_url=aggregator_url,
            token=body["token"],
            client_id=int(body["id"]),
            name=name,
            state_dir=state_dir,
            http=http,
            policy=policy,
            **kwargs,
        )
        device.save()
        return device

    @classmethod
    def load(cls, state_dir: Path, **kwargs: Any) -> DeviceClient:
        """The device enrolled earlier into `state_dir`."""
        path = state_dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"no device enrolled in {state_dir}: run `tessera device enrol`"
            )
        state = json.loads(path.read_text())
        return cls(
            aggregator_url=state["aggregator_url"],
            token=state["token"],
            client_id=int(state["client_id"]),
            name=state.get("name", ""),
            state_dir=state_dir,
            **kwargs,
        )

    def save(self) -> None:
        """Write the device's identity to its state folder (token readable by the owner only)."""
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / STATE_FILE
        state = {
            "aggregator_url": self.aggregator_url,
            "token": self.token,
            "client_id": self.client_id,
            "name": self.name,
        }
        path.write_text(json.dumps(state, indent=2) + "\n")
        path.chmod(0o600)

    @property
    def base(self) -> BaseModel:
        """The base model, loaded on first use (the same folder the server serves)."""
        if self._base is None:
            self._base = load_base_model()
        return self._base

    # -- talking to the aggregator ---------------------------------------------------------

    @cached_property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._auth, **kwargs.pop("headers", {})}
        return request(
            self.http,
            method,
            f"{self.aggregator_url}{path}",
            policy=self.policy,
            traffic=self.traffic,
            headers=headers,
            **kwargs,
        )

    def encode(self, texts: Sequence[str]) -> Conditioning:
        """The base model's conditioning of each prompt, computed here (plaintext stays)."""
        return self.base.prompts.encode(list(texts))

    def task_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """Task-encoder vectors [n, width] of texts, for clustering and `auto` routing."""
        return encode_tasks(list(texts))

    def upload_task_descriptions(self, descriptions: Sequence[str]) -> dict[str, Any]:
        """Encode the device's task descriptions and upload only their task vectors."""
        vectors = self.task_vectors(descriptions)
        body = {"encoder_id": task_encoder_info().encoder_id, "vectors": vectors.tolist()}
        result: dict[str, Any] = self._call("POST", "/v1/devices/me/task-vectors", json=body).json()
        return result

    def assignment(self) -> dict[str, Any]:
        """The device's cluster, the adapter to start from and the current round."""
        result: dict[str, Any] = self._call("GET", "/v1/devices/me/assignment").json()
        return result

    def sync(self) -> Synced:
        """Fetch the assignment and download (or reuse the cached) start adapter."""
        assignment = self.assignment()
        info = assignment.get("start_adapter")
        if info is None:
            return Synced(assignment, None, None)
        return Synced(assignment, self.download_adapter(info), int(info["version_id"]))

    def download_adapter(self, info: dict[str, Any]) -> LoraAdapter:
        """An adapter version by its download info: cached by version id, sha256 checked."""
        cached = None if self.state_dir is None else self.state_dir / "adapters"
        path = None if cached is None else cached / f"{info['version_id']}.safetensors"
        if path is not None and path.exists():
            data = path.read_bytes()
        else:
            response = request(
                self.downloads,
                "GET",
                info["download_url"],
                policy=self.policy,
                traffic=self.traffic,
            )
            data = response.content
            digest = hashlib.sha256(data).hexdigest()
            if digest != info["sha256"]:
                raise ApiError(
                    "GET", info["download_url"], 200, f"sha256 {digest} != {info['sha256']}"
                )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        return adapter_from_bytes(data, self.base.lora_spec)

    # -- training and uploading --------------------------------------------------------------

    def train(
        self,
        images: torch.Tensor,
        token_embeds: Conditioning | torch.Tensor,
        *,
        start: LoraAdapter | None = None,
        **options: Any,
    ) -> TrainResult:
        """Fine-tune from `start` (the synced cluster adapter) and keep the result as personal."""
        result = train_lora(self.base, images, token_embeds, init=start, **options)
        self.personal = result.adapter
        return result

    @property
    def personal(self) -> LoraAdapter | None:
        """The device's personalised adapter (from memory, else its state folder)."""
        if self._personal is None and self.state_dir is not None:
            path = self.state_dir / PERSONAL_FILE
            if path.exists():
                self._personal = adapter_from_bytes(path.read_bytes(), self.base.lora_spec)
        return self._personal

    @personal.setter
    def personal(self, adapter: LoraAdapter) -> None:
        self._personal = adapter
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.state_dir / PERSONAL_FILE).write_bytes(adapter_to_bytes(adapter))

    def upload_update(
        self,
        round_id: int,
        adapter: LoraAdapter,
        *,
        num_samples: int,
        base_version_id: int | None = None,
        train_loss: float | None = None,
        dtype: str = "float16",
    ) -> dict[str, Any]:
        """Send the adapter (fp16 unless `dtype` says otherwise) as this device's update;
        retried and safe to re-send.

        Up to `direct_upload_max_bytes` (TESSERA_DIRECT_UPLOAD_MAX_BYTES) it is PUT to the
        aggregator; a larger one goes to the object store through an upload slot.
        """
        data = adapter_to_bytes(adapter, dtype=dtype)
        params: dict[str, Any] = {"num_samples": num_samples}
        if base_version_id is not None:
            params["base_version_id"] = base_version_id
        if train_loss is not None:
            params["train_loss"] = round(float(train_loss), 6)
        if len(data) > self._direct_limit():
            return self.upload_through_slot(round_id, data, commit=params)
        response = self._call(
            "PUT",
            f"/v1/rounds/{round_id}/updates/{self.client_id}",
            content=data,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
        )
        result: dict[str, Any] = response.json()
        return result

    def _direct_limit(self) -> int:
        if self.direct_upload_max_bytes is None:
            from tessera.config import get_settings

            self.direct_upload_max_bytes = get_settings().direct_upload_max_bytes
        return self.direct_upload_max_bytes

    def upload_through_slot(
        self, round_id: int, data: bytes, *, commit: dict[str, Any]
    ) -> dict[str, Any]:
        """Send an update file straight to the object store, then commit it.

        The slot is kept in the state folder (when there is one) until the commit: a call
        interrupted part-way, even in another process, resumes it, sending only the parts the
        store does not hold yet.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        saved = self._slot_file(round_id, sha256)
        slot = self._resume_slot(round_id, sha256, saved)
        if slot is None:
            body = {"size": len(data), "sha256": sha256}
            slot = self._call("POST", f"/v1/rounds/{round_id}/uploads", json=body).json()
            self._open_slots[(round_id, sha256)] = slot["slot"]
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps({"slot": slot["slot"]}) + "\n")
        for part in slot["parts"]:
            if part["url"] is None:
                continue
            start = (part["number"] - 1) * slot["part_bytes"]
            request(
                self.downloads,
                "PUT",
                part["url"],
                policy=self.policy,
                traffic=self.traffic,
                content=data[start : start + part["size"]],
            )
        response = self._call(
            "POST", f"/v1/rounds/{round_id}/uploads/{slot['slot']}/commit", json=commit
        )
        self._forget_slot(round_id, sha256, saved)
        result: dict[str, Any] = response.json()
        return result

    def _slot_file(self, round_id: int, sha256: str) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / "uploads" / f"round-{round_id}-{sha256}.json"

    def _resume_slot(self, round_id: int, sha256: str, saved: Path | None) -> dict[str, Any] | None:
        """The state of the slot open for this file (which parts the store holds), or None when
        there is none or it can no longer be used (expired, ended)."""
        token = self._open_slots.get((round_id, sha256))
        if token is None and saved is not None and saved.exists():
            token = json.loads(saved.read_text())["slot"]
        if token is None:
            return None
        try:
            slot: dict[str, Any] = self._call(
                "GET", f"/v1/rounds/{round_id}/uploads/{token}"
            ).json()
        except ApiError as error:
            if error.status not in (404, 410):
                raise
            self._forget_slot(round_id, sha256, saved)
            return None
        return slot

    def _forget_slot(self, round_id: int, sha256: str, saved: Path | None) -> None:
        self._open_slots.pop((round_id, sha256), None)
        if saved is not None:
            saved.unlink(missing_ok=True)

    def round(self, round_id: int) -> dict[str, Any]:
        """A round's state and progress."""
        result: dict[str, Any] = self._call("GET", f"/v1/rounds/{round_id}").json()
        return result

    # -- generating on the device ------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], *, adapter: LoraAdapter | None = None, **options: Any
    ) -> GenerationResult:
        """Generate here with the personal adapter (or `adapter`); prompts never leave."""
        chosen = adapter if adapter is not None else self.personal
        mix = [] if chosen is None else [(chosen, 1.0)]
        return generate(self.base, self.encode(prompts), mix, **options)

    def finish(
        self,
        prompts: Sequence[str],
        latents: torch.Tensor,
        *,
        start_step: int,
        steps: int,
        guidance: float,
        sampler: str | None = None,
        adapter: LoraAdapter | None = None,
    ) -> torch.Tensor:
        """Complete a split generation: the last `steps - start_step` steps, here."""
        result = self.generate(
            prompts,
            adapter=adapter,
            steps=steps,
            guidance=guidance,
            start_latents=latents,
            start_step=start_step,
            sampler=sampler,
        )
        assert result.images is not None
        return result.images
