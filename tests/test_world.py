"""Tests for the synthetic knowledge world (editlib.world)."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from editlib.records import Record, record_from_dict, record_to_dict
from editlib.world import (
    FILLERS,
    GENERIC_TEMPLATES,
    RELATIONS,
    Relation,
    background_facts,
    make_subjects,
    make_world,
    relation_by_id,
)

N = 2000
ALL_OBJECT_WORDS = {o.lower() for r in RELATIONS for o in r.objects}


@pytest.fixture(scope="module")
def world() -> list[Record]:
    return make_world(N, seed=0)


@pytest.fixture(scope="module")
def facts() -> dict[str, tuple[str, str]]:
    """Background subject -> (relation_id, object)."""
    return {s: (rid, obj) for s, rid, obj in background_facts(N, seed=0)}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _subjects_in(prompt: str, templates: tuple[str, ...]) -> set[str]:
    """Every subject ``s`` such that ``template.format(s) == prompt`` for some template."""
    found = set()
    for t in templates:
        head, tail = t.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
            found.add(prompt[len(head):len(prompt) - len(tail)])
    return found


# ---------------------------------------------------------------- static tables

def test_relation_tables() -> None:
    assert len(RELATIONS) >= 8
    ids = [r.relation_id for r in RELATIONS]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"P\d+", i) for i in ids)
    all_objects = [o for r in RELATIONS for o in r.objects]
    assert len({o.lower() for o in all_objects}) == len(all_objects)  # distinct, even across relations
    for r in RELATIONS:
        assert 4 <= len(r.templates) <= 6, r.relation_id
        assert 10 <= len(r.objects) <= 16, r.relation_id
        assert len(set(r.templates)) == len(r.templates)
        assert any(t.startswith("{}") for t in r.templates), r.relation_id
        assert any(not t.startswith("{}") for t in r.templates), r.relation_id
        for t in r.templates:
            assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1, t
            assert t == t.strip() and not t.endswith("{}") and t[-1].isalpha(), t
            assert not _words(t) & ALL_OBJECT_WORDS, t
        for o in r.objects:
            assert re.fullmatch(r"[A-Za-z]+", o), o


def test_fillers_and_generic_templates() -> None:
    assert len(FILLERS) >= 40 and len(set(FILLERS)) == len(FILLERS)
    for f in FILLERS:
        assert f.endswith(".") and "{" not in f and "}" not in f, f
        assert not _words(f) & ALL_OBJECT_WORDS, f
    for t in GENERIC_TEMPLATES:
        assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1, t
        assert not _words(t) & ALL_OBJECT_WORDS, t


def test_relation_by_id() -> None:
    assert relation_by_id("P19").objects == next(r for r in RELATIONS if r.relation_id == "P19").objects
    assert isinstance(relation_by_id(RELATIONS[0].relation_id), Relation)
    with pytest.raises(KeyError, match="P0000"):
        relation_by_id("P0000")


# ---------------------------------------------------------------- subjects

def test_make_subjects() -> None:
    names = make_subjects(5000, seed=3)
    assert names == make_subjects(5000, seed=3)
    assert names != make_subjects(5000, seed=4)
    assert len({n.lower() for n in names}) == len(names)
    for n in names:
        parts = n.split(" ")
        assert len(parts) == 2 and all(p[0].isupper() and p[1:].islower() and p.isalpha() for p in parts), n
        assert not set(n.lower().split()) & ALL_OBJECT_WORDS, n
    assert make_subjects(0, seed=0) == []
    with pytest.raises(ValueError):
        make_subjects(-1, seed=0)


# ---------------------------------------------------------------- world

def test_deterministic_and_seeded(world: list[Record]) -> None:
    assert make_world(N, seed=0) == world
    assert background_facts(N, seed=0) == background_facts(N, seed=0)
    other = make_world(N, seed=1)
    assert other != world
    assert [r.subject for r in other] != [r.subject for r in world]


def test_large_world() -> None:
    big = make_world(6000, seed=11)
    assert len(big) == 6000 and [r.case_id for r in big] == list(range(6000))
    subjects = [r.subject.lower() for r in big] + [s.lower() for s, _, _ in background_facts(6000, seed=11)]
    assert len(set(subjects)) == len(subjects)


def test_schema_round_trip(world: list[Record]) -> None:
    for r in world:
        assert record_from_dict(record_to_dict(r)) == r
        assert r.pararel_idx is None
    assert [r.case_id for r in world] == list(range(N))


def test_unique_subjects_across_world_and_background(world: list[Record], facts: dict) -> None:
    names = [r.subject.lower() for r in world] + [s.lower() for s in facts]
    assert len(set(names)) == len(names)
    assert len(facts) == len(background_facts(N, seed=0))  # no duplicate background subjects


def test_background_pool(world: list[Record]) -> None:
    bg = background_facts(N, seed=0)
    assert len(bg) >= 0.6 * N - 1
    cells = Counter((rid, obj) for _, rid, obj in bg)
    for rel in RELATIONS:
        for obj in rel.objects:
            assert cells[(rel.relation_id, obj)] >= 12, (rel.relation_id, obj)
    assert set(cells) == {(r.relation_id, o) for r in RELATIONS for o in r.objects}


def test_targets(world: list[Record]) -> None:
    for r in world:
        rel = relation_by_id(r.relation_id)
        assert r.target_true.str in rel.objects and r.target_new.str in rel.objects
        assert r.target_new.str != r.target_true.str
        assert r.target_true.id == f"{r.relation_id}:{r.target_true.str}"
        assert r.target_new.id == f"{r.relation_id}:{r.target_new.str}"
        assert r.prompt in rel.templates
        assert r.subject == r.subject.strip() and r.target_new.str == r.target_new.str.strip()
    # every object of every relation shows up both as a true and as a new target
    assert len({r.target_true.id for r in world}) == sum(len(rel.objects) for rel in RELATIONS)
    assert len({r.target_new.id for r in world}) == sum(len(rel.objects) for rel in RELATIONS)


def test_prompt_counts_and_braces(world: list[Record]) -> None:
    for r in world:
        assert len(r.paraphrase_prompts) == 2
        assert len(r.neighborhood_prompts) == 10
        assert len(r.attribute_prompts) == 10
        assert len(r.generation_prompts) == 10
        prompts = (*r.paraphrase_prompts, *r.neighborhood_prompts, *r.attribute_prompts,
                   *r.generation_prompts)
        assert all("{" not in p and "}" not in p and p == p.strip() for p in prompts)


def test_paraphrases(world: list[Record]) -> None:
    for r in world:
        rel = relation_by_id(r.relation_id)
        used = []
        for p in r.paraphrase_prompts:
            fillers = [f for f in FILLERS if p.startswith(f + " ")]
            assert len(fillers) == 1, p
            assert r.subject in p
            rest = p[len(fillers[0]) + 1:]
            templates = [t for t in rel.templates if t.format(r.subject) == rest]
            assert templates and r.prompt not in templates, p
            used.append(templates[0])
        assert len(set(used)) == 2


def _check_cell_prompts(prompts: tuple[str, ...], r: Record, obj: str, facts: dict) -> None:
    rel = relation_by_id(r.relation_id)
    seen = set()
    for p in prompts:
        candidates = {s for s in _subjects_in(p, rel.templates) if s in facts}
        assert candidates, f"case {r.case_id}: no background subject in {p!r}"
        subject = candidates.pop()
        assert facts[subject] == (r.relation_id, obj), (p, facts[subject])
        assert subject != r.subject
        seen.add(subject)
    assert len(seen) == len(prompts), f"case {r.case_id}: repeated subjects"


def test_neighborhood_prompts_ask_about_background_subjects(world: list[Record], facts: dict) -> None:
    for r in world:
        _check_cell_prompts(r.neighborhood_prompts, r, r.target_true.str, facts)


def test_attribute_prompts_ask_about_background_subjects(world: list[Record], facts: dict) -> None:
    for r in world:
        _check_cell_prompts(r.attribute_prompts, r, r.target_new.str, facts)


def test_no_record_subject_in_other_prompts(world: list[Record]) -> None:
    """Editing any batch never touches the subjects of neighbourhood/attribute prompts."""
    record_subjects = {r.subject for r in world}
    for r in world:
        rel = relation_by_id(r.relation_id)
        for p in (*r.neighborhood_prompts, *r.attribute_prompts):
            assert not _subjects_in(p, rel.templates) & record_subjects, p


def test_generation_prompts(world: list[Record]) -> None:
    for r in world:
        rel = relation_by_id(r.relation_id)
        filled_rel = {t.format(r.subject) for t in rel.templates}
        filled_generic = {t.format(r.subject) for t in GENERIC_TEMPLATES}
        assert all(p in filled_rel | filled_generic for p in r.generation_prompts)
        assert any(p in filled_rel for p in r.generation_prompts)
        assert any(p in filled_generic for p in r.generation_prompts)


def test_relations_balanced(world: list[Record]) -> None:
    counts = Counter(r.relation_id for r in world)
    assert set(counts) == {r.relation_id for r in RELATIONS}
    uniform = N / len(RELATIONS)
    for rid, c in counts.items():
        assert abs(c - uniform) <= 0.3 * uniform, (rid, c)


def test_small_and_empty_worlds() -> None:
    assert make_world(0, seed=0) == []
    small = make_world(3, seed=5)
    assert [r.case_id for r in small] == [0, 1, 2]
    assert len(background_facts(3, seed=5)) >= 12 * sum(len(r.objects) for r in RELATIONS)
    with pytest.raises(ValueError):
        make_world(-1)
