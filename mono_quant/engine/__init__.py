"""The quantization engine: copy the model, select layers, calibrate, swap, check outputs, report.

``quantize`` (``quantize``/``dynamic_quantize``/``static_quantize``), ``selection`` (which layers, and why
others are skipped), ``calibration`` (observers fed by forwards), ``copying`` (the model copy that leaves
the user's model untouched), ``output_check`` (each layer against float; the precision ladder), ``report``,
``fidelity`` (``compare``), ``dequantize``. Imports ``kernels``, ``modules`` and ``graph`` below it.
"""
