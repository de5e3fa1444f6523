"""Hugging Face interoperability: export to a transformers folder, import one back."""

from .export import export_hf, export_tokenizer, hf_tokenizer, to_hf_custom, to_hf_model
from .importer import import_hf, import_hf_config, load_hf_model
from .stock import stock_architecture, to_hf_mixtral, to_hf_stock

__all__ = ["export_hf", "export_tokenizer", "hf_tokenizer", "import_hf", "import_hf_config", "load_hf_model",
           "stock_architecture", "to_hf_custom", "to_hf_mixtral", "to_hf_model", "to_hf_stock"]
