"""Randomly initialised Stable-Diffusion-family folders, built offline, for tests and benchmarks.

Nothing can be downloaded here, so the real architectures are built from configs: SD-1.x-like
(CLIP text encoder, epsilon), SD-2.x-like (linear projections, v-prediction) and SDXL-like (two
text encoders, pooled embeddings, `add_time_ids`). Each is written by its own pipeline's
`save_pretrained`, so the folder is exactly what a user's checkpoint looks like. `size="tiny"`
gives a folder that trains and generates in well under a second; `size="full"` gives the real
UNet dimensions (SD-1.5: 860M parameters) with small text encoders, for benchmarks.
The weights are random: what these folders generate means nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

Family = Literal["sd1", "sd2", "sdxl"]
Size = Literal["tiny", "full"]
FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "sdxl")

_START, _END = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(path: Path, max_length: int = 77) -> int:
    """A CLIP BPE tokenizer over bytes only (no merges): a small generated vocabulary.

    Returns the vocabulary size. Every byte is a token, with and without the end-of-word mark,
    so any text tokenizes; ids of the start and end tokens are the last two.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    vocab[_START] = len(vocab)
    vocab[_END] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tokenizer.save_pretrained(path)
    return len(vocab)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (what byte-level BPE sees)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _clip_config(vocab_size: int, width: int, *, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or width,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _encoder_width(family: Family, tiny: bool, cond_width: int | None) -> int:
    """One text encoder's width for a conditioning width (SDXL's two sit side by side)."""
    if cond_width is None:
        return 32 if tiny else 64
    parts = 2 if family == "sdxl" else 1
    if cond_width < 2 * parts or cond_width % (2 * parts):
        raise ValueError(
            f"cond_width must be a positive multiple of {2 * parts} for {family} "
            f"(2 attention heads per encoder), found {cond_width}"
        )
    return cond_width // parts


def _unet_config(family: Family, size: Size, cross_width: int, pooled: int) -> dict[str, Any]:
    if size == "full":
        config: dict[str, Any] = {"cross_attention_dim": cross_width}  # diffusers' default: SD-1.x
        if family == "sd2":
            config.update(
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, sample_size=96
            )
        if family == "sdxl":
            config.update(
                sample_size=128,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=6 * 256 + pooled,
            )
        return config
    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": cross_width,
        "attention_head_dim": 2,
        "norm_num_groups": 8,
    }
    if family in ("sd2", "sdxl"):
        config["use_linear_projection"] = True
    if family == "sdxl":
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + pooled,
        )
    return config


def build_random_folder(
    path: Path | str,
    family: Family,
    *,
    size: Size = "tiny",
    seed: int = 0,
    cond_width: int | None = None,
) -> Path:
    """Write a random `family` checkpoint folder at `path` with its pipeline's save_pretrained.

    `cond_width` sets the UNet's conditioning width (its `cross_attention_dim`, the text
    encoders' width; SDXL splits it over its two): 768 makes an SD-1.5-sized UNet's to_k/to_v
    as wide as the real one's. Default: 32 (tiny) or 64 (full), small text encoders.
    """
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(path)
    torch.manual_seed(seed)
    tiny = size == "tiny"
    width = _encoder_width(family, tiny, cond_width)
    vocab = write_clip_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text_encoder = CLIPTextModel(_clip_config(vocab, width))
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64) if tiny else (32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4),
        up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16 if tiny else 512,
    )
    scheduler_args: dict[str, Any] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction" if family == "sd2" else "epsilon",
    }
    scheduler = (
        diffusers.EulerDiscreteScheduler(**scheduler_args)
        if family == "sdxl"
        else diffusers.PNDMScheduler(skip_prk_steps=True, **scheduler_args)
    )
    if family == "sdxl":
        write_clip_tokenizer(out / "tokenizer_2")
        tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(vocab, width, projection=width))
        unet = diffusers.UNet2DConditionModel(**_unet_config(family, size, 2 * width, width))
        pipe: Any = diffusers.StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        unet = diffusers.UNet2DConditionModel(**_unet_config(family, size, width, 0))
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
