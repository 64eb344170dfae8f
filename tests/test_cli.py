"""The CLI end to end on a tiny config: export, add-product, register, calibrate, infer, refusals."""
import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.cli import main


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, config_dir):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    code = main(["export", "--model", str(config_dir / "tiny224p32.json"), "--pretrained", "none", "--seed", "3",
                 "--products", "screw,metal_nut", "--scales", "2,3", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def _images(folder, seeds, defect=None):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        p = folder / f"part_{s}.png"
        cv2.imwrite(str(p), textured_part((224, 224), seed=s, defect=defect))
        paths.append(str(p))
    return paths


def test_export_writes_manifest_and_products(cli_bundle):
    manifest = json.loads((cli_bundle / "manifest.json").read_text())
    assert manifest["weights"] == {"source": "none", "seed": 3, "id": manifest["weights"]["id"]}
    assert manifest["grid"] == [7, 7] and manifest["scales"] == [2, 3] and manifest["patch_layer"] == "penultimate"
    assert set(manifest["files"]) == {"visual.onnx"}
    assert sorted(p.name for p in (cli_bundle / "products").iterdir()) == ["metal_nut", "screw"]


def test_export_refuses_existing_folder_and_bad_model(cli_bundle, tmp_path, capsys):
    assert main(["export", "--model", "ViT-B-32", "--pretrained", "none", "--out", str(cli_bundle)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "missing.json"), "--pretrained", "none", "--out", str(tmp_path / "x")]) == 2


def test_add_product_and_refusals(cli_bundle, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(cli_bundle, bundle)
    assert main(["add-product", "--bundle", str(bundle), "tile", "--object-name", "ceramic tile",
                 "--normal-state", "clean {o}", "--quiet"]) == 0
    from winclip_edge.bundle import Bundle
    from winclip_edge.products import load_text

    text = load_text(Bundle(bundle), "tile")
    assert len(text.normal_prompts) == 8 * 22 and "a photo of a clean ceramic tile." in text.normal_prompts
    assert main(["add-product", "--bundle", str(bundle), "tile"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    # a bundle whose weights id does not match what its manifest re-creates is refused
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["weights"]["seed"] = 4
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["add-product", "--bundle", str(bundle), "gear", "--quiet"]) == 2
    assert "differ from the bundle" in capsys.readouterr().err


def test_register_calibrate_infer_with_a_bad_file(cli_bundle, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(cli_bundle, bundle)
    refs = _images(tmp_path / "refs", range(4))
    normals = _images(tmp_path / "normal", range(10, 13))
    inputs = tmp_path / "inputs"
    _images(inputs, [20, 21])
    _images(inputs, [22], defect=(0, 0, 112, 112))
    (inputs / "broken.png").write_text("this is not an image")
    common = ["--bundle", str(bundle), "--product", "screw", "--quiet"]

    assert main(["register", *common, *refs]) == 0
    assert main(["calibrate", *common, *normals, "--false-alarm-rate", "0"]) == 0
    out = tmp_path / "out"
    code = main(["infer", *common, "--batch", "2", "--out", str(out), str(inputs)])
    assert code == 1  # one input failed, after all others were processed
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    bad = [l for l in lines if l["error"]]
    assert len(bad) == 1 and "broken.png" in bad[0]["error"] and bad[0]["score"] is None
    threshold = json.loads((bundle / "products" / "screw" / "threshold.json").read_text())["value"]
    for line in (l for l in lines if not l["error"]):
        assert 0 <= line["score"] <= 1 and line["threshold"] == threshold
        assert line["anomalous"] == (line["score"] > threshold)
        m = np.load(line["map"])
        assert m.dtype == np.float32 and m.shape == (224, 224)
        assert cv2.imread(line["overlay"]) is not None
        assert set(line["timings_ms"]) >= {"decode", "engine", "scoring", "resize", "write"}
    assert "broken.png" in capsys.readouterr().err

    # --append adds references and makes the old threshold stale
    assert main(["register", *common, "--append", *_images(tmp_path / "more", [30])]) == 0
    assert main(["infer", *common, "--out", str(tmp_path / "o2"), str(inputs / "part_20.png")]) == 2
    assert "calibrate" in capsys.readouterr().err
    assert main(["calibrate", *common]) == 0  # leave-one-out over the 5 references
    assert main(["infer", *common, "--out", str(tmp_path / "o3"), str(inputs / "part_20.png")]) == 0


def test_runtime_refusals(cli_bundle, tmp_path, capsys):
    assert main(["infer", "--bundle", str(tmp_path), "--product", "screw", "--out", str(tmp_path / "o"), "x.png"]) == 2
    assert "not a bundle" in capsys.readouterr().err
    assert main(["infer", "--bundle", str(cli_bundle), "--product", "gear", "--out", str(tmp_path / "o"), "x.png"]) == 2
    assert "product add" in capsys.readouterr().err
    assert main(["register", "--bundle", str(cli_bundle), "--product", "screw", str(tmp_path / "none.png")]) == 2
    assert main(["calibrate", "--bundle", str(cli_bundle), "--product", "metal_nut", "--quiet"]) == 2
    assert "normal images" in capsys.readouterr().err


def test_commands_grouped_by_noun_keep_their_old_names_as_aliases(capsys):
    """`engine quantize|build|tune`, `triton export|serve`, `product add|versions|rollback`; the old names parse to
    the same command, print the new name, and are not listed in --help."""
    from winclip_edge.cli import build_parser

    parser = build_parser()
    for old, new in (("quantize", "engine quantize"), ("build-engine", "engine build"), ("tune", "engine tune"),
                     ("export-triton", "triton export"), ("triton-serve", "triton serve"),
                     ("add-product", "product add")):
        args = parser.parse_args([*new.split(), "--help"][:-1] + _required(new))
        alias = parser.parse_args([old] + _required(new))
        assert alias.run is args.run and alias.renamed_to == new
    listed = {line.split()[0] for line in parser.format_help().split("positional arguments:")[1].splitlines()
              if line.startswith("    ") and not line.startswith("     ")}
    assert {"engine", "product", "triton", "infer"} <= listed
    assert not listed & {"quantize", "build-engine", "tune", "export-triton", "triton-serve", "add-product"}
    assert main(["add-product", "--bundle", "/nonexistent", "x"]) == 2
    err = capsys.readouterr().err
    assert "`winclip-edge add-product` is now `winclip-edge product add`" in err
    assert "winclip-edge product add: error:" in err


def _required(command: str) -> list[str]:
    return {"engine quantize": ["--bundle", "b", "--precision", "int8"], "engine build": ["--bundle", "b"],
            "engine tune": ["--bundle", "b"], "triton export": ["--bundle", "b", "--out", "o"],
            "triton serve": ["--bundle", "b"], "product add": ["--bundle", "b", "x"]}[command]
