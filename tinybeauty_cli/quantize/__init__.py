"""int8 static quantization of a float network (module in, int8 TorchScript module out).

``transform.quantize_module`` is the entry; ``config`` (torch-free) holds what it can be told.
"""
