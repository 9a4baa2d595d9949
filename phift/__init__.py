"""phift: fine-tune Microsoft's phi models (phi-1, phi-1_5, phi-2) in plain PyTorch."""
from .config import PRESETS, PhiConfig
from .generate import generate
from .model import KVCache, Phi
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load_model, save_model

__all__ = ["KVCache", "PRESETS", "Phi", "PhiConfig", "Tokenizer", "generate", "load_model", "load_tokenizer",
           "save_model"]
__version__ = "0.1.0"
