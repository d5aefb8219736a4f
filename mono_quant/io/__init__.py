"""The one on-disk format and its ways in and out.

``disk`` (atomic writes, private reads), ``validate`` (every check of what a file claims), ``save`` and
``read``/``load`` (mono-quant files), ``hf_write``/``hf_export``/``hf_read`` (the compressed-tensors folder
``transformers`` loads), ``shards`` and ``stream`` (large checkpoints, one tensor at a time),
``float_checkpoint`` (float inputs of the command line), ``onnx`` and ``onnx_checks`` (ONNX export).
"""
