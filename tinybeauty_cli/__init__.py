"""tbopt: shrink TinyBeauty and ship it to iPhones as Core ML."""

__version__ = "0.1.0"
