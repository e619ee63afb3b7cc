"""CounterFact records as typed, immutable objects (SPEC §6 "Record fields used").

The on-disk schema is the CounterFact one (Meng et al. 2022)::

    case_id, pararel_idx,
    requested_rewrite {prompt (one "{}"), subject, relation_id,
                       target_new {str, id}, target_true {str, id}},
    paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts

The synthetic world (:mod:`editlib.world`) produces records in the same schema, so
every other module sees one type: :class:`Record`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class RecordError(ValueError):
    """A record does not follow the CounterFact schema (the message names case_id and field)."""


@dataclass(frozen=True)
class Target:
    str: str
    id: str


@dataclass(frozen=True)
class Record:
    """One CounterFact case. Tuples, not lists, so records are hashable and immutable."""

    case_id: int
    prompt: str  # rewrite template with exactly one "{}" for the subject
    subject: str
    relation_id: str
    target_true: Target
    target_new: Target
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    pararel_idx: int | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)

    @property
    def rewrite_prompt(self) -> str:
        """The filled rewrite prompt, e.g. "Danielle Darrieux's mother tongue is"."""
        return self.prompt.format(self.subject)


_REQUIRED_PROMPT_LISTS = ("paraphrase_prompts", "neighborhood_prompts")
_OPTIONAL_PROMPT_LISTS = ("attribute_prompts", "generation_prompts")


def _fail(case_id: Any, fieldname: str, why: str) -> RecordError:
    return RecordError(f"CounterFact record case_id={case_id!r}: field '{fieldname}' {why}")


def _str_list(raw: Mapping, name: str, case_id: Any, required: bool) -> tuple[str, ...]:
    if name not in raw:
        if required:
            raise _fail(case_id, name, "is missing")
        return ()
    val = raw[name]
    if not isinstance(val, (list, tuple)) or not all(isinstance(s, str) for s in val):
        raise _fail(case_id, name, "must be a list of strings")
    if required and len(val) == 0:
        raise _fail(case_id, name, "is empty")
    return tuple(val)


def _target(rw: Mapping, name: str, case_id: Any) -> Target:
    t = rw.get(name)
    if not isinstance(t, Mapping):
        raise _fail(case_id, f"requested_rewrite.{name}", "is missing or not an object")
    s, i = t.get("str"), t.get("id")
    if not isinstance(s, str) or not s.strip():
        raise _fail(case_id, f"requested_rewrite.{name}.str", "is missing or empty")
    if i is None:
        raise _fail(case_id, f"requested_rewrite.{name}.id", "is missing")
    return Target(str=s, id=str(i))


def record_from_dict(raw: Mapping) -> Record:
    """Validate one raw CounterFact dict and build a :class:`Record` (raises :class:`RecordError`)."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"CounterFact record must be an object, got {type(raw).__name__}")
    case_id = raw.get("case_id")
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        raise _fail(case_id, "case_id", "is missing or not an integer")
    rw = raw.get("requested_rewrite")
    if not isinstance(rw, Mapping):
        raise _fail(case_id, "requested_rewrite", "is missing or not an object")
    prompt = rw.get("prompt")
    if not isinstance(prompt, str):
        raise _fail(case_id, "requested_rewrite.prompt", "is missing")
    if prompt.count("{}") != 1:
        raise _fail(case_id, "requested_rewrite.prompt",
                    f"must contain exactly one '{{}}', found {prompt.count('{}')}: {prompt!r}")
    subject = rw.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        raise _fail(case_id, "requested_rewrite.subject", "is missing or empty")
    relation_id = rw.get("relation_id")
    if not isinstance(relation_id, str) or not relation_id:
        raise _fail(case_id, "requested_rewrite.relation_id", "is missing")
    t_true = _target(rw, "target_true", case_id)
    t_new = _target(rw, "target_new", case_id)
    if t_true.str.strip() == t_new.str.strip():
        raise _fail(case_id, "requested_rewrite.target_new", "equals target_true")
    known = {"case_id", "pararel_idx", "requested_rewrite", *_REQUIRED_PROMPT_LISTS, *_OPTIONAL_PROMPT_LISTS}
    extra = tuple(sorted((k, v) for k, v in raw.items() if k not in known))
    pidx = raw.get("pararel_idx")
    return Record(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        relation_id=relation_id,
        target_true=t_true,
        target_new=t_new,
        paraphrase_prompts=_str_list(raw, "paraphrase_prompts", case_id, True),
        neighborhood_prompts=_str_list(raw, "neighborhood_prompts", case_id, True),
        attribute_prompts=_str_list(raw, "attribute_prompts", case_id, False),
        generation_prompts=_str_list(raw, "generation_prompts", case_id, False),
        pararel_idx=pidx if isinstance(pidx, int) else None,
        extra=extra,
    )


def record_to_dict(r: Record) -> dict:
    """Inverse of :func:`record_from_dict` (CounterFact schema)."""
    d: dict[str, Any] = {"case_id": r.case_id}
    if r.pararel_idx is not None:
        d["pararel_idx"] = r.pararel_idx
    d["requested_rewrite"] = {
        "prompt": r.prompt,
        "subject": r.subject,
        "relation_id": r.relation_id,
        "target_new": {"str": r.target_new.str, "id": r.target_new.id},
        "target_true": {"str": r.target_true.str, "id": r.target_true.id},
    }
    d["paraphrase_prompts"] = list(r.paraphrase_prompts)
    d["neighborhood_prompts"] = list(r.neighborhood_prompts)
    d["attribute_prompts"] = list(r.attribute_prompts)
    d["generation_prompts"] = list(r.generation_prompts)
    for k, v in r.extra:
        d[k] = v
    return d


def records_sha256(records: Sequence[Record]) -> str:
    """sha256 of the records' content (their CounterFact dicts as canonical JSON, in order): what a
    CounterFact miniature was trained on, checked when its case_ids are read from a file again."""
    text = json.dumps([record_to_dict(r) for r in records], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def records_from_dicts(raws: Sequence[Mapping]) -> list[Record]:
    """Validate all records first; nothing is returned half-loaded. Duplicate case_ids fail."""
    out = [record_from_dict(x) for x in raws]
    seen: set[int] = set()
    for r in out:
        if r.case_id in seen:
            raise _fail(r.case_id, "case_id", "is duplicated")
        seen.add(r.case_id)
    return out
