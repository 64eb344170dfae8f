"""The export stage: open_clip -> verified ONNX bundle. The only code that imports torch/open_clip."""
