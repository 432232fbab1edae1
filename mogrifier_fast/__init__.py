"""mogrifier_fast: a fast, drop-in ``nn.LSTM``-shaped Mogrifier LSTM (Melis et al., ICLR 2020)."""

from mogrifier_fast.backends import available_backends
from mogrifier_fast.layer import MogrifierLSTM, MogrifierLSTMCell
from mogrifier_fast.reference import NaiveLSTM

__version__ = "0.1.0"

__all__ = ["MogrifierLSTM", "MogrifierLSTMCell", "NaiveLSTM", "__version__", "available_backends"]
