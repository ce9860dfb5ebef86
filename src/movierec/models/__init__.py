"""Sequential recommenders behind one contract (`base.SequentialModel`) and a registry of their kinds.

Importing this package registers the built-in kinds: `sse-pt` and `sasrec` (`sse_pt.py`), `bert4rec`, `hstu`.
"""

from movierec.models import bert4rec, hstu, sse_pt  # noqa: F401 (registers their kinds)
