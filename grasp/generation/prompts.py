"""Paper-style prompts for items and users (docs/design.md section 1, stage 2).

A template is a sequence of *pieces* (usually one sentence each) with named placeholders such as
``{attributes}``. When any placeholder of a piece other than ``{domain}`` is empty, the whole piece is left
out, so missing fields never leave ``None``, a dangling ``"; ."`` or an empty sentence behind. Runs of
whitespace are collapsed, so an empty ``{domain}`` reads "The item ...".

Item placeholders:
    ``{domain}`` what the items are ("movie"; may be empty), ``{title}`` the item's name,
    ``{attributes}`` every other attribute as ``"name is ...; year is ...; brand is ..."`` (known fields first:
    name, year, genres, brand, price, categories; then the rest, e.g. a RecBole ``text`` column as
    ``"text is ..."``), ``{features}`` and ``{description}``.
User placeholders:
    ``{domain}``, ``{attributes}`` the user's demographics (``"age is 24; gender is male; ..."``) and
    ``{titles}`` the titles of the user's most recent *training* items, oldest first, ``"; "``-separated.

An item prompt sent to an LLM ends with the *item task* (``item_task``, one piece with item placeholders):
the instruction to describe the item. Small models given the attributes with the instruction only in
the system prompt tend to echo the attributes back. The template generator, whose description is the prompt
itself, leaves the task out. The user template ends with its own instruction.

Templates can be read from a JSON file with ``"item"``, ``"item_task"`` and ``"user"`` keys (each optional),
each a string or a list of pieces; a missing key keeps the default::

    {"item": ["The {domain} item {title}.", "Attributes: {attributes}."],
     "item_task": "Describe this {domain} item in two sentences.",
     "user": ["A user who watched {titles}.", "Describe their taste."]}
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from grasp.data import DataError, Dataset

__all__ = ["PromptTemplates", "item_prompts", "user_prompts", "ITEM_PLACEHOLDERS", "USER_PLACEHOLDERS"]

#: Placeholders an item template may use.
ITEM_PLACEHOLDERS = ("domain", "title", "attributes", "features", "description")
#: Placeholders a user template may use.
USER_PLACEHOLDERS = ("domain", "attributes", "titles")

_DEFAULT_ITEM = (
    "The {domain} item has the following attributes: {attributes}.",
    "The item has the following features: {features}.",
    "The item has the following descriptions: {description}.",
)
_DEFAULT_ITEM_TASK = (
    "Please describe this {domain} item in about 100 words: what it is and what kind of person would enjoy it. "
    "Write the description itself, not the list of attributes.",
)
_DEFAULT_USER = (
    "The user has the following attributes: {attributes}.",
    "The user has interacted with the following {domain} items, from the earliest to the most recent: {titles}.",
    "Please conclude the user's preferences.",
)

_TITLE_KEYS = ("title", "name", "item_name", "movie_title", "product_name")
_FEATURE_KEYS = ("features", "feature")
_DESCRIPTION_KEYS = ("description", "descriptions", "desc")
#: Attributes listed first, in this order (after the name); the rest follow in their original order.
_LEADING_KEYS = ("year", "genres", "genre", "brand", "price", "categories", "category")
_MISSING = {"none", "null", "nan", "n/a", "na"}
_GENDERS = {"m": "male", "f": "female"}


@dataclass(frozen=True)
class PromptTemplates:
    """The item and user prompt templates: sequences of pieces with named placeholders (see the module doc).

    A plain string is accepted for either field and becomes a single piece.

    Raises:
        ValueError: a piece is empty or not a string, or has an unknown, positional or formatted placeholder
            (the message names the field and the known placeholders).
    """

    item: tuple[str, ...] = _DEFAULT_ITEM
    user: tuple[str, ...] = _DEFAULT_USER
    item_task: tuple[str, ...] = _DEFAULT_ITEM_TASK

    def __post_init__(self) -> None:
        for name, allowed in (("item", ITEM_PLACEHOLDERS), ("user", USER_PLACEHOLDERS),
                              ("item_task", ITEM_PLACEHOLDERS)):  # fmt: skip
            pieces = getattr(self, name)
            pieces = (pieces,) if isinstance(pieces, str) else tuple(pieces)
            if not pieces:
                raise ValueError(f"the {name} template has no pieces")
            for piece in pieces:
                _check_piece(name, piece, allowed)
            object.__setattr__(self, name, pieces)

    @classmethod
    def load(cls, path: str | Path) -> PromptTemplates:
        """Read templates from a JSON file (``{"item": ..., "item_task": ..., "user": ...}``); a missing key keeps
        the default.

        Raises:
            DataError: the file is missing or not UTF-8, invalid JSON (with its line), not an object, has an
                unknown key, or a template is invalid (the message names the file).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(path, None, f"cannot read the prompt template file: {error}") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(path, error.lineno, f"invalid JSON: {error.msg}") from error
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise DataError(path, 1, f"expected a JSON object with 'item', 'item_task' and/or 'user' keys, got {kind}")
        unknown = sorted(set(data) - {"item", "item_task", "user"})
        if unknown:
            raise DataError(
                path, None, f"unknown key(s) {', '.join(map(repr, unknown))} (known: 'item', 'item_task', 'user')"
            )
        for key, value in data.items():
            if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise DataError(path, None, f"{key!r} must be a string or a list of strings")
        try:
            return cls(**data)
        except ValueError as error:
            raise DataError(path, None, str(error)) from error


def _check_piece(name: str, piece: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(piece, str) or not piece.strip():
        raise ValueError(f"the {name} template has an empty or non-string piece: {piece!r}")
    known = ", ".join("{" + p + "}" for p in allowed)
    try:
        parsed = list(string.Formatter().parse(piece))
    except ValueError as error:
        raise ValueError(
            f"the {name} template piece {piece!r} is malformed ({error}); write {{{{ for a brace"
        ) from error
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in allowed:
            raise ValueError(f"unknown placeholder {{{field}}} in the {name} template (known: {known})")
        if spec or conversion:
            raise ValueError(f"placeholder {{{field}}} in the {name} template takes no format spec or conversion")


def _render(pieces: tuple[str, ...], values: dict[str, str], what: str) -> str:
    """Fill the pieces whose non-domain placeholders all have text; join and collapse whitespace."""
    kept = []
    for piece in pieces:
        fields = {field for _, field, _, _ in string.Formatter().parse(piece) if field}
        if all(values[field] for field in fields - {"domain"}):
            kept.append(piece.format(**values))
    prompt = " ".join(" ".join(kept).split())
    if not prompt:
        raise ValueError(f"the template leaves the prompt of {what} empty: add a piece that is always filled")
    return prompt


def _clean(value: object) -> str:
    """One-line text without trailing punctuation; "" for missing values ("None", "nan", ...)."""
    text = " ".join(str(value).split()).rstrip(" .;,")
    return "" if text.lower() in _MISSING else text


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _find(attributes: dict[str, str], keys: tuple[str, ...]) -> tuple[str | None, str]:
    """The first attribute among ``keys`` with text, as (original name, cleaned value)."""
    for name, value in attributes.items():
        if _key(name) in keys and _clean(value):
            return name, _clean(value)
    return None, ""


def _pairs(pairs: list[tuple[str, str]]) -> str:
    return "; ".join(f"{label} is {value}" for label, value in pairs)


def _item_fields(attributes: dict[str, str], token: str) -> dict[str, str]:
    title_name, title = _find(attributes, _TITLE_KEYS)
    feature_name, features = _find(attributes, _FEATURE_KEYS)
    description_name, description = _find(attributes, _DESCRIPTION_KEYS)
    used = {title_name, feature_name, description_name}
    rest = [(name, _clean(value)) for name, value in attributes.items() if name not in used and _clean(value)]
    rest = [(name, value) for name, value in rest if _key(name) not in _TITLE_KEYS + _FEATURE_KEYS + _DESCRIPTION_KEYS]
    order = {key: i for i, key in enumerate(_LEADING_KEYS)}
    rest.sort(key=lambda pair: order.get(_key(pair[0]), len(order)))  # stable: the rest keep their order
    listed = ([("name", title)] if title else []) + [(name.replace("_", " "), value) for name, value in rest]
    listed = listed or [("id", token)]  # never empty, so a real item never gets an empty prompt
    return {"title": title, "attributes": _pairs(listed), "features": features, "description": description}


def _short_title(attributes: dict[str, str], token: str, max_chars: int) -> str:
    """The item's name (with its year when known), else its first text attribute, else its token."""
    _, title = _find(attributes, _TITLE_KEYS)
    if not title:
        texts = [_clean(v) for n, v in attributes.items() if _key(n) not in _FEATURE_KEYS + _DESCRIPTION_KEYS]
        title = next((t for t in texts if t), "") or f"item {token}"
    year = _clean(attributes.get("year", ""))
    if year and year not in title:
        title = f"{title} ({year})"
    if len(title) > max_chars:
        title = title[:max_chars].rsplit(" ", 1)[0].rstrip(" .;,") + "..."
    return title


def item_prompts(dataset: Dataset, templates: PromptTemplates | None = None, *, task: bool = False) -> list[str]:
    """One prompt per item id: a list of length ``num_items + 1`` with ``""`` at index 0 (padding).

    An item without any attribute is listed as ``"id is <token>"``. ``task`` appends the item task (the
    instruction for an LLM; see the module doc).

    Raises:
        ValueError: the template leaves some item's prompt empty (every piece has an empty placeholder).
    """
    templates = templates or PromptTemplates()
    pieces = templates.item + (templates.item_task if task else ())
    prompts = [""]
    for item in range(1, dataset.num_items + 1):
        fields = _item_fields(dataset.item_attributes.get(item, {}), dataset.item_tokens[item])
        values = {"domain": _clean(dataset.domain), **fields}
        prompts.append(_render(pieces, values, f"item {item} ({dataset.item_tokens[item]!r})"))
    return prompts


def user_prompts(
    dataset: Dataset, templates: PromptTemplates | None = None, max_titles: int = 50, max_title_chars: int = 150
) -> list[str]:
    """One prompt per user id (``""`` at index 0), from demographics and *training* items only.

    Args:
        dataset: the preprocessed dataset; only ``dataset.train[u]`` is read, never validation or test items.
        templates: the templates (the paper-style defaults when None).
        max_titles: at most this many titles, the most recent training items, oldest first.
        max_title_chars: longer titles are cut at a word boundary and end in "...".

    Raises:
        ValueError: ``max_titles`` or ``max_title_chars`` below 1, or the template leaves a prompt empty.
    """
    if max_titles < 1:
        raise ValueError(f"max_titles must be >= 1, got {max_titles}")
    if max_title_chars < 1:
        raise ValueError(f"max_title_chars must be >= 1, got {max_title_chars}")
    templates = templates or PromptTemplates()
    titles = [""] + [
        _short_title(dataset.item_attributes.get(i, {}), dataset.item_tokens[i], max_title_chars)
        for i in range(1, dataset.num_items + 1)
    ]
    domain = _clean(dataset.domain)
    prompts = [""]
    for user in range(1, dataset.num_users + 1):
        pairs = []
        for name, value in dataset.user_attributes.get(user, {}).items():
            value = _clean(value)
            if _key(name) == "gender":
                value = _GENDERS.get(value.lower(), value)
            if value:
                pairs.append((name.replace("_", " "), value))
        recent = dataset.train[user][-max_titles:]
        values = {"domain": domain, "attributes": _pairs(pairs), "titles": "; ".join(titles[int(i)] for i in recent)}
        prompts.append(_render(templates.user, values, f"user {user} ({dataset.user_tokens[user]!r})"))
    return prompts
