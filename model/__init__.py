"""Models: configs, weight loading, the Llama-family decoder, attention backends and sampling."""

from conveyor.model.config import ModelConfig, ModelConfigError
from conveyor.model.decoder import DecoderModel
from conveyor.model.loader import ModelNotFoundError, ModelSource, load_model, resolve_model
from conveyor.model.weights import WeightsError

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
