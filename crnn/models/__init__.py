"""The CRNN, built from `cfg.model`: `build_model(cfg.model, len(vocab))`."""

from crnn.models.crnn import CRNN, CRNNOutput, build_model

__all__ = ["CRNN", "CRNNOutput", "build_model"]
