"""A seeded synthetic product dataset whose text and sequences both carry signal (DESIGN.md section 6).

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

The same arguments always give the identical dataset.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np

from grasp.data.loaders import RawDataset

__all__ = ["synthetic", "SYNTHETIC_TOPICS"]


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


# fmt: off
_TOPICS = (
    _Topic("Home & Kitchen", ("Cookware", "Bakeware", "Cutlery"),
           ("skillet", "saucepan", "dutch oven", "baking sheet", "chef knife", "stock pot", "loaf pan", "wok"),
           ("nonstick", "cast-iron", "stainless steel", "ceramic", "enameled", "tri-ply"),
           ("Ironleaf", "CopperHen", "Saltbush", "Hearthwell"), (15, 150),
           ("searing and sauteing", "weeknight dinners", "slow braises", "holiday baking"), "home cooks",
           ("25-34", "35-44", "45-54"), 0.6, ("chef", "homemaker", "teacher"), "Set"),
    _Topic("Books", ("Fantasy", "Epic Fantasy", "Sword & Sorcery"),
           ("dragon", "crown", "sorcerer", "kingdom", "blade", "citadel", "oracle", "wyvern"),
           ("ember", "shattered", "silver", "forgotten", "storm-born", "hollow"),
           ("A. R. Vale", "M. K. Thorne", "Ilsa Marrow", "D. Quillon"), (6, 30),
           ("readers of epic quests", "long winter evenings", "fans of magic systems"), "fantasy readers",
           ("under 18", "18-24", "25-34"), 0.5, ("student", "writer", "programmer"), "Book"),
    _Topic("Books", ("Science Fiction", "Space Opera", "Cyberpunk"),
           ("starship", "colony", "android", "nebula", "protocol", "signal", "outpost", "singularity"),
           ("quantum", "derelict", "orbital", "neon", "infinite", "rogue"),
           ("K. Okafor", "L. Brandt", "Ravi Senn", "J. Castellan"), (7, 28),
           ("fans of hard science", "long flights", "readers who love first contact stories"), "sci-fi readers",
           ("18-24", "25-34", "35-44"), 0.35, ("engineer", "scientist", "programmer"), "Book"),
    _Topic("Sports & Outdoors", ("Camping", "Hiking", "Backpacking"),
           ("tent", "sleeping bag", "trekking poles", "headlamp", "daypack", "camp stove", "water filter",
            "hammock"),
           ("ultralight", "waterproof", "four-season", "packable", "rugged", "insulated"),
           ("Ridgeway", "Northpine", "Cairnline", "Summit Fox"), (20, 350),
           ("weekend backpacking", "alpine trails", "car camping", "thru-hikes"), "hikers and campers",
           ("18-24", "25-34", "35-44"), 0.4, ("engineer", "student", "healthcare"), "Gen"),
    _Topic("Sports & Outdoors", ("Cycling", "Bike Parts", "Bike Accessories"),
           ("bike helmet", "saddle", "bike light", "chain lube", "cycling jersey", "floor pump", "pedals",
            "bike lock"),
           ("aero", "carbon", "road", "gravel", "commuter", "clipless"),
           ("Velotrek", "Spokewise", "Cadenza", "Rolling Hare"), (10, 220),
           ("daily commutes", "long gravel rides", "criterium racing", "city cycling"), "cyclists",
           ("25-34", "35-44", "45-54"), 0.3, ("engineer", "lawyer", "executive"), "Mk"),
    _Topic("Sports & Outdoors", ("Yoga", "Fitness", "Strength Training"),
           ("yoga mat", "kettlebell", "resistance bands", "foam roller", "dumbbell set", "jump rope",
            "yoga block", "pull-up bar"),
           ("eco-friendly", "non-slip", "adjustable", "heavy-duty", "cushioned", "compact"),
           ("Lotusfield", "Ironrise", "Flowform", "Core & Co"), (8, 180),
           ("home workouts", "morning yoga", "strength training", "recovery days"), "fitness fans",
           ("18-24", "25-34", "35-44"), 0.65, ("healthcare", "student", "sales"), "Level"),
    _Topic("Video Games", ("Role-Playing Games", "Adventure Games", "Game Accessories"),
           ("quest", "legends", "chronicles", "saga", "dungeon", "arena", "frontier", "odyssey"),
           ("pixel", "mythic", "cursed", "galactic", "eternal", "shadow"),
           ("Nightforge", "Lumen Games", "Bitwyrm", "Arcadia Labs"), (20, 70),
           ("late-night co-op sessions", "completionists", "open-world exploration"), "gamers",
           ("under 18", "18-24", "25-34"), 0.3, ("student", "programmer", "artist"), "Chapter"),
    _Topic("Electronics", ("Headphones", "Speakers", "Home Audio"),
           ("headphones", "earbuds", "bookshelf speaker", "soundbar", "DAC", "turntable", "subwoofer",
            "portable speaker"),
           ("wireless", "noise-cancelling", "hi-fi", "bluetooth", "studio-grade", "open-back"),
           ("Sonara", "Decibel Fox", "Audiokeep", "Wavelet"), (30, 400),
           ("critical listening", "commutes", "home theater", "music production"), "audiophiles",
           ("18-24", "25-34", "35-44"), 0.35, ("artist", "programmer", "engineer"), "Gen"),
    _Topic("Camera & Photo", ("Lenses", "Tripods", "Camera Bags"),
           ("prime lens", "zoom lens", "tripod", "camera bag", "lens filter", "flash", "memory card",
            "gimbal"),
           ("mirrorless", "full-frame", "wide-angle", "weather-sealed", "telephoto", "fast"),
           ("Lumiq", "Aperture North", "Focalpoint", "Shutterly"), (25, 900),
           ("landscape photography", "street shooting", "wedding work", "wildlife"), "photographers",
           ("25-34", "35-44", "45-54"), 0.45, ("artist", "writer", "self-employed"), "Mark"),
    _Topic("Patio, Lawn & Garden", ("Gardening", "Seeds", "Garden Tools"),
           ("pruning shears", "raised bed", "seed kit", "watering can", "compost bin", "garden trowel",
            "hose reel", "planter"),
           ("heirloom", "organic", "galvanized", "self-watering", "ergonomic", "cedar"),
           ("Greenthumb", "Rootwise", "Fernhollow", "Bloomcraft"), (8, 160),
           ("vegetable gardens", "balcony herbs", "spring planting", "composting"), "gardeners",
           ("45-54", "55+", "35-44"), 0.6, ("retired", "homemaker", "teacher"), "Season"),
    _Topic("Baby", ("Nursery", "Feeding", "Strollers"),
           ("crib sheet", "baby monitor", "bottle set", "stroller", "swaddle", "high chair", "teether",
            "diaper bag"),
           ("organic cotton", "BPA-free", "hypoallergenic", "convertible", "gentle", "lightweight"),
           ("Little Wren", "Cradlecove", "Peapod", "Nestling"), (10, 300),
           ("newborns", "sleepless nights", "first foods", "daily walks"), "new parents",
           ("25-34", "35-44"), 0.7, ("healthcare", "teacher", "homemaker"), "Stage"),
    _Topic("Pet Supplies", ("Dogs", "Dog Toys", "Dog Food"),
           ("dog leash", "chew toy", "dog bed", "grain-free kibble", "dog harness", "treat pouch",
            "dog crate", "fetch ball"),
           ("durable", "orthopedic", "reflective", "grain-free", "no-pull", "squeaky"),
           ("Barkly", "Happy Paws", "Tailwind", "Kibble & Co"), (6, 120),
           ("energetic puppies", "senior dogs", "long walks", "training sessions"), "dog owners",
           ("25-34", "35-44", "45-54"), 0.55, ("sales", "self-employed", "healthcare"), "Size"),
    _Topic("Office Products", ("Office Supplies", "Notebooks", "Writing Instruments"),
           ("notebook", "fountain pen", "desk organizer", "stapler", "planner", "highlighters", "label maker",
            "whiteboard"),
           ("dotted", "refillable", "minimalist", "archival", "heavy-duty", "magnetic"),
           ("Inkwell", "Paperly", "Deskline", "Quillmark"), (4, 90),
           ("bullet journaling", "meeting notes", "home offices", "exam prep"), "office workers",
           ("25-34", "35-44", "45-54"), 0.55, ("executive", "clerical", "lawyer"), "Volume"),
    _Topic("Toys & Games", ("Board Games", "Puzzles", "Card Games"),
           ("board game", "jigsaw puzzle", "card game", "dice set", "strategy game", "party game",
            "expansion pack", "miniatures"),
           ("cooperative", "1000-piece", "deck-building", "family", "legacy", "tactical"),
           ("Meeple Forge", "Tabletop Owl", "Rollhaus", "Gamewright North"), (12, 80),
           ("game nights", "family weekends", "strategy fans", "two-player evenings"), "board gamers",
           ("18-24", "25-34", "35-44"), 0.45, ("programmer", "teacher", "student"), "Expansion"),
    _Topic("Beauty", ("Skin Care", "Face Serums", "Moisturizers"),
           ("face serum", "moisturizer", "cleanser", "sunscreen", "night cream", "toner", "eye cream",
            "face mask"),
           ("hydrating", "vitamin C", "fragrance-free", "retinol", "gentle", "mineral"),
           ("Dewbright", "Glowkind", "Pure Petal", "Skinsmith"), (9, 95),
           ("dry skin", "daily routines", "sensitive skin", "sun protection"), "skin-care enthusiasts",
           ("18-24", "25-34", "35-44"), 0.85, ("sales", "artist", "healthcare"), "Step"),
    _Topic("Tools & Home Improvement", ("Power Tools", "Hand Tools", "Workshop"),
           ("cordless drill", "impact driver", "circular saw", "socket set", "tape measure", "workbench",
            "orbital sander", "stud finder"),
           ("brushless", "20V", "heavy-duty", "compact", "magnetic", "contractor-grade"),
           ("Boltline", "Torqueman", "Grainger Oak", "Steelhand"), (15, 350),
           ("weekend projects", "deck building", "furniture making", "home repairs"), "DIYers",
           ("35-44", "45-54", "55+"), 0.2, ("tradesman", "engineer", "retired"), "Series"),
)
# fmt: on
#: Number of built-in topics (the largest ``num_topics``).
SYNTHETIC_TOPICS = len(_TOPICS)

_AGES = ("under 18", "18-24", "25-34", "35-44", "45-54", "55+")
_OCCUPATIONS = (
    "student", "teacher", "engineer", "programmer", "healthcare", "artist", "writer", "sales", "lawyer",
    "executive", "clerical", "homemaker", "retired", "self-employed", "tradesman", "scientist", "chef",
)  # fmt: skip
_VARIANTS = ("", " Pro", " Mini", " Plus", " Classic", " XL", " Lite", " Max")
_PRAISE = (
    "Built to last and easy to care for.",
    "A customer favourite with thousands of reviews.",
    "Backed by a two-year warranty.",
    "Thoughtfully designed and tested by experts.",
    "Great value for everyday use.",
)


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
