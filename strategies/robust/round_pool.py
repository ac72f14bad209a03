"""Which pool of update norms judged a reply: the words of the rejection reasons and the audit.

The norm screen's reference is the lower median of a pool (``norm_screen``). A round screens
against one of three pools:

- buffered (the whole round held: a stage or a method needs every reply): this round's norms
  and the history of earlier rounds' accepted norms;
- streamed with a history: earlier rounds' accepted norms alone, known before the first reply;
- streamed without one (the first round): the first ``size`` replies that pass the per-reply
  checks are held back and screened against their own median (and whatever history there is);
  every later reply is screened, on arrival, against that same bound. At most ``size`` + 1
  replies are ever held (the pool and the one that showed the stream goes on), whatever the
  number of clients.
"""

from __future__ import annotations


def pool_label(*, streamed: bool, pool_size: int | None) -> str:
    """The pool that set the bound, as the reasons and ``RoundReport.to_json`` name it.

    ``pool_size``: the held-back replies of a streamed first round (None: no pool held back).
    """
    if not streamed:
        return "this round's and earlier rounds'"
    if pool_size is None:
        return "earlier rounds'"
    return f"this round's first {pool_size} checked replies' pool and earlier rounds'"
