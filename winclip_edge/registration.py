"""Few-shot registration: normal reference images -> the product's memory (WinCLIP+'s only "training")."""
from __future__ import annotations

from typing import Any, Sequence

from .errors import WinclipError
from .inspector import DEFAULT_BATCH, ImageInput, InspectionResult, Inspector
from .products import Memory, load_memory, save_memory


class RegistrationError(WinclipError, ValueError):
    """No usable reference image."""


def register(inspector: Inspector, images: Sequence[ImageInput], batch_size: int = DEFAULT_BATCH, append: bool = False,
             progress: Any = None) -> tuple[Memory, list[InspectionResult]]:
    """Embed ``images`` and store them as the memory of the Inspector's product (added to the old one with
    ``append``); returns the memory written and the inputs that could not be read. ``inspector`` should run
    zero-shot (``ScoringOptions(use_memory=False)``) so that a damaged old memory can be replaced."""
    if not images:
        raise RegistrationError("no reference images given")
    memory, failed = inspector.embed_references(images, batch_size, progress=progress)
    if memory is None:
        raise RegistrationError("none of the reference images could be read; memory unchanged")
    if append:
        previous = load_memory(inspector.bundle, inspector.product)
        memory = previous.merged(memory) if previous is not None else memory
    save_memory(inspector.bundle, inspector.product, memory)
    return memory, failed
