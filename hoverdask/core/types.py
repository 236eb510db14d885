"""Nucleus type tables: what each ``tp`` class id means and how QuPath should colour it.

One place decides the table for a model (:func:`select_type_table`): checkpoint metadata first,
then the number of types, then (for the ambiguous 5-type layout) the network mode, with the
reason returned so that callers can tell the user which rule applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hoverdask.core.errors import HoverdaskError

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class NucleusType:
    name: str
    color: RGB


@dataclass(frozen=True)
class TypeTable:
    """Class id -> (name, RGB colour). Id 0 is background for HoVer-Net type heads."""

    name: str
    types: Mapping[int, NucleusType]

    @property
    def nr_types(self) -> int:
        return len(self.types)

    def name_of(self, type_id: int | None) -> str:
        if type_id is None:
            return "Nucleus"
        entry = self.types.get(int(type_id))
        return entry.name if entry else f"Type {type_id}"

    def color_of(self, type_id: int | None) -> RGB:
        if type_id is None:
            return NUCLEUS_COLOR
        entry = self.types.get(int(type_id))
        return entry.color if entry else _fallback_color(int(type_id))

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The override-file layout: ``{"1": {"name": ..., "color": [r, g, b]}, ...}``."""
        return {str(k): {"name": t.name, "color": list(t.color)} for k, t in self.types.items()}


# What the writers and features accept as a type table: a TypeTable, or a plain mapping
# ``{id: NucleusType}`` / ``{id: (name, (r, g, b))}``.
TypeTableLike = TypeTable | Mapping[int, NucleusType | tuple[str, RGB]]


def _table(name: str, entries: list[tuple[str, RGB]]) -> TypeTable:
    return TypeTable(name, {i: NucleusType(n, c) for i, (n, c) in enumerate(entries)})


BACKGROUND: tuple[str, RGB] = ("Background", (0, 0, 0))
NUCLEUS_COLOR: RGB = (255, 200, 0)

# hover_net type_info.json colours (PanNuke); names as in the PanNuke paper and TIAToolbox
PANNUKE = _table(
    "pannuke",
    [
        BACKGROUND,
        ("Neoplastic", (255, 0, 0)),
        ("Inflammatory", (0, 255, 0)),
        ("Connective", (0, 0, 255)),
        ("Dead", (255, 255, 0)),
        ("Non-Neoplastic Epithelial", (255, 165, 0)),
    ],
)
MONUSAC = _table(
    "monusac",
    [
        BACKGROUND,
        ("Epithelial", (255, 0, 0)),
        ("Lymphocyte", (255, 255, 0)),
        ("Macrophage", (0, 255, 0)),
        ("Neutrophil", (0, 0, 255)),
    ],
)
# the official hover_net CoNSeP mapping (dataset merge 3,4 -> 3 and 5,6,7 -> 4);
# TIAToolbox's table orders these classes differently
CONSEP = _table(
    "consep",
    [
        BACKGROUND,
        ("Miscellaneous", (0, 255, 255)),
        ("Inflammatory", (0, 255, 0)),
        ("Epithelial", (255, 0, 0)),
        ("Spindle", (0, 0, 255)),
    ],
)
KNOWN_TABLES: dict[str, TypeTable] = {t.name: t for t in (PANNUKE, MONUSAC, CONSEP)}

_PALETTE: tuple[RGB, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)


def _fallback_color(type_id: int) -> RGB:
    return (0, 0, 0) if type_id == 0 else _PALETTE[(type_id - 1) % len(_PALETTE)]


def generic_table(nr_types: int) -> TypeTable:
    """``Background``, ``Type 1`` .. ``Type n-1`` with distinct colours, for unknown models."""
    entries = [BACKGROUND] + [(f"Type {k}", _fallback_color(k)) for k in range(1, nr_types)]
    return _table(f"generic{nr_types}", entries)


def select_type_table(
    nr_types: int | None, mode: str | None = None, metadata: Mapping[str, Any] | None = None
) -> tuple[TypeTable | None, str]:
    """The table for a model, and a sentence saying which rule chose it.

    Order: a table stored in the checkpoint (``metadata["hoverdask"]["type_names"]`` as a list of
    names, or ``["type_table"]`` as a known table name); nr_types 6 -> PanNuke; nr_types 5 ->
    MoNuSAC for fast mode, CoNSeP for original mode (the official checkpoints); otherwise generic.
    """
    if nr_types is None:
        return None, "the model has no type branch"
    stored = _table_from_metadata(metadata or {}, nr_types)
    if stored is not None:
        return stored, f"type table {stored.name!r} stored in the checkpoint"
    if nr_types == 6:
        return PANNUKE, "6 types: PanNuke table"
    if nr_types == 5 and mode == "fast":
        return MONUSAC, "5 types in fast mode: MoNuSAC table (pass --types to override)"
    if nr_types == 5 and mode == "original":
        return CONSEP, "5 types in original mode: CoNSeP table (pass --types to override)"
    return generic_table(nr_types), f"{nr_types} types, no known table: generic names"


def _table_from_metadata(metadata: Mapping[str, Any], nr_types: int) -> TypeTable | None:
    info = metadata.get("hoverdask")
    if not isinstance(info, Mapping):
        return None
    names = info.get("type_names")
    if (
        isinstance(names, list)
        and len(names) == nr_types
        and all(isinstance(n, str) for n in names)
    ):
        colors = info.get("type_colors")
        if not (isinstance(colors, list) and len(colors) == nr_types):
            colors = [_fallback_color(k) for k in range(nr_types)]
        return TypeTable(
            str(info.get("type_table", "checkpoint")),
            {
                k: NucleusType(name, _parse_color(colors[k], f"type_colors[{k}]"))
                for k, name in enumerate(names)
            },
        )
    known = KNOWN_TABLES.get(str(info.get("type_table", "")))
    if known is not None and known.nr_types == nr_types:
        return known
    return None


def _parse_color(value: Any, where: str) -> RGB:
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    )
    if not ok:
        raise HoverdaskError(f"{where}: colour must be [r, g, b] with integers 0..255, got {value}")
    return (int(value[0]), int(value[1]), int(value[2]))


def load_type_table(path: str | Path, nr_types: int | None = None) -> TypeTable:
    """Read a user table ``{"1": {"name": "...", "color": [r, g, b]}, ...}``.

    Id 0 may be omitted (it is background). With ``nr_types`` given, ids must lie in
    ``0..nr_types-1`` and every non-background id must be named, so no class goes unlabelled.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HoverdaskError(f"type table {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HoverdaskError(f"type table {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise HoverdaskError(f"type table {path} must be a non-empty JSON object of id -> entry")
    types: dict[int, NucleusType] = {}
    for key, entry in raw.items():
        where = f"{path.name}[{key!r}]"
        if not str(key).isdigit():
            raise HoverdaskError(f"{where}: ids must be non-negative integers written as strings")
        if not isinstance(entry, dict) or set(entry) != {"name", "color"}:
            raise HoverdaskError(f'{where}: each entry must be {{"name": ..., "color": [r,g,b]}}')
        name = entry["name"]
        if not isinstance(name, str) or not name.strip():
            raise HoverdaskError(f"{where}: name must be a non-empty string")
        types[int(key)] = NucleusType(name.strip(), _parse_color(entry["color"], where))
    types.setdefault(0, NucleusType(*BACKGROUND))
    if nr_types is not None:
        wrong = sorted(k for k in types if k >= nr_types)
        if wrong:
            raise HoverdaskError(f"type table {path}: ids {wrong} exceed the model's {nr_types}")
        absent = [k for k in range(1, nr_types) if k not in types]
        if absent:
            raise HoverdaskError(f"type table {path}: no entry for type id(s) {absent}")
    return TypeTable(path.stem, dict(sorted(types.items())))
