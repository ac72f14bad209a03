"""The one exception type the merge engine raises for bad input."""

from __future__ import annotations


class MergeInputError(ValueError):
    """Input to a merge was unusable: names the adapter, the key, what was expected and what came.

    ``adapter`` is the adapter's index in the input sequence (callers that know a better label,
    such as a folder name or a Flower node id, pass ``labels`` to the validators). ``key`` is the
    state-dict key at fault, when there is one.
    """

    def __init__(
        self, message: str, *, adapter: int | str | None = None, key: str | None = None
    ) -> None:
        self.reason = message
        self.adapter = adapter
        self.key = key
        where = []
        if adapter is not None:
            where.append(f"adapter {adapter}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
