"""Identity terms: a word-pair lexicon of protected attributes and the swap rules of setting F.

Five categories, each a table of ``(word, word)`` pairs of the same grammatical form (singular noun with singular
noun, plural with plural, adjective with adjective) and of the same category:

- ``race_ethnicity``: white <-> black, whites <-> blacks, caucasian <-> african, european <-> asian, negro <->
  latino (the data set's own words include old and offensive ones), hispanic <-> arab, and their plurals;
- ``religion``: jew <-> christian, jews <-> christians, jewish <-> catholic, judaism <-> christianity,
  muslim <-> buddhist, islam <-> hinduism, islamic <-> protestant, synagogue <-> church, and plurals;
- ``nationality``: mexican <-> canadian, mexico <-> canada, africa <-> europe, israel <-> sweden, israeli <->
  swedish, chinese <-> irish, indian <-> italian, somali <-> norwegian, pakistani <-> danish, and plurals;
- ``sexual_orientation``: gay <-> straight, homosexual <-> heterosexual, lesbian <-> bisexual, and plurals;
- ``gender``: man <-> woman, male <-> female, boy <-> girl, and plurals.

**Mention.** A text *mentions an identity* when it contains, as a whole word (case-insensitive), any word of these
five tables (:func:`mentions_identity`). Pronouns are not mentions.

**Swap rules** (:func:`identity_swap_map`, :func:`identity_counterfactual`). Every word of a table is replaced by
its partner and the partner by the word (both ways; the first pair naming a word wins), case kept, by
:func:`~icp_lightning.core.counterfactuals.swap_words`. Gendered words beyond the table (he <-> she, his <-> her,
father <-> mother, ...) come from countergen's 131-pair male/female table (``countergen/data/converters/
gender.json``) when that package is installed: its one-word-to-one-word pairs are appended after the five tables.
A sentence's counterfactual swaps all of its identity words at once (``"Jews and blacks"`` -> ``"Christians and
whites"``); a sentence with no lexicon word is its own counterfactual and is left out of paired metrics.

The tables are small on purpose (a word must appear in forum text and have an unambiguous partner); they are the
setting's definition of the protected attribute, not a claim about the groups.

Example:
    >>> identity_counterfactual("The Jews and the blacks were there.", include_countergen=False)
    'The Christians and the whites were there.'
    >>> mentions_identity("He came home."), mentions_identity("A gay man came home.")
    (False, True)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from icp_lightning.core.counterfactuals import swap_map, swap_words

__all__ = [
    "IDENTITY_PAIRS",
    "countergen_gender_pairs",
    "delete_identity_words",
    "identity_counterfactual",
    "identity_swap_map",
    "identity_words",
    "mentions_identity",
]

#: Category -> word pairs (see the module docstring).
IDENTITY_PAIRS: dict[str, list[tuple[str, str]]] = {
    "race_ethnicity": [
        ("white", "black"), ("whites", "blacks"), ("caucasian", "african"), ("caucasians", "africans"),
        ("european", "asian"), ("europeans", "asians"), ("negro", "latino"), ("negroes", "latinos"),
        ("hispanic", "arab"), ("hispanics", "arabs"),
    ],
    "religion": [
        ("jew", "christian"), ("jews", "christians"), ("jewish", "catholic"), ("judaism", "christianity"),
        ("muslim", "buddhist"), ("muslims", "buddhists"), ("islam", "hinduism"), ("islamic", "protestant"),
        ("synagogue", "church"), ("synagogues", "churches"),
    ],
    "nationality": [
        ("mexican", "canadian"), ("mexicans", "canadians"), ("mexico", "canada"), ("africa", "europe"),
        ("israel", "sweden"), ("israeli", "swedish"), ("chinese", "irish"), ("indian", "italian"),
        ("indians", "italians"), ("somali", "norwegian"), ("somalis", "norwegians"), ("pakistani", "danish"),
    ],
    "sexual_orientation": [
        ("gay", "straight"), ("gays", "straights"), ("homosexual", "heterosexual"),
        ("homosexuals", "heterosexuals"), ("lesbian", "bisexual"), ("lesbians", "bisexuals"),
    ],
    "gender": [
        ("man", "woman"), ("men", "women"), ("male", "female"), ("males", "females"), ("boy", "girl"),
        ("boys", "girls"),
    ],
}  # fmt: skip


def identity_words() -> frozenset[str]:
    """Every word of :data:`IDENTITY_PAIRS` (lower case): the words whose presence makes a mention.

    Example:
        >>> {"jews", "gay", "women"} <= identity_words(), "he" in identity_words()
        (True, False)
    """
    return frozenset(w for pairs in IDENTITY_PAIRS.values() for pair in pairs for w in pair)


@lru_cache(maxsize=1)
def _mention_pattern() -> re.Pattern[str]:
    words = sorted(identity_words(), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def mentions_identity(text: str) -> bool:
    """Whether ``text`` contains a word of :data:`IDENTITY_PAIRS` as a whole word (case-insensitive).

    Example:
        >>> mentions_identity("Muslims pray."), mentions_identity("Muslimsky prays.")
        (True, False)
    """
    return _mention_pattern().search(text) is not None


def delete_identity_words(text: str) -> str:
    """``text`` with every identity word (:func:`mentions_identity`'s) removed and the spaces closed: the
    mention-vs-no-mention counterfactual (a swap only trades one identity word for another).

    Example:
        >>> delete_identity_words("The Jews and the blacks, again.")
        'The and the , again.'
    """
    return " ".join(_mention_pattern().sub("", text).split())


def countergen_gender_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The one-word male/female pairs of countergen's ``gender.json`` (``[]`` when countergen is missing).

    Args:
        path: the file; default: ``countergen/data/converters/gender.json`` of the installed package.

    Returns:
        ``(male, female)`` pairs, lower case, in the file's order; multi-word lists (the name lists) are left out.

    Example:
        >>> ("he", "she") in countergen_gender_pairs() or countergen_gender_pairs() == []
        True
    """
    if path is None:
        from icp_lightning.assets import MissingDataError, package_dir

        try:
            path = package_dir("countergen", "gender word pairs") / "data" / "converters" / "gender.json"
        except MissingDataError:
            return []
    table = json.loads(Path(path).read_text())
    pairs = []
    for entry in table["correspondances"]:
        male, female = entry.get("male", []), entry.get("female", [])
        if len(male) == 1 and len(female) == 1 and " " not in male[0] + female[0]:
            pairs.append((male[0].lower(), female[0].lower()))
    return pairs


@lru_cache(maxsize=2)
def identity_swap_map(include_countergen: bool = True) -> Mapping[str, str]:
    """``word -> partner`` for every identity word (both ways), plus countergen's gender pairs when asked for.

    Example:
        >>> m = identity_swap_map(include_countergen=False)
        >>> m["jews"], m["christians"], m["gay"]
        ('christians', 'jews', 'straight')
    """
    pairs = [pair for table in IDENTITY_PAIRS.values() for pair in table]
    if include_countergen:
        pairs += countergen_gender_pairs()
    return swap_map(pairs)


def identity_counterfactual(text: str, include_countergen: bool = True) -> str:
    """``text`` with every identity word swapped for its partner (see the module docstring).

    Example:
        >>> identity_counterfactual("Muslim women", include_countergen=False)
        'Buddhist men'
    """
    return swap_words(text, identity_swap_map(include_countergen))
