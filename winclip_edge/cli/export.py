"""``export``, ``add-text-encoder`` and ``product add``: the export stage (workstation; torch + open_clip, imported
lazily). ``product add`` runs without torch when the bundle has the text encoder (winclip_edge/text_encoder.py)."""
from __future__ import annotations

import argparse
import time
from typing import Any

from ..contract import PATCH_LAYERS
from ..prompts import PROMPT_STYLES
from ..engines.config import PRECISIONS
from .commands import Commands
from .common import EXIT_OK, CliError, csv, csv_ints

TEXT_ENCODERS = ("auto", "bundle", "export")  # add-product: what encodes the prompts


def _export_module() -> Any:
    try:
        from ..export import onnx_export
    except ImportError as err:
        raise CliError(f"the export stage needs torch and open_clip ({err}); install with: pip install 'winclip-edge[export]'") from None
    return onnx_export


def run_export(args: argparse.Namespace) -> int:
    ox = _export_module()
    options = ox.ExportOptions(
        model=args.model, pretrained=args.pretrained, seed=args.seed, products=args.products, scales=args.scales,
        stride=args.stride, patch_layer=args.patch_layer, temperature=args.temperature or ox.DEFAULT_TEMPERATURE,
        opset=args.opset, tolerance=args.tolerance, force=args.force, with_text_encoder=args.with_text_encoder,
    )
    t0 = time.perf_counter()
    bundle = ox.export_bundle(args.out, options, show_progress=not args.quiet)
    diffs = bundle.manifest.verification["max_abs_diff"]
    print(f"bundle {args.out}: {bundle.manifest.model}, weights {bundle.manifest.weights['source']}, "
          f"products {bundle.products() or 'none'}; ONNX vs torch max abs diff {max(diffs.values()):.2e}; "
          f"{time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def run_add_text_encoder(args: argparse.Namespace) -> int:
    from ..bundle import Bundle

    bundle = Bundle(args.bundle)
    if bundle.manifest.text_encoder and not args.force:
        raise CliError(f"{args.bundle} already has a text encoder; pass --force to export it again")
    _export_module()  # the one clear message when torch / open_clip are missing
    from ..export.models import load_from_manifest
    from ..export.text_encoder import add_text_encoder

    t0 = time.perf_counter()
    bundle = add_text_encoder(bundle, load_from_manifest(bundle.manifest), force=args.force)  # refuses other weights
    section = bundle.manifest.text_encoder
    size = sum((bundle.root / name).stat().st_size for name in section["files"]) / 2**20
    print(f"text encoder added to {args.bundle}: {', '.join(section['files'])} ({size:.0f} MiB); ONNX vs torch max abs "
          f"diff {section['verification']['max_abs_diff']:.2e}; {time.perf_counter() - t0:.1f} s. "
          f"`winclip-edge product add --bundle {args.bundle} NAME` now runs without torch")
    return EXIT_OK


def run_add_product(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..names import check_new_name
    from ..prompts import PromptSpec, build_prompts, object_name_for
    from ..text_encoder import has_text_encoder

    bundle = Bundle(args.bundle)
    check_new_name(args.product, bundle.products())  # a bad name fails before anything is encoded
    if args.product in bundle.products() and not args.force:
        raise CliError(f"product {args.product!r} is already in {args.bundle}; pass --force to re-encode it")
    spec = PromptSpec(
        object_name=args.object_name or object_name_for(args.product), style=args.prompt_style,
        extra_normal_states=tuple(args.normal_state), extra_anomalous_states=tuple(args.anomalous_state),
        extra_templates=tuple(args.template),
    )
    build_prompts(spec)  # bad states / templates fail before anything is loaded
    use_bundle = args.text_encoder == "bundle" or (args.text_encoder == "auto" and has_text_encoder(bundle))
    if args.text_precision != "fp32" and not use_bundle:
        raise CliError("--text-precision is for the bundle's text encoder; the export stage encodes in fp32")
    if use_bundle:
        from ..text_encoder import add_product

        text = add_product(bundle, args.product, spec, args.text_precision, args.force, show_progress=not args.quiet)
        how = f"the bundle's text encoder ({text.encoder['source']})"
    else:
        try:
            ox = _export_module()
        except CliError as err:
            raise CliError(f"{err}; or put the text encoder in the bundle on the workstation "
                           f"(`winclip-edge add-text-encoder --bundle B`) so that add-product runs without torch") from None
        from ..export.models import load_from_manifest

        loaded = load_from_manifest(bundle.manifest)  # refuses other weights
        ox.add_product(bundle, args.product, loaded, spec=spec, show_progress=not args.quiet)
        how = "the export stage (torch)"
    print(f"product {args.product!r} ({spec.object_name!r}) added to {args.bundle} with {how}")
    return EXIT_OK


def register(commands: Commands) -> None:
    p = commands.add_parser("export", help="open_clip model -> verified ONNX bundle (needs the [export] extra; "
                                      "ViT-B-16-plus-240 takes ~1-2 min on 2 CPU cores)")
    p.add_argument("--model", default="ViT-B-16-plus-240",
                   help="open_clip model name, winclip-tiny (shipped: seconds to export), or model-config JSON path")
    p.add_argument("--pretrained", default="laion400m_e31",
                   help="open_clip pretrained tag (downloads), a local checkpoint PATH (offline), or 'none' (random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --pretrained none")
    p.add_argument("--products", type=csv, default=(), help="comma-separated product names, e.g. bottle,metal_nut")
    p.add_argument("--scales", type=csv_ints, default=(2, 3), help="window scales in tokens (default 2,3)")
    p.add_argument("--stride", type=int, default=1, help="window stride in tokens (default 1)")
    p.add_argument("--patch-layer", choices=PATCH_LAYERS, default="penultimate",
                   help="patch tokens for few-shot: penultimate block (default) or last block + ln_post")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature stored in the bundle (0.07)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference ONNX vs torch (default 1e-4)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--with-text-encoder", action="store_true",
                   help="also put the text tower (text.onnx) and tokenizer in the bundle: add-product then runs "
                        "without torch (ViT-B-16-plus-240: ~+350 MiB, see README)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_export)

    p = commands.add_parser("add-text-encoder", help="put the text tower (text.onnx) and tokenizer into an existing bundle, "
                                                "from the same weights (needs [export])")
    p.add_argument("--bundle", required=True)
    p.add_argument("--force", action="store_true", help="export the text encoder again")
    p.set_defaults(run=run_add_text_encoder)

    def _add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", required=True)
        p.add_argument("product", help="product name, e.g. metal_nut")
        p.add_argument("--object-name", help="text for the object (default: product name with _ -> space)")
        p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="cpe",
                       help="cpe (paper, default), clip_ac or templates_only (the paper's baselines)")
        p.add_argument("--normal-state", action="append", default=[], help="extra normal state, '{o}' = object (repeatable)")
        p.add_argument("--anomalous-state", action="append", default=[], help="extra anomalous state (repeatable)")
        p.add_argument("--template", action="append", default=[], help="extra template, '{c}' = state phrase (repeatable)")
        p.add_argument("--force", action="store_true", help="re-encode an existing product")
        p.add_argument("--text-encoder", choices=TEXT_ENCODERS, default="auto",
                       help="auto (default): the bundle's text.onnx when it has one, else the export stage (torch); "
                            "bundle or export to choose")
        p.add_argument("--text-precision", choices=PRECISIONS, default="fp32",
                       help="bundle text encoder only: fp32 (default) or a variant made by `engine quantize --graph text`")
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(run=run_add_product)

    commands.add("product add", _add_args, old="add-product",
                 help="encode the text prototypes of a product into a bundle (with the bundle's text encoder: no "
                      "torch; else needs [export])")
