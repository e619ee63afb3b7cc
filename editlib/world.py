"""A deterministic synthetic knowledge world, emitted as CounterFact-schema records.

Real CounterFact asks a pretrained model about real people. Here a small model is first
*trained* on made-up facts ("Velorin Quastad was born in Paris") and then edited, so the
world must be learnable and its prompts must measure what CounterFact measures (SPEC §6):

* ``prompt``/``subject``: the rewrite prompt (efficacy, ES);
* ``paraphrase_prompts``: an unrelated filler sentence followed by a *different* template of
  the same relation about the same subject (generalisation, PS), as in CounterFact;
* ``neighborhood_prompts``: the same relation about *other* subjects whose true object is
  ``target_true`` (specificity, NS: they must keep answering ``target_true`` after the edit);
* ``attribute_prompts``: other subjects whose true object is ``target_new``;
* ``generation_prompts``: short open prompts about the subject.

Neighbourhood and attribute subjects come from a separate pool of *background subjects*
that are never edited (see :func:`background_facts`), so editing any batch of records never
touches a subject that its own neighbourhood prompts ask about.

Relation ids are Wikidata-style: real property ids where one fits (P27, P19, P1412, P106,
P1303, P641, P462, P206), made-up ``P9xxx`` ids for the neutral relations without one.
Everything is derived from ``random.Random`` instances seeded by the caller; the global
random state is never used.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

from editlib.records import Record, Target

__all__ = [
    "FILLERS",
    "GENERIC_TEMPLATES",
    "RELATIONS",
    "Relation",
    "background_facts",
    "make_subjects",
    "make_world",
    "relation_by_id",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Relation:
    """One relation: templates with one "{}" for the subject, ending right before the object."""

    relation_id: str
    name: str
    templates: tuple[str, ...]
    objects: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "P27", "country of citizenship",
        (
            "{} is a citizen of",
            "{} holds a passport from",
            "The country of citizenship of {} is",
            "The nationality of {} is",
            "Officially, {} is a citizen of",
        ),
        ("France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil",
         "Canada", "Mexico", "Egypt", "Russia", "Sweden", "Norway", "Poland", "Greece"),
    ),
    Relation(
        "P19", "place of birth",
        (
            "{} was born in",
            "The birthplace of {} is",
            "{} is a native of",
            "{} came into the world in",
            "The city where {} was born is",
        ),
        ("Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Moscow", "Cairo",
         "Chicago", "Toronto", "Sydney", "Dublin", "Vienna", "Athens", "Lisbon", "Prague"),
    ),
    Relation(
        "P1412", "language spoken",
        (
            "{} speaks",
            "The native language of {} is",
            "The mother tongue of {} is",
            "{} grew up speaking",
            "{} writes books in",
        ),
        ("English", "French", "German", "Spanish", "Italian", "Russian", "Japanese", "Chinese",
         "Arabic", "Dutch", "Greek", "Polish", "Swedish", "Portuguese", "Hindi", "Turkish"),
    ),
    Relation(
        "P106", "occupation",
        # Objects start with a consonant so that templates ending in "a" stay grammatical.
        (
            "{} works as a",
            "The profession of {} is",
            "By trade, {} is a",
            "{} earns a living as a",
            "The occupation of {} is",
        ),
        ("teacher", "doctor", "lawyer", "farmer", "painter", "writer", "nurse", "pilot",
         "chef", "singer", "baker", "sailor", "soldier", "dancer", "journalist", "poet"),
    ),
    Relation(
        "P1303", "instrument",
        (
            "{} plays the",
            "The instrument played by {} is the",
            "{} performs on the",
            "On stage, {} plays the",
            "{} learned to play the",
        ),
        ("piano", "guitar", "violin", "drums", "flute", "trumpet", "cello", "harp",
         "saxophone", "clarinet", "banjo", "trombone", "harmonica", "organ"),
    ),
    Relation(
        "P641", "sport",
        (
            "{} competes professionally in",
            "The sport practised by {} is",
            "{} became famous for",
            "The favourite sport of {} is",
            "In sports, {} is best known for",
        ),
        ("football", "tennis", "basketball", "golf", "cricket", "hockey", "baseball", "rugby",
         "volleyball", "boxing", "swimming", "cycling", "skiing", "rowing"),
    ),
    Relation(
        "P462", "favourite colour",
        (
            "The favourite colour of {} is",
            "{} prefers the colour",
            "{} painted the front door",
            "Asked about colours, {} always picks",
            "The colour that {} loves most is",
        ),
        ("red", "blue", "green", "yellow", "orange", "purple", "pink", "brown",
         "black", "white", "grey", "silver", "gold"),
    ),
    Relation(
        "P9001", "pet animal",
        (
            "{} has a pet",
            "The pet that {} keeps is a",
            "{} takes care of a",
            "Every morning, {} feeds a",
            "At home, {} lives with a",
        ),
        ("dog", "cat", "rabbit", "parrot", "horse", "goat", "hamster", "turtle",
         "pony", "ferret", "canary", "lizard", "goldfish", "mouse"),
    ),
    Relation(
        "P206", "home river",
        (
            "{} lives on the banks of the",
            "The home river of {} is the",
            "{} grew up beside the",
            "Every summer, {} swims in the",
            "The river nearest to the house of {} is the",
        ),
        ("Nile", "Thames", "Danube", "Rhine", "Seine", "Amazon", "Volga", "Ganges",
         "Mississippi", "Tiber", "Elbe", "Loire", "Mekong", "Yukon"),
    ),
    Relation(
        "P9002", "favourite fruit",
        (
            "The favourite fruit of {} is",
            "{} likes the flavour of",
            "{} makes jam from",
            "At the market, {} always buys",
            "The fruit that {} eats every day is",
        ),
        ("banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum",
         "melon", "lime", "kiwi", "strawberry", "coconut", "papaya"),
    ),
)

#: Neutral made-up sentences prefixed to paraphrase prompts (CounterFact style). They
#: contain no object word of any relation, so they never hint at an answer.
FILLERS: tuple[str, ...] = (
    "The harbour was quiet that morning.",
    "A light rain fell over the hills.",
    "The old clock in the hall had stopped.",
    "Nobody remembered who had left the door open.",
    "The bus was late again on Tuesday.",
    "Snow covered the small village overnight.",
    "The library closed early for the holiday.",
    "A letter arrived without a stamp.",
    "The bakery on the corner smelled of bread.",
    "Someone had planted tulips along the fence.",
    "The meeting lasted longer than expected.",
    "A strong wind rattled the windows.",
    "The path through the forest was muddy.",
    "The lamp flickered and went out.",
    "Two boats drifted slowly across the bay.",
    "The market square was crowded at noon.",
    "A small bridge crossed the stream.",
    "The train stopped at every station.",
    "The garden needed watering after the heat.",
    "An old map hung on the kitchen wall.",
    "The students waited in the long corridor.",
    "Fog rolled in from the sea at dusk.",
    "The shop sold candles and soap.",
    "A kettle whistled somewhere upstairs.",
    "The roof had been repaired last autumn.",
    "Leaves piled up against the garden gate.",
    "The museum opened a new exhibition.",
    "A quiet street led down to the square.",
    "The festival was postponed by a week.",
    "The moon rose above the distant mountains.",
    "Someone was whistling a cheerful tune.",
    "The road was closed for repairs.",
    "A stack of newspapers lay by the door.",
    "The ferry left the pier on time.",
    "The evening air was cool and calm.",
    "The attic was full of dusty boxes.",
    "A bell rang in the distance.",
    "The ice on the pond had begun to melt.",
    "Lunch was served in the courtyard.",
    "The hotel lobby was almost empty.",
    "A new bench was placed in the park.",
    "The storm passed before midnight.",
    "The cafe had run out of sugar.",
    "Footsteps echoed in the empty hall.",
)

#: Open prompts about any subject, mixed into ``generation_prompts``.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "{} is known for",
    "{} is",
    "People who know {} say that",
    "The story of {} began when",
    "{} spends most days",
    "In an interview, {} said that",
    "The neighbours of {} describe",
    "{} once told a friend that",
)

#: Every neighbourhood/attribute cell (relation, object) gets at least this many background subjects.
MIN_BACKGROUND_PER_CELL = 12
BACKGROUND_FRACTION = 0.6
N_PARAPHRASE = 2
N_NEIGHBORHOOD = 10
N_ATTRIBUTE = 10
N_GENERATION = 10
MAX_RELATION_GENERATION = 6  # the rest of generation_prompts are generic templates

_RELATION_BY_ID: dict[str, Relation] = {r.relation_id: r for r in RELATIONS}
_OBJECT_WORDS: frozenset[str] = frozenset(o.lower() for r in RELATIONS for o in r.objects)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n",
           "p", "qu", "r", "s", "st", "t", "th", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_DIPHTHONGS = ("ai", "ei", "ou")
_CODAS = ("", "n", "r", "l", "s", "th", "m")
_SURNAME_ENDINGS = ("stad", "ven", "mar", "dor", "holm", "rick", "wyn", "berg",
                    "lund", "vik", "sen", "gard", "ley", "mond")


def relation_by_id(relation_id: str) -> Relation:
    """The relation with this id (raises KeyError naming the known ids)."""
    try:
        return _RELATION_BY_ID[relation_id]
    except KeyError:
        known = ", ".join(_RELATION_BY_ID)
        raise KeyError(f"unknown relation_id {relation_id!r}; known relations: {known}") from None


def _target(relation: Relation, obj: str) -> Target:
    return Target(str=obj, id=f"{relation.relation_id}:{obj}")


def _syllable(rng: random.Random) -> str:
    onset = rng.choice(_ONSETS)
    vowel = rng.choice(_DIPHTHONGS) if rng.random() < 0.2 else rng.choice(_VOWELS)
    if onset == "qu" and vowel.startswith("u"):  # no "quu"
        vowel = "a"
    return onset + vowel


def _made_up_name(rng: random.Random) -> str:
    first = "".join(_syllable(rng) for _ in range(rng.randint(2, 3))) + rng.choice(_CODAS)
    last = "".join(_syllable(rng) for _ in range(rng.randint(1, 2))) + rng.choice(_SURNAME_ENDINGS)
    return f"{first.capitalize()} {last.capitalize()}"


def make_subjects(n: int, seed: int) -> list[str]:
    """``n`` made-up, pronounceable two-word names, unique case-insensitively.

    Names are built from syllables so they carry no prior knowledge for a model; no part of
    a name is an object word of any relation. Deterministic in ``seed``.
    """
    if n < 0:
        raise ValueError(f"make_subjects: n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    names: list[str] = []
    while len(names) < n:
        name = _made_up_name(rng)
        key = name.lower()
        if key in seen or any(part in _OBJECT_WORDS for part in key.split()):
            continue
        seen.add(key)
        names.append(name)
    return names


def _balanced(items: Sequence[T], rng: random.Random) -> Iterator[T]:
    """Endless stream of ``items`` in freshly shuffled rounds, so counts differ by at most one."""
    pool = list(items)
    while True:
        rng.shuffle(pool)
        yield from pool


@dataclass(frozen=True)
class _World:
    records: tuple[Record, ...]
    background: tuple[tuple[str, str, str], ...]  # (subject, relation_id, object)


def _n_background(n_records: int) -> int:
    n_cells = sum(len(r.objects) for r in RELATIONS)
    return max(round(BACKGROUND_FRACTION * n_records), n_cells * MIN_BACKGROUND_PER_CELL)


def _fill(templates: Sequence[str], subjects: Sequence[str], rng: random.Random) -> tuple[str, ...]:
    """One prompt per subject, each with a template of the relation drawn at random."""
    return tuple(rng.choice(templates).format(s) for s in subjects)


@lru_cache(maxsize=8)
def _build(n_records: int, seed: int) -> _World:
    """The single builder behind :func:`make_world` and :func:`background_facts`."""
    if n_records < 0:
        raise ValueError(f"make_world: n_records must be >= 0, got {n_records}")
    rng = random.Random(seed)
    n_bg = _n_background(n_records)
    names = make_subjects(n_records + n_bg, seed)
    record_subjects, bg_subjects = names[:n_records], names[n_records:]

    # Background pool: every (relation, object) cell gets MIN_BACKGROUND_PER_CELL subjects,
    # the remainder is spread evenly over the cells.
    cells = [(rel, obj) for rel in RELATIONS for obj in rel.objects]
    assignment = cells * MIN_BACKGROUND_PER_CELL
    extra = _balanced(cells, rng)
    assignment += [next(extra) for _ in range(n_bg - len(assignment))]
    rng.shuffle(assignment)
    background = tuple((s, rel.relation_id, obj) for s, (rel, obj) in zip(bg_subjects, assignment))
    by_cell: dict[tuple[str, str], list[str]] = {}
    for s, rid, obj in background:
        by_cell.setdefault((rid, obj), []).append(s)

    relation_stream = _balanced(RELATIONS, rng)
    object_streams = {r.relation_id: _balanced(r.objects, rng) for r in RELATIONS}
    records = []
    for case_id, subject in enumerate(record_subjects):
        rel = next(relation_stream)
        true_obj = next(object_streams[rel.relation_id])
        new_obj = rng.choice([o for o in rel.objects if o != true_obj])
        prompt = rng.choice(rel.templates)
        other_templates = [t for t in rel.templates if t != prompt]
        paraphrases = tuple(
            f"{filler} {template.format(subject)}"
            for filler, template in zip(rng.sample(FILLERS, N_PARAPHRASE),
                                        rng.sample(other_templates, N_PARAPHRASE))
        )
        neighbours = rng.sample(by_cell[(rel.relation_id, true_obj)], N_NEIGHBORHOOD)
        attributes = rng.sample(by_cell[(rel.relation_id, new_obj)], N_ATTRIBUTE)
        n_rel_gen = min(len(rel.templates), MAX_RELATION_GENERATION)
        gen_templates = rng.sample(rel.templates, n_rel_gen) + rng.sample(
            GENERIC_TEMPLATES, N_GENERATION - n_rel_gen)
        rng.shuffle(gen_templates)
        records.append(Record(
            case_id=case_id,
            prompt=prompt,
            subject=subject,
            relation_id=rel.relation_id,
            target_true=_target(rel, true_obj),
            target_new=_target(rel, new_obj),
            paraphrase_prompts=paraphrases,
            neighborhood_prompts=_fill(rel.templates, neighbours, rng),
            attribute_prompts=_fill(rel.templates, attributes, rng),
            generation_prompts=tuple(t.format(subject) for t in gen_templates),
            pararel_idx=None,
        ))
    return _World(records=tuple(records), background=background)


def make_world(n_records: int = 2000, seed: int = 0) -> list[Record]:
    """``n_records`` CounterFact-schema records about distinct made-up subjects.

    Relations are dealt in shuffled rounds (equal shares up to one) and so are each
    relation's true objects. Same arguments give identical records; another seed gives
    another world. ``case_id`` runs 0..n_records-1.
    """
    return list(_build(n_records, seed).records)


def background_facts(n_records: int = 2000, seed: int = 0) -> list[tuple[str, str, str]]:
    """The never-edited background facts ``(subject, relation_id, object)`` behind
    :func:`make_world` with the same arguments: the subjects of its neighbourhood and
    attribute prompts, which a trainer must also teach for those prompts to be meaningful.
    """
    return list(_build(n_records, seed).background)

