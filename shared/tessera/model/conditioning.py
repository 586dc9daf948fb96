"""Conditioning: prompts encoded by the base model's own text encoder(s), on the device.

SD-1.x uses CLIP's last hidden states, SD-2.x OpenCLIP's (converted to `CLIPTextModel`), SDXL
the penultimate states of both encoders side by side plus the second one's pooled projection,
and the bundled tiny model MiniLM's token states. Only these tensors leave a device; they are
what generation requests carry and what training conditions on. The task vectors used for
clustering and routing come from a different model (`tessera.model.encoder`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tessera.model.facts import ModelFacts
    from tessera.model.layout import ModelLayout


@dataclass(frozen=True)
class Conditioning:
    """Token embeddings [n, T, width] and, for SDXL, pooled embeddings [n, pooled width]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def rows(self, index: torch.Tensor | slice) -> Conditioning:
        """The prompts at `index` (a batch of a training set)."""
        pooled = None if self.pooled is None else self.pooled[index]
        return Conditioning(self.embeds[index], pooled)

    def expand(self, n: int) -> Conditioning:
        """One prompt repeated for `n` images (a shared negative)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} prompts to {n}")
        pooled = None if self.pooled is None else self.pooled.expand(n, -1)
        return Conditioning(self.embeds.expand(n, -1, -1), pooled)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Conditioning:
        """On `device` in `dtype`."""
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Conditioning(self.embeds.to(device, dtype), pooled)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Stack the prompts of several conditionings (all with or all without pooled)."""
        embeds = torch.cat([part.embeds for part in parts])
        pooled = [part.pooled for part in parts]
        if all(p is None for p in pooled):
            return Conditioning(embeds)
        if any(p is None for p in pooled):
            raise ValueError("cannot mix conditionings with and without pooled embeddings")
        return Conditioning(embeds, torch.cat([p for p in pooled if p is not None]))


class PromptEncoder:
    """The model's tokenizer(s) and text encoder(s), loaded from its folder, in eval mode."""

    def __init__(self, layout: ModelLayout, facts: ModelFacts, device: str = "cpu"):
        self.facts = facts
        self.device = torch.device(device)
        self._pairs: list[tuple[Any, Any]] = []
        for encoder, tokenizer in layout.text_encoders:
            model = layout.load(encoder).to(self.device).eval()
            model.requires_grad_(False)
            self._pairs.append((layout.load(tokenizer), model))
        self._lock = threading.Lock()
        self._empty: Conditioning | None = None

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Conditioning:
        """Conditioning for each text: [n, cond_length, cond_width] (+ pooled for SDXL)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of prompts, not a single string")
        parts = [
            self._encode_batch([str(t) for t in texts[start : start + batch_size]])
            for start in range(0, len(texts), batch_size)
        ]
        if not parts:
            facts = self.facts
            pooled = None if facts.pooled_width is None else torch.zeros(0, facts.pooled_width)
            return Conditioning(torch.zeros(0, facts.cond_length, facts.cond_width), pooled)
        return Conditioning.cat(parts)

    def empty(self) -> Conditioning:
        """The unconditional prompt [1, ...]: zeros where the pipeline says so (SDXL), else ""."""
        with self._lock:
            if self._empty is None:
                encoded = self.encode([""])
                if self.facts.zeros_for_empty_prompt:
                    pooled = None if encoded.pooled is None else torch.zeros_like(encoded.pooled)
                    encoded = Conditioning(torch.zeros_like(encoded.embeds), pooled)
                self._empty = encoded
            return self._empty

    def _encode_batch(self, texts: list[str]) -> Conditioning:
        sdxl = self.facts.family == "sdxl"
        states: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for tokenizer, model in self._pairs:
            batch = tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=self.facts.cond_length,
                return_tensors="pt",
            )
            ids = batch["input_ids"].to(self.device)
            if self.facts.family == "pixel":  # BERT: attention mask over the padding
                out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(self.device))
                states.append(out.last_hidden_state)
            elif sdxl:
                out = model(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled = out[0] if out[0].ndim == 2 else pooled
            else:
                states.append(model(ids)[0])
        embeds = torch.cat(states, dim=-1).float().cpu()
        return Conditioning(embeds, None if pooled is None else pooled.float().cpu())
