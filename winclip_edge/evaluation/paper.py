"""The WinCLIP paper's published numbers (docs/method.md §9), as data for side-by-side reports.

Source: the paper's tables (Jeong et al., CVPR 2023): image- and pixel-level results on MVTec-AD and VisA,
the few-shot standard deviations, the prompt baselines and the segmentation ablations. Only means
over classes are published there, no per-class values. Numbers are stored as printed (percent) and
returned as fractions in [0, 1], the unit of `winclip_edge.evaluation.metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
PAPER_MODEL = "ViT-B-16-plus-240"
PAPER_WEIGHTS = "laion400m_e31"
PAPER_SCALES = (2, 3)  # "small" and "mid" window scales; the no_scale_<k> ablations refer to these
PAPER_DATASETS = ("mvtec", "visa")
PERCENT = 100.0
_DIGITS = 6  # rounding of percent -> fraction, so 94.4 reads 0.944 and not 0.9440000000000001

_IMAGE = ("image_auroc", "image_aupr", "image_f1max")
_PIXEL = ("pixel_auroc", "pixel_pro", "pixel_f1max")

def _row(keys: tuple[str, ...], *values: "tuple[float, float | None]") -> dict:
    return dict(zip(keys, values))


# (dataset, shots, prompts, ablation) -> {metric: (mean %, std %)}; std 0.0 where the paper prints +-0.0
# (zero-shot is deterministic), None where it prints none.
_TABLE: dict[tuple[str, int, str, str], dict] = {
    # Anomaly classification (image level), WinCLIP (0-shot) / WinCLIP+ (few-shot), CPE prompts.
    ("mvtec", 0, "cpe", "none"): {**_row(_IMAGE, (91.8, 0.0), (96.5, 0.0), (92.9, 0.0)),
                                  **_row(_PIXEL, (85.1, None), (64.6, None), (31.7, None))},
    ("mvtec", 1, "cpe", "none"): {**_row(_IMAGE, (93.1, 2.0), (96.5, 0.9), (93.7, 1.1)),
                                  **_row(_PIXEL, (95.2, 0.5), (87.1, 1.2), (55.9, 2.7))},
    ("mvtec", 2, "cpe", "none"): {**_row(_IMAGE, (94.4, 1.3), (97.0, 0.7), (94.4, 0.8)),
                                  **_row(_PIXEL, (96.0, 0.3), (88.4, 0.9), (58.4, 1.7))},
    ("mvtec", 4, "cpe", "none"): {**_row(_IMAGE, (95.2, 1.3), (97.3, 0.6), (94.7, 0.8)),
                                  **_row(_PIXEL, (96.2, 0.3), (89.0, 0.8), (59.5, 1.8))},
    ("visa", 0, "cpe", "none"): {**_row(_IMAGE, (78.1, 0.0), (81.2, 0.0), (79.0, 0.0)),
                                 "pixel_auroc": (79.6, None)},
    ("visa", 1, "cpe", "none"): {**_row(_IMAGE, (83.8, 4.0), (85.1, 4.0), (83.1, 1.7)),
                                 **_row(_PIXEL, (96.4, 0.4), (85.1, 2.1), (41.3, 2.3))},
    ("visa", 2, "cpe", "none"): {**_row(_IMAGE, (84.6, 2.4), (85.8, 2.7), (83.0, 1.4)),
                                 **_row(_PIXEL, (96.8, 0.3), (86.2, 1.4), (43.5, 3.3))},
    ("visa", 4, "cpe", "none"): {**_row(_IMAGE, (87.3, 1.8), (88.8, 1.8), (84.2, 1.6)),
                                 **_row(_PIXEL, (97.2, 0.2), (87.6, 0.9), (47.0, 3.0))},
    # Prompt baselines, zero-shot classification: CLIP-AC and "+ Prompt ens." (templates only).
    ("mvtec", 0, "clip_ac", "none"): _row(_IMAGE, (74.0, 0.0), (89.1, 0.0), (88.5, 0.0)),
    ("visa", 0, "clip_ac", "none"): _row(_IMAGE, (59.3, 0.0), (67.0, 0.0), (74.4, 0.0)),
    ("mvtec", 0, "templates_only", "none"): _row(_IMAGE, (74.1, 0.0), (89.5, 0.0), (87.8, 0.0)),
    ("visa", 0, "templates_only", "none"): _row(_IMAGE, (58.2, 0.0), (66.4, 0.0), (74.0, 0.0)),
    # Segmentation ablations, MVTec-AD zero-shot (mid-scale = 3x3 windows, small-scale = 2x2).
    ("mvtec", 0, "cpe", "no_image_scale"): _row(_PIXEL, (82.0, None), (63.0, None), (29.5, None)),
    ("mvtec", 0, "cpe", "no_scale_3"): _row(_PIXEL, (84.0, None), (61.6, None), (30.5, None)),
    ("mvtec", 0, "cpe", "no_scale_2"): _row(_PIXEL, (84.7, None), (63.6, None), (30.6, None)),
    ("mvtec", 0, "cpe", "arithmetic"): _row(_PIXEL, (81.5, None), (60.5, None), (27.3, None)),
}

_METHODS = {"cpe": "WinCLIP", "clip_ac": "CLIP-AC", "templates_only": "CLIP-AC + prompt ensemble"}
_ABLATIONS = {"none": "", "no_image_scale": " w/o image scale", "no_scale_3": " w/o mid scale",
              "no_scale_2": " w/o small scale", "arithmetic": " w/o harmonic averaging"}


@dataclass(frozen=True)
class PaperValue:
    mean: float  # fraction in [0, 1]
    std: float | None  # fraction; None where the paper gives no spread


@dataclass(frozen=True)
class PaperResult:
    method: str  # e.g. "WinCLIP+ (2-shot)"
    values: dict[str, PaperValue]  # metric key (winclip_edge.evaluation.metrics) -> value; missing = not published

    def to_dict(self) -> dict:
        return {"method": self.method, "model": PAPER_MODEL, "weights": PAPER_WEIGHTS,
                "values": {k: {"mean": v.mean, "std": v.std} for k, v in self.values.items()}}


def paper_result(dataset: str, shots: int, prompts: str = "cpe", ablation: str = "none") -> PaperResult | None:
    """The paper's mean-over-classes numbers for this setting, or None when it published none.

    ``ablation`` names follow `winclip_edge.evaluation.runner` (none, no_image_scale, no_scale_<k>,
    arithmetic); ``no_scale_<k>`` refers to PAPER_SCALES, so compare only with a bundle using those.
    """
    row = _TABLE.get((dataset, shots, prompts, ablation))
    if row is None:
        return None
    base = _METHODS[prompts] + ("+" if shots and prompts == "cpe" else "")
    method = f"{base}{_ABLATIONS[ablation]} ({shots}-shot)"
    values = {k: PaperValue(round(m / PERCENT, _DIGITS), None if s is None else round(s / PERCENT, _DIGITS))
              for k, (m, s) in row.items()}
    return PaperResult(method, values)
