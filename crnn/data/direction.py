"""Text direction (`data.direction`): lines are trained on in the order the image shows their
characters, left to right, and read back in logical order, by the Unicode bidirectional algorithm
(python-bidi's implementation). "ltr": as written; "rtl": a right-to-left paragraph (Hebrew,
Arabic, Syriac), with digits and Latin words inside kept left to right; "auto": each line's
direction from its first strong character."""

from __future__ import annotations

from bidi import algorithm


def bidi_order(text: str, direction: str) -> tuple[str, list[int]]:
    """`text` reordered as the bidirectional algorithm displays it (mirrored brackets included)
    and, for each character of the result, its index in `text`. For "ltr": `text` as it is."""
    if direction == "ltr" or not text:
        return text, list(range(len(text)))
    storage = algorithm.get_empty_storage()
    level = algorithm.get_base_level(text) if direction == "auto" else algorithm.PARAGRAPH_LEVELS["R"]
    storage["base_level"], storage["base_dir"] = level, ("L", "R")[level]
    algorithm.get_embedding_levels(text, storage)
    for index, char in enumerate(storage["chars"]):
        char["index"] = index  # carried through the reordering
    for step in (algorithm.explicit_embed_and_overrides, algorithm.resolve_weak_types,
                 algorithm.resolve_neutral_types, algorithm.resolve_implicit_levels,
                 algorithm.reorder_resolved_levels, algorithm.apply_mirroring):
        step(storage, False)
    return "".join(char["ch"] for char in storage["chars"]), [char["index"] for char in storage["chars"]]


def visual(text: str, direction: str) -> str:
    """A line's text (logical order) in the order its image shows it, left to right."""
    return bidi_order(text, direction)[0]


def logical(text: str, direction: str) -> tuple[str, list[int]]:
    """What a model read (left to right) in logical order, and for each character of the result the
    index of the character it was read as. The inverse of `visual` except where two orders display
    alike (a number right beside a Latin word in a right-to-left line)."""
    return bidi_order(text, direction)
