"""Offline export of the GE2E speaker encoder to ONNX and a Triton model repository.

Only the export imports torch and onnx; the server never imports this package.
Entry point: `export.pipeline.run_export`.
"""
