"""The engine: the step loop over an executor, the input and output stages, config and accounting.

Pure Python: it holds no tensors and imports no model code (``runtime/worker`` owns the device).
"""
