"""The synonym lexicon that varies the corpus's training phrasings: its entries fit the
training phrasings and never change a side, and the swap is seeded and keeps capitals."""

from __future__ import annotations

import re

import numpy as np
import pytest

from inference_service.training.actions import ACTIONS, SUBJECTS
from inference_service.training.synonyms import SYNONYMS, swap_synonyms

SIDES = ("left", "right", "both")


def training_phrasings() -> list[str]:
    return [
        template.format(subject=subject, their=their).lower()
        for action in ACTIONS.values()
        for template in action.phrasings("train")
        for subject, their in SUBJECTS
    ]


def side_words(phrase: str) -> list[str]:
    # "left", "leftward", "left-hand": the side, in any form; "upright" is not one.
    return [
        side for word in re.findall(r"[a-z]+", phrase) for side in SIDES if word.startswith(side)
    ]


def test_every_key_occurs_in_a_training_phrasing():
    text = "\n".join(training_phrasings())
    missing = [key for key in SYNONYMS if not re.search(rf"\b{re.escape(key)}\b", text)]
    assert not missing


def test_alternatives_keep_the_sides_and_differ_from_the_key():
    bad = []
    for key, alternatives in SYNONYMS.items():
        if key != key.lower() or not 2 <= len(alternatives) <= 6:
            bad.append(key)
        if len(set(alternatives)) != len(alternatives) or key in alternatives:
            bad.append(key)
        bad += [a for a in alternatives if sorted(side_words(a)) != sorted(side_words(key))]
    assert not bad


def test_swap_is_seeded_matches_the_longest_phrase_and_keeps_capitals():
    text = "Bend forward and raise the left arm."
    assert swap_synonyms(text, np.random.default_rng(0), 0.0) == text
    first = swap_synonyms(text, np.random.default_rng(3), 1.0)
    assert first == swap_synonyms(text, np.random.default_rng(3), 1.0)
    # "bend forward" is a key of its own: swapped whole, never as "flex forward".
    head, rest = first.split(" and ")
    assert head[0].isupper() and head.lower() in SYNONYMS["bend forward"]
    assert rest.split(" the ")[0] in SYNONYMS["raise"] and rest.endswith(" the left arm.")
    draws = {swap_synonyms(text, np.random.default_rng(seed), 0.5) for seed in range(40)}
    assert text in draws and len(draws) > 5


def test_rate_outside_zero_to_one_is_refused():
    for rate in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            swap_synonyms("Raise the left arm.", np.random.default_rng(0), rate)
