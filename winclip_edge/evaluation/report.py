"""What `winclip-edge eval` writes: tables (JSON, CSV, Markdown) and pictures (PNG, matplotlib).

matplotlib is optional (the ``eval`` extra) and imported only when pictures are drawn; the figures
use matplotlib's object API with the Agg canvas, so no pyplot state or GUI backend is touched.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import WinclipError
from ..fileio import atomic_write_bytes, atomic_write_json
from ..heatmap import upsample_map

SUMMARY_JSON = "summary.json"
METRICS_CSV = "metrics.csv"
SCORES_CSV = "scores.csv"
REPORT_MD = "report.md"
ROC_PNG = "roc_curves.png"
BARS_PNG = "auroc_bars.png"
CASES_DIR = "cases"
NOT_AVAILABLE = "n/a"  # pixel metrics without masks; pandas reads it as NaN
MEAN = "mean"  # the class column of the mean over classes, and the seed column of the mean over seeds
STD = "std"
PERCENT = 100.0
LABELS = {"image_auroc": "image AUROC", "image_aupr": "image AUPR", "image_f1max": "image F1-max",
          "pixel_auroc": "pixel AUROC", "pixel_pro": "PRO (FPR<=0.3)", "pixel_f1max": "pixel F1-max"}
PANEL_INCHES = 3.2  # size of one subplot
MAX_ROC_COLUMNS = 4
DPI = 100
HEATMAP_ALPHA = 0.5
MATPLOTLIB_PIP = "pip install matplotlib (or: pip install 'winclip-edge[eval]')"


class ReportError(WinclipError, RuntimeError):
    """A report part cannot be produced (matplotlib missing)."""


# ---------------------------------------------------------------- tables
def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _cell(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else repr(value)


def _metric_rows(summary: dict) -> list[list]:
    setting = summary["setting"]
    keys = summary["metric_keys"]
    rows = []
    for shots, s in summary["shots"].items():
        prefix = [setting["prompts"], setting["ablation"], shots]
        n_all = sum(c["n_test"] for c in s["classes"].values())
        for name, c in s["classes"].items():
            for seed, m in c["seeds"].items():
                rows.append([*prefix, name, seed, c["n_test"], *(_cell(m[k]) for k in keys)])
            for stat in (MEAN, STD):
                rows.append([*prefix, name, stat, c["n_test"], *(_cell(c[stat][k]) for k in keys)])
        for seed, m in s["per_seed_mean"].items():
            rows.append([*prefix, MEAN, seed, n_all, *(_cell(m[k]) for k in keys)])
        for stat in (MEAN, STD):
            rows.append([*prefix, MEAN, stat, n_all, *(_cell(s[stat][k]) for k in keys)])
    return rows


def _percent(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return NOT_AVAILABLE
    return f"{PERCENT * mean:.1f}" + ("" if std is None else f" ± {PERCENT * std:.1f}")


def _paper_cells(paper: dict | None, keys: Sequence[str]) -> list[str]:
    values = paper["values"] if paper else {}
    return [_percent(values[k]["mean"], values[k]["std"]) if k in values else "–" for k in keys]


def _markdown(summary: dict) -> str:
    keys = summary["metric_keys"]
    b, d, st, run = summary["bundle"], summary["dataset"], summary["setting"], summary["run"]
    lines = [f"# WinCLIP evaluation: {d['name']}, prompts {st['prompts']}, ablation {st['ablation']}", ""]
    if summary["warning"]:
        lines += [f"> **{summary['warning']}**", ""]
    weights = b["weights"]
    source = weights.get("tag") or weights.get("path") or f"random, seed {weights.get('seed')}"
    limit = "all" if d["limit"] is None else f"at most {d['limit']} (random subset, seed {d['limit_seed']})"
    engine = run["engine"] or "not run (all units resumed)"
    device = f" on {run['device']}" if run["device"] else ""
    lines += [
        f"- bundle `{b['path']}`: {b['model']}, weights {weights['source']} ({source}; id {weights['id'][:12]}), "
        f"input {b['image_size'][0]}x{b['image_size'][1]}, grid {b['grid'][0]}x{b['grid'][1]}, window scales "
        f"{b['scales']} stride {b['stride']}, patch layer {b['patch_layer']}",
        f"- data: {d['name']} at `{d['root']}`, {len(d['classes'])} class(es); test images per defect type: {limit}; "
        f"few-shot references {d['references']}",
        f"- protocol: zero-shot is deterministic (one run); K-shot: mean ± std over {st['seeds']} random reference "
        f"draws (seeds 0..{st['seeds'] - 1}; std: {st['std']}); the mean over classes is taken per seed, then "
        "mean ± std over seeds",
        f"- metrics in percent; engine {engine}{device}; this run: {run['units_computed']} unit(s) computed, "
        f"{run['units_skipped']} resumed, {run['wall_seconds']:.1f} s",
    ]
    missing = {name: why for name, why in summary["pixel_metrics"].items() if why}
    if missing:
        lines.append("- pixel metrics n/a (image level only) for " +
                     "; ".join(f"{name}: {why}" for name, why in missing.items()))
    header = "| " + " | ".join(LABELS[k] for k in keys) + " |"
    rule = "|---" * len(keys) + "|"
    lines += ["", "## Mean over classes", "", "| shots | method " + header, "|---|---" + rule]
    for shots, s in summary["shots"].items():
        lines.append(f"| {shots} | this run | " + " | ".join(_percent(s[MEAN][k], s[STD][k]) for k in keys) + " |")
        if s["paper"]:
            lines.append(f"| {shots} | paper: {s['paper']['method']}, {s['paper']['model']} | "
                         + " | ".join(_paper_cells(s["paper"], keys)) + " |")
    for shots, s in summary["shots"].items():
        lines += ["", f"## {shots}-shot", "", "| class | test images " + header, "|---|---" + rule]
        for name, c in s["classes"].items():
            lines.append(f"| {name} | {c['n_test']} | " + " | ".join(_percent(c[MEAN][k], c[STD][k]) for k in keys) + " |")
        lines.append("| **mean** | | " + " | ".join(_percent(s[MEAN][k], s[STD][k]) for k in keys) + " |")
        if s["paper"]:
            lines.append(f"| paper: {s['paper']['method']} | | " + " | ".join(_paper_cells(s["paper"], keys)) + " |")
    if summary["failed_images"]:
        lines += ["", "## Unreadable images (left out of every metric)", ""]
        lines += [f"- {message}" for message in summary["failed_images"]]
    pictures = ", pictures `roc_curves.png`, `auroc_bars.png`, `cases/`" if st["pictures"] else ""
    lines += ["", "Files: `summary.json` (everything above, fractions in [0, 1]), `metrics.csv` (per class, shot "
              f"count and seed, and their mean / std), `scores.csv` (per image){pictures}. Paper: mean over classes "
              "only (the paper publishes no per-class values); – = not published for this setting."]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, summary: dict, records: Sequence[dict]) -> list[Path]:
    """summary.json, metrics.csv, scores.csv and report.md under ``out``; returns their paths."""
    out = Path(out)
    keys = summary["metric_keys"]
    paths = [out / SUMMARY_JSON, out / METRICS_CSV, out / SCORES_CSV, out / REPORT_MD]
    atomic_write_json(paths[0], summary)
    atomic_write_bytes(paths[1], _csv_bytes(["prompts", "ablation", "shots", "class", "seed", "n_test", *keys],
                                            _metric_rows(summary)))
    score_rows = [[r["prompts"], r["ablation"], r["class"], r["shots"], r["seed"], i["path"], i["label"],
                   i["defect_type"], repr(i["score"])] for r in records for i in r["images"]]
    atomic_write_bytes(paths[2], _csv_bytes(["prompts", "ablation", "class", "shots", "seed", "path", "label",
                                             "defect_type", "score"], score_rows))
    atomic_write_bytes(paths[3], _markdown(summary).encode())
    return paths


# ---------------------------------------------------------------- pictures
def require_matplotlib() -> None:
    """Fail before hours of evaluation, not after, when the pictures cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(f"report pictures need matplotlib: {MATPLOTLIB_PIP}; or pass --no-pictures") from None


def _figure(rows: int, cols: int, width: float = PANEL_INCHES, height: float = PANEL_INCHES):
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cols * width, rows * height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score, from (0, 0); tied scores form one diagonal step."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    y = np.asarray(labels, dtype=bool)[order]
    ends = np.r_[np.flatnonzero(np.diff(np.asarray(scores)[order])), y.size - 1]
    tps, fps = np.cumsum(y)[ends], np.cumsum(~y)[ends]
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def _first_seed_records(summary: dict, records: Sequence[dict]) -> dict:
    """(class, shots) -> the record of the first seed: the curves and examples shown."""
    first = {int(k): s["seeds"][0] for k, s in summary["shots"].items()}
    return {(r["class"], r["shots"]): r for r in records if r["seed"] == first[r["shots"]]}


def _roc_figure(summary: dict, shown: dict, path: Path) -> Path:
    classes = summary["dataset"]["classes"]
    cols = min(MAX_ROC_COLUMNS, len(classes))
    fig, axes = _figure(math.ceil(len(classes) / cols), cols)
    for ax in axes.flat[len(classes):]:
        ax.set_axis_off()
    for ax, name in zip(axes.flat, classes):
        for shots in summary["shots"]:
            r = shown[(name, int(shots))]
            fpr, tpr = roc_points(np.array([i["label"] for i in r["images"]]), np.array([i["score"] for i in r["images"]]))
            ax.plot(fpr, tpr, label=f"{shots}-shot (AUROC {PERCENT * r['metrics']['image_auroc']:.1f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(title=name, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"image ROC, first seed{_warning_suffix(summary)}", fontsize="small")
    return _save(fig, path)


def _warning_suffix(summary: dict) -> str:
    return "\nrandom weights: meaningless" if summary["warning"] else ""


def _bars_figure(summary: dict, path: Path) -> Path:
    classes = summary["dataset"]["classes"]
    groups = [*classes, MEAN]
    shot_keys = list(summary["shots"])
    fig, axes = _figure(1, 1, width=max(6.0, 0.6 * len(groups) * len(shot_keys)), height=4.0)
    ax = axes[0, 0]
    width = 0.8 / len(shot_keys)
    x = np.arange(len(groups))
    has_paper_label = False
    for j, shots in enumerate(shot_keys):
        s = summary["shots"][shots]
        means = [s["classes"][c][MEAN]["image_auroc"] for c in classes] + [s[MEAN]["image_auroc"]]
        stds = [s["classes"][c][STD]["image_auroc"] for c in classes] + [s[STD]["image_auroc"]]
        offset = x + (j - (len(shot_keys) - 1) / 2) * width
        bars = ax.bar(offset, PERCENT * np.array(means), width, yerr=PERCENT * np.array(stds), capsize=2,
                      label=f"{shots}-shot")
        paper = (s["paper"] or {}).get("values", {}).get("image_auroc")
        if paper:
            ax.plot([offset[-1] - width / 2, offset[-1] + width / 2], [PERCENT * paper["mean"]] * 2, color="black",
                    linewidth=2.5, label="paper (mean over classes)" if not has_paper_label else None)
            has_paper_label = True
            ax.annotate(f"{PERCENT * paper['mean']:.1f}", (offset[-1], PERCENT * paper["mean"]), ha="center",
                        va="bottom", fontsize="x-small")
        ax.bar_label(bars, fmt="%.0f", fontsize="xx-small", padding=1)
    ax.set_xticks(x, groups, rotation=45, ha="right")
    ax.set(ylabel="image AUROC (%), mean ± std over seeds", ylim=(0, 105))
    ax.set_title(f"image AUROC per class{_warning_suffix(summary)}", fontsize="small")
    ax.legend(loc="lower left", fontsize="small", ncols=min(len(shot_keys) + 1, 5))
    return _save(fig, path)


def _cases_figure(summary: dict, record: dict, path: Path) -> Path:
    from .datasets import read_mask
    from ..preprocess import read_image

    cases = record["cases"]
    has_masks = summary["pixel_metrics"][record["class"]] is None
    images = [read_image(c["path"]) for c in cases]
    maps = [upsample_map(np.asarray(c["token_map"], dtype=np.float32), im.shape[:2]) for c, im in zip(cases, images)]
    lo, hi = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    fig, axes = _figure(len(cases), 3)
    for row, (case, image, amap) in zip(axes, zip(cases, images, maps)):
        row[0].imshow(image)
        row[0].set_title(f"{case['role']}\n{case['defect_type']}, score {case['score']:.3f}", fontsize="small")
        if case["mask_path"]:
            row[1].imshow(read_mask(case["mask_path"]) != 0, cmap="gray", vmin=0, vmax=1)
        elif has_masks:  # a normal image of an annotated data set: its mask is empty
            row[1].imshow(np.zeros(image.shape[:2]), cmap="gray", vmin=0, vmax=1)
        else:
            row[1].text(0.5, 0.5, "no mask", ha="center", va="center", transform=row[1].transAxes)
        row[1].set_title("ground truth", fontsize="small")
        row[2].imshow(image)
        shown = row[2].imshow(amap, cmap="jet", alpha=HEATMAP_ALPHA, vmin=lo, vmax=hi)
        row[2].set_title("anomaly map", fontsize="small")
        fig.colorbar(shown, ax=row[2], fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{record['class']}, {record['shots']}-shot seed {record['seed']}: best and worst cases\n"
                 f"(map colours shared: {lo:.3f}..{hi:.3f}){_warning_suffix(summary)}", fontsize="small")
    return _save(fig, path)


def write_pictures(out: Path, summary: dict, records: Sequence[dict]) -> list[Path]:
    """roc_curves.png, auroc_bars.png and cases/<class>_<K>shot.png under ``out``; returns their paths."""
    out = Path(out)
    shown = _first_seed_records(summary, records)
    paths = [_roc_figure(summary, shown, out / ROC_PNG), _bars_figure(summary, out / BARS_PNG)]
    for (name, shots), record in sorted(shown.items()):
        if record["cases"]:
            paths.append(_cases_figure(summary, record, out / CASES_DIR / f"{name}_{shots}shot.png"))
    return paths
