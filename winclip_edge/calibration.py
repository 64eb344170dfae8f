"""Threshold calibration from normal images: no decision without a threshold, and no hidden constant."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import WinclipError
from .inspector import ImageInput, InspectionResult, Inspector
from .products import Threshold

DEFAULT_FALSE_ALARM_RATE = 0.0  # target: no calibration image above the threshold


class CalibrationError(WinclipError, ValueError):
    """Not enough normal images to calibrate."""


def choose_threshold(scores: Sequence[float], target_false_alarm_rate: float) -> tuple[float, float]:
    """The lowest threshold whose false-alarm rate on ``scores`` (fraction strictly above) is <= the target.

    Returns (threshold, achieved false-alarm rate on these scores).
    """
    if not 0.0 <= target_false_alarm_rate < 1.0:
        raise CalibrationError(f"false-alarm rate must be in [0, 1), got {target_false_alarm_rate}")
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise CalibrationError("no calibration scores")
    allowed = int(np.floor(target_false_alarm_rate * s.size))  # images that may lie above the threshold
    value = float(s[min(allowed, s.size - 1)])
    return value, float(np.mean(s > value))


def leave_one_out_scores(inspector: Inspector) -> list[float]:
    """Score every reference of the memory against the others (no engine call: the memory keeps its embeddings)."""
    memory = inspector.memory
    if memory is None or memory.size < 2:
        raise CalibrationError(
            "leave-one-out calibration needs a few-shot memory of at least 2 references; "
            "register more normal images or pass normal images to calibrate"
        )
    if inspector.roi is not None and inspector.tiling is None:
        raise CalibrationError("leave-one-out calibration with an ROI but no tiling does not know the references' "
                               "frame sizes; pass normal images to calibrate")
    return inspector.leave_one_out_scores()  # through the units, ROI and maximum of an inspected frame


def calibrate(inspector: Inspector, images: Sequence[ImageInput] = (), target_false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
              batch_size: int = 8, progress: Any = None) -> tuple[Threshold, list[InspectionResult]]:
    """Threshold from normal ``images`` (or leave-one-out over the memory when none are given).

    Returns the threshold and the error results of unreadable images (skipped).
    """
    failed: list[InspectionResult] = []
    images = list(images)  # also accepts a stacked [N, H, W, 3] array, like Inspector.inspect
    if images:
        scores, sources = [], []
        for result in inspector.iter_inspect(images, batch_size):
            if result.error is not None:
                failed.append(result)
            else:
                scores.append(result.score)
                sources.append(result.path)
            if progress is not None:
                progress(1)
        if not scores:
            raise CalibrationError("none of the calibration images could be read")
        leave_one_out = False
    else:
        scores = leave_one_out_scores(inspector)
        sources = list(inspector.memory.sources)
        leave_one_out = True
    value, far = choose_threshold(scores, target_false_alarm_rate)
    threshold = Threshold(
        value=value, false_alarm_rate=far, target_false_alarm_rate=target_false_alarm_rate, n_images=len(scores),
        mode="zero-shot" if inspector.memory is None else "few-shot",
        memory_sha256=inspector.memory.checksum if inspector.memory is not None else "",
        scoring=inspector.decision_record(),
        scores=[float(s) for s in scores], sources=sources, leave_one_out=leave_one_out,
    )
    return threshold, failed
