#!/usr/bin/env python
"""Small defects on high-resolution parts: whole-frame vs tiled (position / pooled memory) vs tiled + ROI.

Renders N normal and N defective 2048x2048 frames of one fixtured part (a machined plate: brushed texture,
holes, a printed label) lying on a conveyor with fresh clutter around it in every frame (the distraction an
ROI removes), with one defect of 12-64 px per defective frame (scratch, spot or rust stain) at a random place
of the part, and K normal reference frames. No download: everything is drawn here (OpenCV).

Each setting runs through the library as users run it (`register` with tiling, the product's ROI, the
Inspector) on a tiny random-weight bundle with the default model's geometry (240 px input, 15x15 grid):
image AUROC, pixel AUROC and PRO (FPR <= 0.3) over the full-resolution maps, and wall time per frame.
Random weights carry no semantics: what they show is localisation by few-shot association (a defect's
tokens match no reference token, the rest match), which is what tiling changes. Zero-shot (text) scores
are noise with random weights and say nothing here.

Optionally (``--timing-bundle``, e.g. the ViT-B-16-plus-240 bundle) the time per frame of the whole frame and of
tiles + ROI (the other settings run the same units) is measured on that bundle, zero-shot, for ``--timing-frames``
frames (nothing is written into it).

    python benchmarks/small_defects.py                  # -> benchmarks/results/small_defects_<date>.md + .json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from winclip_edge import Inspector  # noqa: E402
from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402
from winclip_edge.evaluation.metrics import PixelMetrics, image_metrics  # noqa: E402
from winclip_edge.registration import register  # noqa: E402
from winclip_edge.tiles.roi import mask_from_array, save_roi  # noqa: E402
from winclip_edge.scoring import ScoringOptions  # noqa: E402
from winclip_edge.tiles.tiling import AUTO, TilingConfig  # noqa: E402

PRODUCT = "part"
TINY_CONFIG = {  # tests/conftest.py "tiny240": the default model's 15x15 grid at a fraction of its cost
    "embed_dim": 32,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
DEFECT_RANGE = (12, 64)  # defect sizes in source pixels (the range)
DEFECT_KINDS = ("scratch", "spot", "stain")


@dataclass(frozen=True)
class Design:
    """The fixtured part every frame shows: its surface and where it is (the ROI)."""

    surface: np.ndarray  # RGB uint8 [S, S, 3]
    part: np.ndarray  # bool [S, S]


def make_design(size: int, seed: int = 0) -> Design:
    """A machined plate with rounded corners, brushed texture, four holes and a printed label."""
    rng = np.random.default_rng(seed)
    s = size
    grain = cv2.GaussianBlur(rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), sigmaX=9, sigmaY=0.8)
    shade = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
    grey = 150 + 14 * grain / grain.std() + 10 * shade
    surface = np.stack([grey, grey * 0.98, grey * 0.94], -1).clip(0, 255).astype(np.uint8)
    part = np.zeros((s, s), np.uint8)
    m, r = int(0.14 * s), int(0.08 * s)
    cv2.rectangle(part, (m + r, m), (s - m - r, s - m), 1, -1)
    cv2.rectangle(part, (m, m + r), (s - m, s - m - r), 1, -1)
    for cx, cy in ((m + r, m + r), (s - m - r, m + r), (m + r, s - m - r), (s - m - r, s - m - r)):
        cv2.circle(part, (cx, cy), r, 1, -1)
        cv2.circle(surface, (cx, cy), r // 3, (35, 35, 38), -1)  # mounting holes
    x0, y0 = int(0.40 * s), int(0.62 * s)  # a printed label with bars
    cv2.rectangle(surface, (x0, y0), (x0 + int(0.2 * s), y0 + int(0.07 * s)), (225, 225, 215), -1)
    for i in range(12):
        x = x0 + int(0.012 * s) + i * int(0.015 * s)
        cv2.rectangle(surface, (x, y0 + int(0.012 * s)), (x + int(0.006 * s), y0 + int(0.055 * s)), (30, 30, 30), -1)
    return Design(surface, part.astype(bool))


def _clutter(size: int, rng: np.random.Generator) -> np.ndarray:
    """A conveyor belt with things lying on it: different in every frame (the distraction outside the ROI)."""
    s = size
    belt = (55 + 8 * cv2.GaussianBlur(rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), 3)).clip(0, 255)
    image = np.repeat(belt[..., None], 3, -1).astype(np.uint8)
    for _ in range(int(rng.integers(20, 40))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, s, 2))
        kind = rng.integers(3)
        if kind == 0:
            x2, y2 = (int(v) for v in rng.integers(0, s, 2))
            cv2.line(image, (x, y), (x2, y2), colour, int(rng.integers(4, 30)), cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(image, (x, y), int(rng.integers(10, 120)), colour, -1, cv2.LINE_AA)
        else:
            w, h = (int(v) for v in rng.integers(20, 200, 2))
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1)
    return image


def add_defect(image: np.ndarray, gt: np.ndarray, where: np.ndarray, rng: np.random.Generator) -> dict:
    """Draw one defect of 12-64 px (scratch, spot or stain) at a random place of ``where``; returns its record."""
    size = int(rng.integers(DEFECT_RANGE[0], DEFECT_RANGE[1] + 1))
    kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    ys, xs = np.nonzero(where)
    i = int(rng.integers(len(ys)))
    cy, cx = int(ys[i]), int(xs[i])
    dark = bool(rng.integers(2))
    colour = (25, 22, 20) if dark else (250, 250, 245)
    canvas = np.zeros(gt.shape, np.uint8)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dx, dy = int(np.cos(angle) * size / 2), int(np.sin(angle) * size / 2)
        thickness = max(3, size // 6)
        for target in (image, canvas):
            cv2.line(target, (cx - dx, cy - dy), (cx + dx, cy + dy), colour if target is image else 1, thickness)
    elif kind == "spot":
        axes = (max(3, size // 2), max(3, int(size * rng.uniform(0.3, 0.5))))
        angle = float(rng.uniform(0, 180))
        for target in (image, canvas):
            cv2.ellipse(target, (cx, cy), axes, angle, 0, 360, colour if target is image else 1, -1)
    else:  # a rust-coloured stain with a mottled inside
        h = w = size
        t, l = max(0, cy - h // 2), max(0, cx - w // 2)
        blob = np.zeros((h, w), np.uint8)
        cv2.ellipse(blob, (w // 2, h // 2), (w // 2, h // 3), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        mottle = rng.integers(0, 60, (h, w, 1))
        rust = np.array([170, 75, 25])[None, None] + mottle - 30
        region = image[t:t + h, l:l + w]
        b = blob[:region.shape[0], :region.shape[1]].astype(bool)
        region[b] = rust[:region.shape[0], :region.shape[1]][b].clip(0, 255)
        canvas[t:t + h, l:l + w][b] = 1
    canvas &= where.astype(np.uint8)
    gt |= canvas.astype(bool)
    return {"kind": kind, "size": size, "centre": [cy, cx]}


def render_frame(design: Design, seed: int, defective: bool) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """One camera frame: the part (brightness, sensor noise, a shift of up to 2 px) on fresh clutter."""
    rng = np.random.default_rng(seed)
    s = design.part.shape[0]
    dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
    part = np.roll(design.part, (dy, dx), (0, 1))
    surface = np.roll(design.surface, (dy, dx), (0, 1)).astype(np.float32) * rng.uniform(0.96, 1.04)
    surface += rng.normal(0, 3, surface.shape)
    image = _clutter(s, rng)
    image[part] = surface.clip(0, 255).astype(np.uint8)[part]
    gt = np.zeros((s, s), bool)
    record = None
    if defective:
        inner = cv2.erode(part.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=40).astype(bool)
        record = add_defect(image, gt, inner, rng)
    return image, gt, record


# ---------------------------------------------------------------- settings and the run
@dataclass(frozen=True)
class Setting:
    name: str
    tiling: TilingConfig | None
    roi: bool


def settings(tile, min_defect: int) -> list[Setting]:
    tiled = TilingConfig(tile=tile, min_defect=min_defect)
    return [Setting("whole frame", None, False), Setting("whole frame + ROI", None, True),
            Setting("tiled, position memory", tiled, False),
            Setting("tiled, pooled memory", TilingConfig(tile=tile, min_defect=min_defect, memory="pooled"), False),
            Setting("tiled, position memory + ROI", tiled, True)]


def export_tiny(work: Path) -> Path:
    """The tiny bundle, exported in a subprocess (keeps torch out of the measured process)."""
    config = work / "tiny240.json"
    config.write_text(json.dumps(TINY_CONFIG))
    bundle = work / "bundle"
    run = subprocess.run([sys.executable, "-m", "winclip_edge.cli", "export", "--model", str(config), "--pretrained",
                          "none", "--products", PRODUCT, "--out", str(bundle), "--quiet"], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"export failed:\n{run.stderr}")
    return bundle


def evaluate(bundle: Path, product: str, setting: Setting, roi, frames: list, truths: list, labels: list,
             options: ScoringOptions = ScoringOptions(), warmup: bool = True) -> dict:
    """Inspect ``frames`` one at a time; metrics over the full-resolution maps and seconds per frame."""
    inspector = Inspector(bundle, product, options=options, tiling=setting.tiling, roi=roi if setting.roi else None,
                          with_threshold=False)
    if warmup:
        inspector.inspect(frames[:1])  # first engine call, caches
    pixels, scores, seconds, units = PixelMetrics(), [], [], 0
    for image, truth in zip(frames, truths):
        t0 = time.perf_counter()
        (result,) = inspector.inspect([image], batch_size=1)
        seconds.append(time.perf_counter() - t0)
        if result.error is not None:
            raise SystemExit(f"{setting.name}: {result.error}")
        scores.append(result.score)
        units = result.units
        if truth is not None:
            pixels.update(result.anomaly_map, truth)
    inspector.close()
    out = {"ms_per_frame": 1e3 * float(np.median(seconds)), "units_per_frame": units}
    if truths[0] is not None:
        out.update(image_metrics(np.array(labels), np.array(scores)))
        out.update(pixels.compute())
    return out


def render_table(report: dict) -> str:
    rows = []
    for r in report["results"]:
        rows.append([r["setting"], f"{100 * r['image_auroc']:.1f}", f"{100 * r['pixel_auroc']:.1f}",
                     f"{100 * r['pixel_pro']:.1f}", r["units_per_frame"], f"{r['ms_per_frame']:.0f}"])
    m = report["machine"]
    text = [f"# Small defects on {report['size']}x{report['size']} parts: whole frame vs tiles vs tiles + ROI", "",
            f"- date: {report['date']}; command: `{report['command']}`",
            f"- machine: {m['cpu']}, {m['cores']} logical cores, load average {m['load_average']} at the start and "
            f"{report['load_average_end']} at the end (the machine is shared with other jobs: times are noisy; "
            "compare them within this run only)",
            f"- data: {report['normal']} normal + {report['defective']} defective test frames, defects "
            f"{DEFECT_RANGE[0]}-{DEFECT_RANGE[1]} px ({report['defect_kinds']}), {report['references']} normal "
            f"reference frames; tile {report['tile']} px, overlap {report['overlap']}; ROI = the part's outline",
            "- model: a tiny random-weight bundle with ViT-B-16-plus-240's geometry (240 px, 15x15 grid). Random "
            "weights carry no meaning: these numbers measure localisation by few-shot association (a conspicuous "
            "defect matches no reference token), not what a pretrained model would score; zero-shot scores are noise",
            "", markdown_table(["setting", "image AUROC %", "pixel AUROC %", "PRO %", "units/frame", "ms/frame"], rows)]
    if report.get("timing"):
        t = report["timing"]
        text += ["", f"## Time per frame on {t['model']} ({t['frames']} frame(s), zero-shot, no warm-up, same machine and run; peak "
                 f"memory of the process {report['peak_rss_gib']} GiB: every unit of a frame is one engine call)", "",
                 markdown_table(["setting", "units/frame", "ms/frame"],
                                [[r["setting"], r["units_per_frame"], f"{r['ms_per_frame']:.0f}"] for r in t["results"]])]
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=8, help="normal and defective test frames, each (default 8)")
    p.add_argument("--references", type=int, default=3, help="normal reference frames (default 3)")
    p.add_argument("--size", type=int, default=2048, help="frame side in pixels (default 2048)")
    p.add_argument("--tile", default="auto", help="tile size in pixels or auto (default auto)")
    p.add_argument("--min-defect", type=int, default=32, help="--tile auto: smallest defect to keep visible (32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-bundle", default=None, help="also time the settings on this bundle (zero-shot)")
    p.add_argument("--timing-product", default="textile", help="product of --timing-bundle (default textile)")
    p.add_argument("--timing-frames", type=int, default=1, help="frames timed on --timing-bundle (default 1)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    tile = AUTO if args.tile == AUTO else int(args.tile)
    command = shlex.join(["python", "benchmarks/small_defects.py", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info()
    design = make_design(args.size, args.seed)
    seeds = iter(range(1000 * (args.seed + 1), 1000 * (args.seed + 2)))
    references = [render_frame(design, next(seeds), False)[0] for _ in range(args.references)]
    test = [render_frame(design, next(seeds), i >= args.frames) for i in range(2 * args.frames)]
    frames, truths = [t[0] for t in test], [t[1] for t in test]
    labels = [0] * args.frames + [1] * args.frames
    kinds = sorted({t[2]["kind"] for t in test if t[2]})
    roi = mask_from_array(design.part.astype(np.uint8) * 255, "the part's outline")
    work = Path(tempfile.mkdtemp(prefix="small-defects-"))
    try:
        bundle = export_tiny(work)
        tiled = settings(tile, args.min_defect)
        registrar = Inspector(bundle, PRODUCT, options=ScoringOptions(use_memory=False), tiling=tiled[2].tiling,
                              roi=None, with_threshold=False)
        register(registrar, references)  # memory.npz (whole frames) + tile_memory.npz: every setting uses these
        save_roi(registrar.bundle, PRODUCT, roi)
        tile_px = tiled[2].tiling.tile_shape(registrar.model_size, registrar.bundle.spec.grid)[0]
        registrar.close()
        results = []
        for setting in tiled:
            print(f"{setting.name} ...", file=sys.stderr, flush=True)
            results.append({"setting": setting.name, **evaluate(bundle, PRODUCT, setting, roi, frames, truths, labels)})
        report = {"command": command, "machine": machine, "software": software_versions(), "size": args.size,
                  "normal": args.frames, "defective": args.frames, "references": args.references, "tile": tile_px,
                  "overlap": tiled[2].tiling.overlap, "defect_kinds": ", ".join(kinds),
                  "defects": [t[2] for t in test if t[2]], "results": results, "timing": None}
        stem = f"small_defects_{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}"
        save(args.out, stem, report)  # now: a timing run that fails (e.g. out of memory) leaves these numbers
        if args.timing_bundle:
            from winclip_edge.bundle import Bundle

            model = Bundle(args.timing_bundle, verify=False).manifest.model
            n = args.timing_frames
            report["timing"] = timing = {"model": model, "bundle": args.timing_bundle, "frames": n, "results": []}
            for setting in (tiled[0], tiled[-1]):  # the engine cost of the others is one of these (same units)
                print(f"timing {model}: {setting.name} ...", file=sys.stderr, flush=True)
                r = evaluate(Path(args.timing_bundle), args.timing_product, setting, roi, frames[:n],
                             [None] * n, labels[:n], options=ScoringOptions(use_memory=False), warmup=False)
                timing["results"].append({"setting": setting.name.replace(", position memory", ""), **r})
                save(args.out, stem, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render_table(report))
    return 0


def save(out: str, stem: str, report: dict) -> None:
    """Write (or rewrite) ``<stem>.md`` and ``.json`` with the date, load and peak memory as of now."""
    report.update(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  load_average_end=[round(v, 2) for v in os.getloadavg()],
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2))
    md, js = write_report(out, stem, report, render_table(report))
    print(f"-> {md}, {js}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
