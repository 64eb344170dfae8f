"""Triton Python-backend model (copied as ``<model>/1/model.py`` by ``triton serve``): runs the ``model.onnx`` beside
it with ONNX Runtime on the CPU. Triton's dynamic batcher hands several requests to one ``execute``; they run as one
ONNX Runtime call. Outputs are cast to the dtypes of the model config (FP16 when exported with --outputs-fp16).

Runs inside Triton's Python stub, not in winclip-edge: it imports only numpy, onnxruntime and Triton's utilities.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        threads = int(os.environ.get("WINCLIP_TRITON_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        try:
            arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
            values = self.session.run([name for name, _ in self.outputs], {self.input_name: np.concatenate(arrays)})
        except Exception as err:  # the whole batch failed: every request gets the error, the server stays up
            error = pb_utils.TritonError(f"{type(err).__name__}: {err}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for a in arrays:
            stop = start + len(a)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(v[start:stop], dtype=dtype))
                       for (name, dtype), v in zip(self.outputs, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses

    def finalize(self):
        self.session = None
