"""SSE-PT and SASRec."""
