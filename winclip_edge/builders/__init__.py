"""Artefacts built from a bundle on the machine that runs it: fp16/int8 ONNX variants (:mod:`.variants`) and
TensorRT plans (:mod:`.tensorrt`). Engines load what these build; the CLI's ``engine quantize`` and ``engine build``
commands drive them."""
