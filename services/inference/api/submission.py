"""From a generation request to a job ready to queue: every check happens here, before
anything is stored, and each failure is a `SubmissionError` with the status and the reason."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy.orm import Session

from services.inference import mixes
from services.inference.api.schemas import MAX_SEED, GenerationCreate
from services.inference.embeddings import (
    EmbeddingError,
    EncodedPrompt,
    decode_embeds,
    decode_pooled,
)
from services.inference.mixes import MixError, PinnedAdapter
from tessera.config import Settings
from tessera.model.facts import ModelFacts
from tessera.model.generate import SPLITTABLE

if TYPE_CHECKING:
    from tessera.model.conditioning import PromptEncoder

PLAINTEXT_DISABLED = (
    "plaintext prompts are disabled on this server: send prompt_embeds, the prompt encoded on "
    "your side (e.g. `tessera device encode TEXT --out FILE`); an operator can allow plaintext "
    "with TESSERA_ALLOW_PLAINTEXT_PROMPTS=true"
)


class SubmissionError(Exception):
    """A request that cannot become a job; nothing was stored or queued for it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class JobPlan:
    """A checked request: the encoded prompt to store and the params the job row records."""

    encoded: EncodedPrompt
    params: dict[str, Any]

    @property
    def batch_key(self) -> str | None:
        """What jobs must share to run as one UNet batch: steps, guidance, size and prompt
        length (the sampler is the server's). Each sample of a batch carries its own adapter mix,
        so the mix is not part of it. Split jobs always run alone."""
        params = self.params
        if params["stop_at_step"] is not None:
            return None
        shared = [params["steps"], params["guidance"], params["size"], params["tokens"]]
        return hashlib.sha256(json.dumps(shared).encode()).hexdigest()


def request_fingerprint(body: GenerationCreate) -> str:
    """sha256 of the request as parsed: an Idempotency-Key replay must carry the same one."""
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def plan_job(
    body: GenerationCreate,
    *,
    session: Session,
    settings: Settings,
    facts: ModelFacts,
    clustering: httpx.Client,
) -> JobPlan:
    """Check and resolve everything a request asks for; SubmissionError on the first problem."""
    if body.size is not None and body.size != facts.resolution:
        raise SubmissionError(
            422, f"size is not supported: this base model draws {facts.resolution} only"
        )
    if body.stop_at_step is not None and settings.sampler not in SPLITTABLE:
        raise SubmissionError(
            422,
            "stop_at_step needs a sampler whose steps resume exactly "
            f"({', '.join(sorted(SPLITTABLE))}); this server samples with {settings.sampler} "
            "(TESSERA_SAMPLER)",
        )
    encoded, pooled = _encoded_prompt(body, settings=settings, facts=facts)
    routing: dict[str, Any] | None = None
    try:
        if body.adapters == "auto":
            from tessera.model.encoder import task_encoder_info

            width = task_encoder_info(settings.task_encoder).width
            vector = mixes.check_pooled(body.pooled if pooled is None else pooled, width)
            version, weights = mixes.route(
                clustering, settings, pooled=vector, top_k=body.top_k, temperature=body.temperature
            )
            pins, missing = mixes.pin_routed(session=session, weights=weights)
            routing = {
                "clustering_version": version,
                "top_k": body.top_k,
                "temperature": body.temperature,
                "clusters": [{"label": label, "weight": weight} for label, weight in weights],
                "without_adapter": missing,
            }
        else:
            if body.pooled is not None:
                raise MixError(422, 'pooled is used only with adapters "auto"')
            requested = [(str(item.adapter), item.weight) for item in body.adapters]
            pins = mixes.pin_explicit(session=session, requested=requested)
    except MixError as error:
        raise SubmissionError(error.status, error.detail) from None
    return JobPlan(encoded=encoded, params=_params(body, facts, pins, routing, encoded))


@lru_cache(maxsize=2)
def prompt_encoder(base_model: str) -> PromptEncoder:
    """The base model's own text encoder(s), loaded once, on the CPU, without its UNet."""
    from tessera.model.conditioning import PromptEncoder
    from tessera.model.facts import load_facts
    from tessera.model.layout import read_layout

    return PromptEncoder(read_layout(base_model), load_facts(base_model))


def _encoded_prompt(
    body: GenerationCreate, *, settings: Settings, facts: ModelFacts
) -> tuple[EncodedPrompt, list[float] | None]:
    """The prompt's conditioning (decoded, or encoded here from plaintext) and, from
    plaintext, its task vector for routing."""
    if body.prompt is not None:
        if not settings.allow_plaintext_prompts:
            raise SubmissionError(422, PLAINTEXT_DISABLED)
        from tessera.model.encoder import encode_tasks

        texts = [body.prompt] + ([body.negative_prompt] if body.negative_prompt is not None else [])
        encoded = prompt_encoder(settings.base_model).encode(texts)
        vector = encode_tasks(texts[:1])  # the routing vector comes from the task encoder
        half = encoded.embeds.half()
        pooled = None if encoded.pooled is None else encoded.pooled.half()
        with_negative = body.negative_prompt is not None
        return (
            EncodedPrompt(
                prompt=half[0:1],
                negative=half[1:2] if with_negative else None,
                pooled=None if pooled is None else pooled[0:1],
                negative_pooled=None if pooled is None or not with_negative else pooled[1:2],
            ),
            vector[0].tolist(),
        )
    assert body.prompt_embeds is not None  # the schema requires one of the two
    try:
        prompt, pooled = _decoded(body.prompt_embeds, body.pooled_prompt_embeds, "", body, facts)
        negative = negative_pooled = None
        if body.negative_embeds is not None:
            negative, negative_pooled = _decoded(
                body.negative_embeds, body.negative_pooled_prompt_embeds, "negative_", body, facts
            )
    except EmbeddingError as error:
        raise SubmissionError(422, str(error)) from None
    if negative is not None and negative.shape[1] != prompt.shape[1]:
        raise SubmissionError(
            422,
            f"negative_embeds has {negative.shape[1]} tokens, prompt_embeds {prompt.shape[1]}: "
            "encode both to the same length",
        )
    return EncodedPrompt(prompt, negative, pooled, negative_pooled), None


def _decoded(
    embeds: str, pooled_field: str | None, prefix: str, body: GenerationCreate, facts: ModelFacts
) -> tuple[Any, Any]:
    """One prompt's token embeddings and pooled embeddings, checked against the model."""
    name = f"{prefix}embeds" if prefix else "prompt_embeds"
    pooled_name = f"{prefix}pooled_prompt_embeds"
    fmt = body.embeds_format
    tokens, pooled = decode_embeds(embeds, field=name, fmt=fmt, width=facts.cond_width)
    if pooled_field is not None:
        if pooled is not None:
            raise EmbeddingError(f"{pooled_name}: given twice (also inside {name})")
        width = facts.pooled_width or 0
        if width == 0:
            raise EmbeddingError(f"{pooled_name}: this base model takes no pooled embeddings")
        pooled = decode_pooled(pooled_field, field=pooled_name, fmt=fmt, width=width)
    if facts.pooled_width is None and pooled is not None:
        raise EmbeddingError(f"{name}: this base model takes no pooled_prompt_embeds")
    if facts.pooled_width is not None:
        if pooled is None:
            raise EmbeddingError(
                f"{pooled_name}: this base model ({facts.family}) needs the prompt's pooled "
                f"embeddings, {facts.pooled_width} values"
            )
        if pooled.shape[1] != facts.pooled_width:
            raise EmbeddingError(
                f"{pooled_name}: {pooled.shape[1]} values; this base model needs "
                f"{facts.pooled_width}"
            )
    return tokens, pooled


def _params(
    body: GenerationCreate,
    facts: ModelFacts,
    pins: list[PinnedAdapter],
    routing: dict[str, Any] | None,
    encoded: EncodedPrompt,
) -> dict[str, Any]:
    return {
        "steps": body.steps,
        "guidance": body.guidance,
        "seed": body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1),
        "size": facts.resolution,
        "num_images": body.num_images,
        "stop_at_step": body.stop_at_step,
        "adapters": [pin.as_dict() for pin in pins],
        "routing": routing,
        "tokens": encoded.tokens,
        "negative": encoded.negative is not None,
        "plaintext": body.prompt is not None,
        "request_sha256": request_fingerprint(body),
    }
