"""convforge: train VGG/ResNet image classifiers, export validated ONNX, run them fast.

The three parts are subpackages with one-way dependencies (see docs/design.md):
``convforge.builder`` (PyTorch models and training), ``convforge.export``
(BatchNorm folding, ONNX) and ``convforge.runtime`` (backends, benchmarks,
serving). This top-level module imports none of them, so importing
``convforge`` stays cheap and torch-free.
"""

__version__ = "0.1.0"
