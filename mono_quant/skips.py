"""Why a layer was not quantized: a kind code paths can test, and a message for people.

``Skip`` is a ``str`` (the message, so reports, JSON and comparisons see plain text) carrying a ``SkipKind``;
code asks ``skip.kind``, never the wording.
"""

from __future__ import annotations

from enum import Enum


class SkipKind(str, Enum):
    """The reasons a module with parameters stays float."""

    ALREADY_QUANTIZED = "already_quantized"
    UNSUPPORTED = "unsupported"  # no quantized class for this layer (type, dtype, geometry)
    NOT_IN_LAYER_TYPES = "not_in_layer_types"
    NOT_INCLUDED = "not_included"
    EXCLUDED = "excluded"
    TOO_SMALL = "too_small"
    EMPTY = "empty"
    META = "meta"
    FOLDED = "folded"  # a BatchNorm folded into its convolution
    OUTPUT_FLOOR = "output_floor"  # under its output floor against float at every precision tried
    BUDGET = "budget"  # kept float by the accuracy budget

    @property
    def chosen_by_user(self) -> bool:
        """Whether the user's own filters (``include``, ``exclude``, ``min_numel``, ``layer_types``) left it out.

        Example:
            >>> SkipKind.EXCLUDED.chosen_by_user, SkipKind.UNSUPPORTED.chosen_by_user
            (True, False)
        """
        return self in (SkipKind.NOT_IN_LAYER_TYPES, SkipKind.NOT_INCLUDED, SkipKind.EXCLUDED, SkipKind.TOO_SMALL)


class Skip(str):
    """A skip reason: the message as the string, ``kind`` for code.

    Example:
        >>> reason = Skip(SkipKind.EXCLUDED, "excluded by pattern 'head'")
        >>> reason == "excluded by pattern 'head'", reason.kind.chosen_by_user
        (True, True)
    """

    kind: SkipKind

    def __new__(cls, kind: SkipKind, message: str) -> Skip:
        skip = super().__new__(cls, message)
        skip.kind = SkipKind(kind)
        return skip

    def __getnewargs__(self) -> tuple[SkipKind, str]:  # pickling and deepcopy keep the kind
        return self.kind, str(self)


def kind_of(reason: str) -> SkipKind | None:
    """The kind of a skip reason, ``None`` for plain text (a reason from a file written before kinds).

    Example:
        >>> kind_of(Skip(SkipKind.FOLDED, "folded into conv")), kind_of("folded into conv")
        (<SkipKind.FOLDED: 'folded'>, None)
    """
    return getattr(reason, "kind", None)
