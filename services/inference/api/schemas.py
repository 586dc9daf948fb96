"""Request and response models of the inference API, and the limits they enforce."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from fastapi import Path
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator

from services.inference.embeddings import MAX_PROMPT_TOKENS, EmbedsFormat
from tessera.federation import Temperature
from tessera.models import JobState
from tessera.schemas import MAX_ROW_ID, FiniteFloat, RowId, Strict, UtcDatetime

# Limits of one request. Sizes are not a constant: only the base model's native size is
# accepted (32 for the bundled tiny model): the model facts' `resolution`.
MAX_STEPS = 100
MAX_IMAGES = 8
MAX_ADAPTERS = 8
MAX_ADAPTER_WEIGHT = 10.0
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 20.0
MAX_PROMPT_CHARS = 1000
MAX_TOP_K = 8
MAX_SEED = 2**32 - 1
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_POOLED_DIM = 4096


def _id_in_range(ref: str) -> str:
    """A version id given as digits must fit the table's key, like one given as a number."""
    if ref.isdigit() and not 1 <= int(ref) <= MAX_ROW_ID:
        raise ValueError(f"a version id must be between 1 and {MAX_ROW_ID}")
    return ref


JobId = Annotated[
    str,
    Path(
        min_length=36,
        max_length=36,
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="the job's id (a UUID, as POST /v1/generations answered it)",
    ),
]
"""A job id in a path: a malformed one is a 422 before any database sees it."""


AdapterRef = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$"),
    AfterValidator(_id_in_range),
]


class AdapterWeight(Strict):
    """One adapter of an explicit mix and its weight."""

    adapter: AdapterRef | RowId = Field(
        description='"global", "cluster:<label>", or a published version id (e.g. "17" or 17)'
    )
    weight: Annotated[float, Field(ge=0.0, le=MAX_ADAPTER_WEIGHT, allow_inf_nan=False)]


EMBEDS_DESCRIPTION = (
    "Token embeddings of ONE prompt from the base model's own text encoder(s), fp16, base64. "
    "With embeds_format 'safetensors' (default): a safetensors file holding an F16 tensor "
    "named 'prompt_embeds' of shape [T, width] or [1, T, width] and, for a model with pooled "
    "embeddings (SDXL), 'pooled_prompt_embeds' [P] or [1, P] (what `tessera device encode "
    "--out FILE` writes for one text). With 'f16le': the raw little-endian float16 values of "
    "a [T, width] array, row-major. width is the model's conditioning width (384 for the "
    f"bundled model, 768 for SD-1.x, 1024 for SD-2.x, 2048 for SDXL); 1 <= T <= "
    f"{MAX_PROMPT_TOKENS}."
)
POOLED_DESCRIPTION = (
    "SDXL: the prompt's pooled text embeddings [P], fp16, base64, in embeds_format (f16le: P "
    "raw float16 values; safetensors: one tensor 'pooled_prompt_embeds'), unless the "
    "prompt_embeds file already holds them. Refused for a model without pooled embeddings."
)


class GenerationCreate(Strict):
    """A generation request: an encoded prompt, an adapter mix and the sampling settings."""

    prompt_embeds: Annotated[str | None, Field(description=EMBEDS_DESCRIPTION)] = None
    negative_embeds: Annotated[
        str | None,
        Field(description="Optional negative prompt, same format and T as prompt_embeds."),
    ] = None
    pooled_prompt_embeds: Annotated[str | None, Field(description=POOLED_DESCRIPTION)] = None
    negative_pooled_prompt_embeds: Annotated[
        str | None,
        Field(description="SDXL: the negative prompt's pooled embeddings, as above."),
    ] = None
    embeds_format: EmbedsFormat = EmbedsFormat.SAFETENSORS
    prompt: Annotated[
        str | None,
        StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS),
        Field(description="Plaintext prompt: only when TESSERA_ALLOW_PLAINTEXT_PROMPTS=true."),
    ] = None
    negative_prompt: Annotated[
        str | None,
        StringConstraints(max_length=MAX_PROMPT_CHARS),
        Field(description="Plaintext negative prompt, under the same rule as prompt."),
    ] = None
    adapters: Annotated[
        Literal["auto"] | list[AdapterWeight],
        Field(
            max_length=MAX_ADAPTERS,
            description='A list [{"adapter": ..., "weight": ...}] (empty: the base model '
            'alone), or "auto": weights from the clustering service\'s routing of `pooled`.',
        ),
    ] = Field(default_factory=list)
    pooled: Annotated[
        list[FiniteFloat] | None,
        Field(
            max_length=MAX_POOLED_DIM,
            description="The prompt's task-encoder vector (TESSERA_TASK_ENCODER, "
            'L2-normalised; not the model\'s pooled embeddings): required with "auto".',
        ),
    ] = None
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K, description="auto: clusters blended")] = 2
    temperature: Annotated[Temperature, Field(description="auto: softmax temperature")] = 0.1
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 20
    guidance: Annotated[float, Field(ge=MIN_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False)] = 3.0
    seed: Annotated[
        int | None, Field(ge=0, le=MAX_SEED, description="None: chosen at random, reported")
    ] = None
    size: Annotated[
        int | None, Field(ge=1, description="Image side in pixels: the model's native size only")
    ] = None
    num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    stop_at_step: Annotated[
        int | None,
        Field(
            ge=1,
            description="Split inference: stop after this many of `steps` (1..steps-1) and "
            "return the latents and scheduler state instead of images.",
        ),
    ] = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("give exactly one of prompt_embeds (encoded) and prompt (plaintext)")
        if self.negative_prompt is not None and self.prompt is None:
            raise ValueError(
                "negative_prompt goes with prompt; with prompt_embeds use negative_embeds"
            )
        if self.negative_embeds is not None and self.prompt_embeds is None:
            raise ValueError("negative_embeds goes with prompt_embeds")
        if self.pooled_prompt_embeds is not None and self.prompt_embeds is None:
            raise ValueError("pooled_prompt_embeds goes with prompt_embeds")
        if self.negative_pooled_prompt_embeds is not None and self.negative_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds goes with negative_embeds")
        if self.stop_at_step is not None and self.stop_at_step >= self.steps:
            raise ValueError(f"stop_at_step must be in 1..steps-1 = 1..{self.steps - 1}")
        if isinstance(self.adapters, list):
            if self.adapters and not any(a.weight > 0 for a in self.adapters):
                raise ValueError("at least one adapter weight must be > 0")
            refs = [str(a.adapter) for a in self.adapters]
            repeated = next((i for i, ref in enumerate(refs) if ref in refs[:i]), None)
            if repeated is not None:
                raise ValueError(f"adapters[{repeated}] repeats an adapter listed before it")
        return self


class ResolvedAdapterOut(BaseModel):
    """An adapter of the job's mix, pinned to the version resolved when the job was created."""

    adapter: str
    version: int
    version_id: int
    weight: float


class Progress(BaseModel):
    step: int = Field(description="denoising steps done")
    total_steps: int = Field(description="steps this job runs (stop_at_step for split jobs)")


class GeneratedImage(BaseModel):
    index: int
    url: str = Field(description="presigned PNG download, valid until url_expires_at")


class GenerationResult(BaseModel):
    """Images (full runs), or latents plus scheduler state (split runs)."""

    images: list[GeneratedImage] = Field(default_factory=list)
    latents_url: str | None = Field(
        default=None,
        description="split runs: safetensors with tensor 'latents' [n, C, H, W] and metadata "
        "step, steps, guidance (`tessera device finish` reads it)",
    )
    scheduler_state: dict[str, Any] | None = None
    url_expires_at: UtcDatetime | None = None


class GenerationOut(BaseModel):
    """A generation job: state, progress and, once succeeded, where its output is."""

    id: str
    state: JobState
    progress: Progress
    steps: int
    guidance: float
    seed: int
    size: int
    num_images: int
    stop_at_step: int | None
    adapters: list[ResolvedAdapterOut]
    routing: dict[str, Any] | None = Field(
        default=None, description='"auto" mixes: the clustering version and cluster weights'
    )
    error: str | None
    result: GenerationResult | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
