"""The decisions a result can carry and the words and colours they are shown with, in one table: overlays
(heatmap.py), the result rows' decision text (results.py). A new decision (e.g. a timeout) is one more row."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    key: str  # the machine name (metrics labels, filters)
    word: str  # what a person reads on an overlay
    colour_bgr: tuple[int, int, int]  # the word's colour on the overlay's black banner


VERDICTS = {v.key: v for v in (
    Verdict("anomalous", "ANOMALOUS", (60, 60, 255)),
    Verdict("normal", "normal", (120, 230, 120)),
    Verdict("undecided", "no threshold", (200, 200, 200)),
)}


def verdict_of(anomalous: bool | None) -> Verdict:
    """The verdict of a result's ``anomalous`` field (None: the product has no threshold)."""
    return VERDICTS[{True: "anomalous", False: "normal", None: "undecided"}[anomalous]]
