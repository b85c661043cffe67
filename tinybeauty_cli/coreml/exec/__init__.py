"""Reference executors for Core ML models: evaluate a model's own ops with PyTorch, on any OS.

:mod:`.mlprogram` compiles the MIL program of an ML Program (``.mlpackage``) and
:mod:`.neuralnetwork` the layers of a NeuralNetwork (``.mlmodel``) into the same
:class:`.graph.OpGraph`. They import only :mod:`..spec` and ``core``.
"""
