"""crnn: line-level handwriting recognition with a ResNet encoder, a BiLSTM head and CTC."""

__version__ = "0.1.0"
