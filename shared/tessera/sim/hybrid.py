"""A simulation's hybrid measure: two styles' adapters stacked at full strength (the equal
hybrid, `HYBRID_WEIGHTS`), scored for both looks.

A convex 50/50 blend halves each adapter: at the tens of steps a device trains, half of either
style's change is too faint to show (0 of 16 images carried both in the demo's grid, against
9 of 16 for two of its devices' adapters at full strength). Stacking LoRAs at full weight is
also how hybrids are drawn with Stable Diffusion; a generation request takes any weights.

"Style A's adapter" is the one a device of style A is served: the published adapter of the
cluster most of A's devices were put in (cluster-aware), the one global adapter (global
FedAvg: the same for both styles), or the first A device's own personal adapter (local only).
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from pathlib import Path

from tessera.data import LOOKS, caption, cycled_subjects
from tessera.data.evaluator import HybridScores, default_evaluator
from tessera.lora import LoraAdapter, adapter_from_bytes
from tessera.model.base import BaseModel
from tessera.model.generate import generate
from tessera.model.latents import fit_images
from tessera.sdk.device import PERSONAL_FILE

HYBRID_WEIGHTS = (1.0, 1.0)  # the equal hybrid: each adapter at its full strength


def hybrid_pair(styles: tuple[str, ...]) -> tuple[str, str] | None:
    """The first two styles in play whose looks combine (they change different attributes)."""
    for first, second in combinations(styles, 2):
        if LOOKS[first].combined(LOOKS[second]) is not None:
            return first, second
    return None


def style_adapter(
    style: str,
    *,
    method: str,
    members: list[tuple[str, str, int | None]],
    published: dict[str, LoraAdapter],
    work_dir: Path,
    base: BaseModel,
) -> LoraAdapter | None:
    """The adapter devices of `style` are served; `members` are (device name, style, cluster)."""
    mine = [(name, cluster) for name, true_style, cluster in members if true_style == style]
    if not mine:
        return None
    if method == "local":
        path = work_dir / mine[0][0] / PERSONAL_FILE
        return adapter_from_bytes(path.read_bytes(), base.lora_spec) if path.exists() else None
    if method == "global":
        return published.get("global")
    label, _ = Counter(cluster for _, cluster in mine).most_common(1)[0]
    return published.get(f"cluster:{label}")


def hybrid_score(
    base: BaseModel,
    adapters: tuple[LoraAdapter, LoraAdapter],
    styles: tuple[str, str],
    *,
    images: int,
    steps: int,
    seed: int,
) -> HybridScores:
    """Generate `images` prompts under the equal hybrid and score both styles' attributes."""
    subjects = cycled_subjects(images, seed, "sim-hybrid")
    prompts = base.prompts.encode([caption(shape, colour) for shape, colour in subjects])
    first, second = adapters
    mix = [(first, HYBRID_WEIGHTS[0]), (second, HYBRID_WEIGHTS[1])]
    result = generate(base, prompts, mix, steps=steps, seed=seed)
    assert result.images is not None
    evaluator = default_evaluator()
    return evaluator.hybrid(fit_images(result.images, evaluator.config.image_size), styles)
