"""Compositional prompt ensemble (docs/method.md §2) and the paper's prompt baselines.

Pure text: the export stage encodes these with the CLIP text tower; the runtime only stores them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .errors import WinclipError

OBJECT = "{o}"  # placeholder for the object name inside a state phrase
STATE = "{c}"  # placeholder for the state phrase inside a template

# The seed's state words: 7 normal, 4 anomalous.
NORMAL_STATES = (
    "{o}", "flawless {o}", "perfect {o}", "unblemished {o}",
    "{o} without flaw", "{o} without defect", "{o} without damage",
)
ANOMALOUS_STATES = ("damaged {o}", "{o} with flaw", "{o} with defect", "{o} with damage")

# The seed's 22 templates (anomalib has 21: it repeats one jpeg template and lacks the second "cropped").
TEMPLATES = (
    "a cropped photo of the {c}.", "a cropped photo of a {c}.",
    "a close-up photo of a {c}.", "a close-up photo of the {c}.",
    "a bright photo of a {c}.", "a bright photo of the {c}.",
    "a dark photo of the {c}.", "a dark photo of a {c}.",
    "a jpeg corrupted photo of a {c}.", "a jpeg corrupted photo of the {c}.",
    "a blurry photo of the {c}.", "a blurry photo of a {c}.",
    "a photo of a {c}.", "a photo of the {c}.",
    "a photo of a small {c}.", "a photo of the small {c}.",
    "a photo of a large {c}.", "a photo of the large {c}.",
    "a photo of the {c} for visual inspection.", "a photo of a {c} for visual inspection.",
    "a photo of the {c} for anomaly detection.", "a photo of a {c} for anomaly detection.",
)

# Baselines of the paper's ablation table.
CLIP_AC_NORMAL = ("normal {o}",)
CLIP_AC_ANOMALOUS = ("anomalous {o}",)
PROMPT_STYLES = ("cpe", "clip_ac", "templates_only")


@dataclass(frozen=True)
class PromptSpec:
    """How a product's prompts are built; recorded in its text prototypes."""

    object_name: str  # e.g. "metal nut"
    style: str = "cpe"  # cpe | clip_ac ("normal [o]"/"anomalous [o]") | templates_only (CLIP-AC states x templates)
    extra_normal_states: tuple[str, ...] = field(default_factory=tuple)  # user additions, "{o}" = object
    extra_anomalous_states: tuple[str, ...] = field(default_factory=tuple)
    extra_templates: tuple[str, ...] = field(default_factory=tuple)  # user additions, "{c}" = state phrase


class PromptError(WinclipError, ValueError):
    """A prompt style or a user state/template that cannot be used."""


def object_name_for(product: str) -> str:
    """The default object name: the product name with ``_`` -> space (``metal_nut`` -> ``metal nut``)."""
    return product.replace("_", " ").strip()


def _check_placeholders(items: Sequence[str], placeholder: str, what: str) -> None:
    for item in items:
        if placeholder not in item:
            raise PromptError(f"{what} {item!r} must contain the placeholder {placeholder!r}")


def build_prompts(spec: PromptSpec) -> tuple[list[str], list[str]]:
    """Return (normal prompts, anomalous prompts): every state phrase in every template."""
    if spec.style not in PROMPT_STYLES:
        raise PromptError(f"prompt style {spec.style!r} unknown; choose one of {PROMPT_STYLES}")
    _check_placeholders(spec.extra_normal_states + spec.extra_anomalous_states, OBJECT, "state")
    _check_placeholders(spec.extra_templates, STATE, "template")
    if spec.style == "cpe":
        normal, anomalous, templates = NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES
    elif spec.style == "clip_ac":
        normal, anomalous, templates = CLIP_AC_NORMAL, CLIP_AC_ANOMALOUS, ("{c}",)
    else:
        normal, anomalous, templates = CLIP_AC_NORMAL, CLIP_AC_ANOMALOUS, TEMPLATES
    normal = normal + spec.extra_normal_states
    anomalous = anomalous + spec.extra_anomalous_states
    templates = templates + spec.extra_templates

    def expand(states: Sequence[str]) -> list[str]:
        phrases = [s.replace(OBJECT, spec.object_name) for s in states]
        return [t.replace(STATE, p) for p in phrases for t in templates]

    return expand(normal), expand(anomalous)
