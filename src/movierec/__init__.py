"""movierec: Transformer sequential recommenders (SSE-PT, SASRec) on MovieLens."""

__version__ = "0.1.0"
