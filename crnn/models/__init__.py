"""Models, built from `cfg.model` through the registry: `build_model(cfg.model, len(vocab))`."""

from crnn.models import crnn as _crnn  # noqa: F401  (registers "crnn")
from crnn.models.crnn import CRNN, CRNNOutput
from crnn.models.registry import MODELS, build_model, check_model_name, register_model

__all__ = ["CRNN", "CRNNOutput", "MODELS", "build_model", "check_model_name", "register_model"]
