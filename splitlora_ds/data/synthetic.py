"""A tiny E2E-like data-to-text set generated in code, so the demo needs no download.

Each example is {"prompt": meaning representation, "target": English sentence} plus one
key per E2E attribute (value or None when absent), so a later label-skew partitioner
can group by e.g. "eatType" without re-parsing the prompt.
"""

from __future__ import annotations

import random

from splitlora_ds.errors import ConfigError

NAMES = ["The Eagle", "The Mill", "Blue Spice", "Zizzi", "Aromi", "The Phoenix",
         "Cotto", "Fitzbillies", "The Wrestlers", "Giraffe", "Loch Fyne", "Alimentum"]
NEAR = ["Café Rouge", "Burger King", "The Bakers", "Raja Indian Cuisine",
        "Crowne Plaza Hotel", "Café Sicilia", "All Bar One", "Rainbow Vegetarian Café"]
VALUES: dict[str, list[str]] = {
    "eatType": ["pub", "restaurant", "coffee shop"],
    "food": ["French", "Italian", "Chinese", "Japanese", "English", "Indian", "Fast food"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["riverside", "city centre"],
    "familyFriendly": ["yes", "no"],
    "near": NEAR,
}
# Same order as the E2E MRs; name and eatType are always present (eatType is the
# natural class label for non-IID splits), the rest are a random non-empty subset.
ATTRIBUTES = ["name", "eatType", "food", "priceRange", "customer rating",
              "area", "familyFriendly", "near"]
OPTIONAL = ATTRIBUTES[2:]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _price(v: str) -> str:
    if v in ("cheap", "moderate", "high"):
        return {"cheap": "has cheap prices", "moderate": "has moderate prices",
                "high": "is expensive"}[v]
    return f"has prices {v}" if v[0] != "£" else f"has prices of {v}"


def _rating(v: str) -> str:
    return f"is rated {v}" if "out of" in v else f"has {_article(v)} {v} customer rating"


def _realise(a: dict[str, str | None], template: int) -> str:
    food = a["food"].lower() if a["food"] == "Fast food" else a["food"]
    noun = f"{food} {a['eatType']}" if food else a["eatType"]
    where = ""
    if a["area"]:
        where += " in the riverside area" if a["area"] == "riverside" else " in the city centre"
    if a["near"]:
        where += f" near {a['near']}"
    if template == 0:
        core = f"{a['name']} is {_article(noun)} {noun}{where}."
    elif template == 1:
        core = f"There is {_article(noun)} {noun} called {a['name']}{where}."
    else:
        core = f"{_article(noun).capitalize()} {noun}{where}, {a['name']}"
    details = []
    if a["priceRange"]:
        details.append(_price(a["priceRange"]))
    if a["customer rating"]:
        details.append(_rating(a["customer rating"]))
    if a["familyFriendly"]:
        details.append("is family friendly" if a["familyFriendly"] == "yes"
                       else "is not family friendly")
    if template == 2:
        # Template 2 folds the details into the sentence instead of a second one.
        if not details:
            return core + " is worth a visit."
        return core + " " + _join(details) + "."
    if not details:
        return core
    return core + " It " + _join(details) + "."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_data_to_text(n: int, seed: int) -> list[dict]:
    """`n` examples, identical for identical `seed` (own RNG; global state untouched)."""
    if n < 0:
        raise ConfigError(f"synthetic data: n must be >= 0, got {n}")
    rng = random.Random(f"synthetic-e2e:{seed}")
    out = []
    for _ in range(n):
        attrs: dict[str, str | None] = {k: None for k in ATTRIBUTES}
        attrs["name"] = rng.choice(NAMES)
        attrs["eatType"] = rng.choice(VALUES["eatType"])
        for key in rng.sample(OPTIONAL, rng.randint(1, 4)):
            attrs[key] = rng.choice(VALUES[key])
        prompt = ", ".join(f"{k}[{attrs[k]}]" for k in ATTRIBUTES if attrs[k] is not None)
        target = _realise(attrs, rng.randrange(3))
        out.append({"prompt": prompt, "target": target, **attrs})
    return out
