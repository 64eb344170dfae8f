"""The runtime never needs torch: import and a full inspect run where torch cannot be imported."""
import subprocess
import sys
import textwrap

from conftest import textured_part


BLOCKER = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "open_clip", "torchvision"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _Block())
""")


def test_import_and_inspect_without_torch(bundle_copy, tmp_path):
    import cv2

    from winclip_edge import Inspector
    from winclip_edge.products import save_memory

    inspector = Inspector(bundle_copy, "widget")
    memory, _ = inspector.embed_references([textured_part(seed=s) for s in range(2)])
    save_memory(inspector.bundle, "widget", memory)
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), textured_part(seed=9))
    script = BLOCKER + textwrap.dedent(f"""
        import winclip_edge
        from winclip_edge import Inspector
        from winclip_edge.cli import main
        r = Inspector({str(bundle_copy)!r}, "widget").inspect([{str(image)!r}])[0]
        assert r.error is None and r.anomaly_map.shape == (240, 240), r
        code = main(["infer", "--bundle", {str(bundle_copy)!r}, "--product", "widget", "--quiet",
                     "--out", {str(tmp_path / 'out')!r}, {str(image)!r}])
        assert code == 0, code
        assert not any(m.split(".")[0] in ("torch", "open_clip") for m in sys.modules), "torch was imported"
        print("OK", r.score)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr


def test_export_without_torch_says_what_to_install(tmp_path):
    script = BLOCKER + "from winclip_edge.cli import main\nraise SystemExit(main(['export', '--out', %r]))" % str(tmp_path / "b")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "winclip-edge[export]" in run.stderr
