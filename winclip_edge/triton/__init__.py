"""Triton Inference Server: the model repository a GPU server runs, and a CPU trial server (PyTriton's tritonserver)."""
