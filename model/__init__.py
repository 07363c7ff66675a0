"""Models: configs, weight loading, the Llama-family decoder, attention backends and sampling."""

from model.config import ModelConfig, ModelConfigError
from model.decoder import DecoderModel
from model.loader import ModelNotFoundError, ModelSource, load_model, resolve_model
from model.weights import WeightsError

__all__ = [
    "DecoderModel",
    "ModelConfig",
    "ModelConfigError",
    "ModelNotFoundError",
    "ModelSource",
    "WeightsError",
    "load_model",
    "resolve_model",
]
