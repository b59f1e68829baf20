"""A seeded synthetic product dataset whose text and sequences both carry signal.

:func:`synthetic` builds a catalogue of products, each belonging to one latent topic (kitchenware,
fantasy novels, cycling gear, ...). The topic shows in every text attribute: titles are built from the
topic's brands, adjectives and nouns, categories name it, descriptions mention its uses and audience,
prices follow its range. So text embeddings of items cluster by topic.

Users have latent tastes (a mixture over one to three topics) and demographics (age, gender,
occupation) drawn partly from their main topic's audience. Histories follow learnable patterns:

* **topic persistence**: the next item usually stays in the current topic, else a new topic is drawn
  from the user's taste;
* **popularity skew**: within a topic, items are drawn by a heavy-tailed popularity;
* **series**: items can be parts of a series ("..., Book 2"); after part *k* a user usually takes part
  *k + 1* next;
* **companions**: every other item has a companion item in its topic (a pan and its lid), often next.

The same arguments always give the identical dataset. The topics' word lists (brands, nouns, price ranges,
audiences, ...) live in the package resource ``grasp/data/synthetic_topics.json``.
"""

from __future__ import annotations

import bisect
import json
from importlib import resources
from typing import NamedTuple

import numpy as np

from grasp.data.core import RawDataset

__all__ = ["synthetic", "SYNTHETIC_TOPICS"]


#: The word lists of the topics and users: a JSON resource of the package, next to this module.
TABLES_FILE = "synthetic_topics.json"


class _Topic(NamedTuple):
    category: str
    subcategories: tuple[str, ...]
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    brands: tuple[str, ...]
    price: tuple[float, float]
    uses: tuple[str, ...]
    audience: str
    ages: tuple[str, ...]
    female: float
    occupations: tuple[str, ...]
    series: str


def _tuples(value: object) -> object:
    """JSON lists as tuples (the tables are read-only)."""
    return tuple(value) if isinstance(value, list) else value


def _load_tables() -> dict[str, object]:
    """The word lists of :data:`TABLES_FILE`: the topics (each a :class:`_Topic`, in file order) and the
    shared ``ages``, ``occupations``, ``variants`` and ``praise``."""
    text = resources.files("grasp.data").joinpath(TABLES_FILE).read_text(encoding="utf-8")
    tables = {name: _tuples(value) for name, value in json.loads(text).items()}
    tables["topics"] = tuple(_Topic(**{k: _tuples(v) for k, v in topic.items()}) for topic in tables["topics"])
    return tables


_TABLES = _load_tables()
_TOPICS: tuple[_Topic, ...] = _TABLES["topics"]
#: Number of built-in topics (the largest ``num_topics``).
SYNTHETIC_TOPICS = len(_TOPICS)
_AGES: tuple[str, ...] = _TABLES["ages"]
_OCCUPATIONS: tuple[str, ...] = _TABLES["occupations"]
_VARIANTS: tuple[str, ...] = _TABLES["variants"]
_PRAISE: tuple[str, ...] = _TABLES["praise"]


class _Uniforms:
    """Uniform draws from a seeded generator, handed out one at a time from pre-drawn blocks."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.block: list[float] = []
        self.next = 0

    def __call__(self) -> float:
        if self.next == len(self.block):
            self.block = self.rng.random(8192).tolist()
            self.next = 0
        self.next += 1
        return self.block[self.next - 1]


def _pick(cumulative: list[float], u: float) -> int:
    """Index drawn from the weights whose running sums are ``cumulative``, for a uniform draw ``u``."""
    return min(bisect.bisect_right(cumulative, u * cumulative[-1]), len(cumulative) - 1)


def _one(options: tuple[str, ...], u: float) -> str:
    """One of ``options``, uniformly, for a uniform draw ``u``."""
    return options[min(int(u * len(options)), len(options) - 1)]


def _article(text: str) -> str:
    return "An" if text[0].lower() in "aeiou" else "A"


def synthetic(
    *,
    num_users: int = 2000,
    num_items: int = 1000,
    seed: int = 0,
    num_topics: int = SYNTHETIC_TOPICS,
    mean_length: float = 15.0,
    max_length: int = 200,
    topic_persistence: float = 0.8,
    series_fraction: float = 0.3,
    follow_series: float = 0.8,
    follow_companion: float = 0.3,
    name: str = "synthetic",
) -> RawDataset:
    """A seeded synthetic product dataset with informative item / user text and learnable histories.

    Args:
        num_users: number of users (every one gets at least 3 interactions).
        num_items: number of items, spread over the topics (at least 4 per topic).
        seed: random seed; the same arguments always give the identical dataset.
        num_topics: number of latent topics used, 1..``SYNTHETIC_TOPICS``.
        mean_length: mean history length (at least 3).
        max_length: longest history (at least 3; capped by ``num_items``).
        topic_persistence: probability that the next item stays in the current topic.
        series_fraction: fraction of items that belong to series of 2-4 parts.
        follow_series: probability that part *k + 1* of a series follows part *k*.
        follow_companion: probability that an item's companion follows it.
        name: dataset name.

    Returns:
        A :class:`RawDataset` (domain ``"product"``) with item attributes ``title``, ``brand``, ``price``,
        ``categories`` and ``description``, and user attributes ``age``, ``gender`` and ``occupation``.

    Raises:
        ValueError: an argument out of range (named in the message).
    """
    for argument, value, ok, requirement in (
        ("num_users", num_users, num_users >= 1, ">= 1"),
        ("num_topics", num_topics, 1 <= num_topics <= SYNTHETIC_TOPICS, f"in 1..{SYNTHETIC_TOPICS}"),
        ("num_items", num_items, num_items >= 4 * num_topics, f">= 4 * num_topics = {4 * num_topics}"),
        ("mean_length", mean_length, mean_length >= 3, ">= 3"),
        ("max_length", max_length, max_length >= 3, ">= 3"),
        ("topic_persistence", topic_persistence, 0 <= topic_persistence <= 1, "in [0, 1]"),
        ("series_fraction", series_fraction, 0 <= series_fraction <= 1, "in [0, 1]"),
        ("follow_series", follow_series, 0 <= follow_series <= 1, "in [0, 1]"),
        ("follow_companion", follow_companion, 0 <= follow_companion <= 1, "in [0, 1]"),
    ):
        if not ok:
            raise ValueError(f"{argument} must be {requirement}, got {value!r}")
    rng = np.random.default_rng(seed)
    uniform = _Uniforms(rng)
    topics = _TOPICS[:num_topics]
    item_width, user_width = len(str(num_items)), len(str(num_users))

    # ---- catalogue: items per topic, text, popularity, series and companions
    item_topic = np.sort(rng.permutation(num_items) % num_topics)
    item_attributes: dict[str, dict[str, str]] = {}
    item_tokens = [f"P{i + 1:0{item_width}d}" for i in range(num_items)]
    popularity = rng.lognormal(0.0, 1.2, num_items)
    next_part = [-1] * num_items
    companion = [-1] * num_items
    topic_items: list[list[int]] = []
    for t, topic in enumerate(topics):
        members = np.flatnonzero(item_topic == t).tolist()
        topic_items.append(members)
        combos = [(b, a, n) for b in topic.brands for a in topic.adjectives for n in topic.nouns]
        order = rng.permutation(len(combos))
        position = 0
        while position < len(members):
            length = int(rng.integers(2, 5)) if rng.random() < series_fraction else 1
            length = min(length, len(members) - position)
            brand, adjective, noun = combos[order[position % len(combos)]]
            variant = _VARIANTS[(position // len(combos)) % len(_VARIANTS)]
            base = f"{adjective} {noun}".title() if topic.series != "Book" else f"The {adjective} {noun}".title()
            low, high = topic.price
            price = float(np.exp(rng.uniform(np.log(low), np.log(high))))
            subcategory = topic.subcategories[topic.nouns.index(noun) % len(topic.subcategories)]
            use = topic.uses[int(rng.integers(len(topic.uses)))]
            for part in range(length):
                item = members[position + part]
                title = f"{brand} {base}{variant}"
                if length > 1:
                    title += f", {topic.series} {part + 1}"
                    popularity[item] *= 0.3 if part else 1.0
                    if part + 1 < length:
                        next_part[item] = members[position + part + 1]
                description = (
                    f"{_article(adjective)} {adjective} {noun} by {brand}, made for {use}. "
                    f"Loved by {topic.audience}. {_PRAISE[int(rng.integers(len(_PRAISE)))]}"
                )
                item_attributes[item_tokens[item]] = {
                    "title": title,
                    "brand": brand,
                    "price": f"${max(price * (1 + 0.1 * part), 1.0):.2f}",
                    "categories": f"{topic.category}, {subcategory}",
                    "description": description,
                }
            position += length
        for index, item in enumerate(members):
            other = members[int(rng.integers(len(members)))]
            if index % 2 == 0 and next_part[item] < 0 and other != item:
                companion[item] = other
    cumulative = [np.cumsum(popularity[members]).tolist() for members in topic_items]

    # ---- users: tastes, demographics, histories
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    user_attributes: dict[str, dict[str, str]] = {}
    longest = min(max_length, num_items)
    lengths = np.minimum(3 + rng.geometric(1.0 / (mean_length - 2.0), num_users) - 1, longest)
    starts = 1.6e9 + rng.uniform(0, 365 * 86400, num_users)
    for u in range(num_users):
        token = f"U{u + 1:0{user_width}d}"
        favourites = rng.choice(num_topics, size=min(int(rng.integers(1, 4)), num_topics), replace=False)
        taste = np.full(num_topics, 0.05 / num_topics)
        taste[favourites] += rng.dirichlet(np.ones(len(favourites)))
        taste_cumulative = np.cumsum(taste).tolist()
        main = topics[int(favourites[0])]
        user_attributes[token] = {
            "age": _one(main.ages if uniform() < 0.7 else _AGES, uniform()),
            "gender": "F" if uniform() < main.female else "M",
            "occupation": _one(main.occupations if uniform() < 0.6 else _OCCUPATIONS, uniform()),
        }
        seen: set[int] = set()
        history: list[int] = []
        topic = _pick(taste_cumulative, uniform())
        now = float(starts[u])
        for _ in range(int(lengths[u])):
            previous = history[-1] if history else -1
            choice = -1
            if previous >= 0 and next_part[previous] >= 0 and next_part[previous] not in seen:
                if uniform() < follow_series:
                    choice = next_part[previous]
            if choice < 0 and previous >= 0 and companion[previous] >= 0 and companion[previous] not in seen:
                if uniform() < follow_companion:
                    choice = companion[previous]
            if choice < 0:
                if uniform() >= topic_persistence:
                    topic = _pick(taste_cumulative, uniform())
                for _attempt in range(20):
                    candidate = topic_items[topic][_pick(cumulative[topic], uniform())]
                    if candidate not in seen:
                        choice = candidate
                        break
                    topic = topic if uniform() < 0.8 else _pick(taste_cumulative, uniform())
            if choice < 0:  # the user's topics are exhausted: any unseen item
                choice = next(i for i in (int(x) for x in rng.permutation(num_items)) if i not in seen)
            seen.add(choice)
            history.append(choice)
            now += 60.0 + float(-np.log(1.0 - uniform())) * 2 * 86400
            users.append(token)
            items.append(item_tokens[choice])
            times.append(float(int(now)))
    return RawDataset(
        name=name,
        users=np.array(users, dtype=object),
        items=np.array(items, dtype=object),
        timestamps=np.array(times, dtype=np.float64),
        item_attributes=item_attributes,
        user_attributes=user_attributes,
        domain="product",
    )
