"""The trained reference model of SPEC §14, its pinned corpus and its training script.

``load_reference_model()`` gives the shipped checkpoint as an ``MLAModel``; ``tokens.encode`` / ``decode``
turn text into its byte tokens and back; ``corpus.load_corpus()`` gives the pinned, hash-verified Python
standard library source it was trained on, split into training and held-out files;
``python -m swa_rewrite.reference.train`` trains it (``dense_forward``, ``models/dense.py``). Nothing here
runs at import time.
"""

from .model import CHECKPOINT_DIR, REFERENCE_CONFIG, load_reference_model
from .tokens import BOS, VOCAB_SIZE, decode, encode

__all__ = ["BOS", "CHECKPOINT_DIR", "REFERENCE_CONFIG", "VOCAB_SIZE", "decode", "encode", "load_reference_model"]
