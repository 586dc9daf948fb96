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
from services.inference.api.deps import ModelFacts
from services.inference.api.schemas import MAX_SEED, GenerationCreate
from services.inference.embeddings import EmbeddingError, EncodedPrompt, decode_embeds
from services.inference.mixes import MixError, PinnedAdapter
from tessera.config import Settings

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
        """What jobs must share to run as one UNet batch: the mix (pinned versions and
        weights), steps, guidance, size and prompt length. Split jobs always run alone."""
        params = self.params
        if params["stop_at_step"] is not None:
            return None
        mix = sorted((a["version_id"], a["weight"]) for a in params["adapters"] if a["weight"] > 0)
        shared = [mix, params["steps"], params["guidance"], params["size"], params["tokens"]]
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
    if body.size is not None and body.size not in facts.allowed_sizes:
        raise SubmissionError(
            422, f"size {body.size} is not supported: this base model draws {facts.image_size}"
        )
    encoded, pooled = _encoded_prompt(body, settings=settings, facts=facts)
    routing: dict[str, Any] | None = None
    try:
        if body.adapters == "auto":
            vector = mixes.check_pooled(body.pooled if pooled is None else pooled, facts.embed_dim)
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
    """The prompt's token embeddings (decoded, or encoded here from plaintext) and, from
    plaintext, its pooled vector."""
    if body.prompt is not None:
        if not settings.allow_plaintext_prompts:
            raise SubmissionError(422, PLAINTEXT_DISABLED)
        from tessera.model.encoder import encode_tasks

        texts = [body.prompt] + ([body.negative_prompt] if body.negative_prompt is not None else [])
        tokens = prompt_encoder(settings.base_model).encode(texts).embeds
        pooled = encode_tasks(texts[:1])  # the routing vector comes from the task encoder
        if tokens.shape[2] != facts.embed_dim:
            raise SubmissionError(
                422,
                f"the server's encoder gives width {tokens.shape[2]}, the model needs "
                f"{facts.embed_dim}: plaintext prompts cannot be used with this base model",
            )
        negative = tokens[1:2].half() if body.negative_prompt is not None else None
        return EncodedPrompt(tokens[0:1].half(), negative), pooled[0].tolist()
    assert body.prompt_embeds is not None  # the schema requires one of the two
    try:
        prompt = decode_embeds(
            body.prompt_embeds, field="prompt_embeds", fmt=body.embeds_format, width=facts.embed_dim
        )
        negative = None
        if body.negative_embeds is not None:
            negative = decode_embeds(
                body.negative_embeds,
                field="negative_embeds",
                fmt=body.embeds_format,
                width=facts.embed_dim,
            )
    except EmbeddingError as error:
        raise SubmissionError(422, str(error)) from None
    if negative is not None and negative.shape[1] != prompt.shape[1]:
        raise SubmissionError(
            422,
            f"negative_embeds has {negative.shape[1]} tokens, prompt_embeds {prompt.shape[1]}: "
            "encode both to the same length",
        )
    return EncodedPrompt(prompt, negative), None


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
        "size": facts.image_size,
        "num_images": body.num_images,
        "stop_at_step": body.stop_at_step,
        "adapters": [pin.as_dict() for pin in pins],
        "routing": routing,
        "tokens": encoded.tokens,
        "negative": encoded.negative is not None,
        "plaintext": body.prompt is not None,
        "request_sha256": request_fingerprint(body),
    }
