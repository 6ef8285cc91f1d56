"""A small bundled fact set and a seeded generator of counterfactual edits over it.

The tables under `emsedit_fast/data/facts/*.tsv` were written by hand for this project (no downloaded data): about 75
countries (capital, official language, currency, continent), 75 non-capital cities (country) and 73 books (author),
plus each author's native language for two-hop probes. Empty cells mark facts left out as ambiguous (several
official languages, transcontinental countries). Together they give 437 true facts over six relations.

`make_counterfacts` turns every fact (relation r, subject s, true object o) into one CounterFact-style record of kind
"counterfact" (scored by the new-vs-old margin, docs/method.md, Evaluation):

- target_new o': another object of the same relation, drawn uniformly from the relation's other values; ground_truth o.
- prompt: one of the relation's templates; rephrase_prompts: the other templates (3 per relation). The edit prompt
  contains the subject verbatim (templates that would capitalise "the Netherlands" are not used for it).
- locality (neighbourhood) prompts: up to `n_neighbours` subjects of the same relation from the *neighbour-only*
  pool, preferring those whose true object is o (as CounterFact does), never one whose object is o'; the answers are
  their true objects, which must not change. Neighbour-only subjects are never edited by any split, so no locality
  prompt is the edit or paraphrase prompt of a record that some protocol edits.
- portability (two-hop) prompts compose the edited fact with one unedited fact of the tables. The answer is the one
  the tables give once the edit has replaced o by o'; probes whose answer would be the same without the edit are left
  out, because they cannot tell an edited model from an unedited one:
    * country relation r(X) := o': "The r of the country where <city of X> is located is" -> o', and for r != capital
      "The r of the country whose capital is <capital of X> is" -> o';
    * city_country(c) := X': "The r2 of the country where c is located is" -> r2(X') for r2 in capital, official
      language, currency, continent, where r2(X') is known and differs from r2(X);
    * author(b) := a': "The native language of the author of b is" -> native language of a', when it differs from
      that of the true author.
- generation_prompts: one free-generation prompt per record (fluency).

Neighbour-only subjects: a share of the countries (with their cities) and of the authors (with their books), plus one
city of every other country that has several and one book of every other author who has several (so that edited
cities and books have neighbours with the same true object). The remaining facts are split by subject group: a
country together with its remaining cities, and an author together with their remaining books, go wholly to train,
valid or eval, so no subject (and no two-hop subject) appears in two splits.
Everything is deterministic for a seed: the split uses random.Random(seed), and each record its own
random.Random(f"{seed}/{case_id}"), so a record does not change when other records are added.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

from emsedit_fast.data.schemas import EditRecord

logger = logging.getLogger(__name__)

COUNTRY_RELATIONS = ("capital", "official_language", "currency", "continent")
RELATIONS = COUNTRY_RELATIONS + ("city_country", "author")

# Templates use {s} for the subject. The first is canonical (neighbourhood prompts use it). A template that starts
# with {s} capitalises the subject's first letter. They were chosen among several phrasings for how often
# SmolLM2-135M-Instruct completes them with the true object (teacher-forced top-1), so that edits overwrite facts the
# model knows; about half of the true facts are completed correctly token by token.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {s} is",
        "The capital city of {s} is",
        "The capital of {s} is the city of",
        "{s} is a country whose capital is",
    ),
    "official_language": (
        "The official language of {s} is",
        "In {s}, the official language is",
        "The main language of {s} is",
        "The national language of {s} is",
    ),
    "currency": (
        "The currency of {s} is the",
        "The official currency of {s} is the",
        "In {s}, the currency is the",
        "The currency used in {s} is the",
    ),
    "continent": (
        "{s} is located in the continent of",
        "{s} lies on the continent of",
        "{s} is a country on the continent of",
        "The continent that {s} is part of is",
    ),
    "city_country": (
        "{s} is located in the country of",
        "The country where {s} is located is",
        "{s} is a city in the country of",
        "{s} belongs to the country of",
    ),
    "author": (
        "{s} was written by",
        "The book {s} was written by",
        "{s} is a famous work by",
        "The author of {s} is",
    ),
}

GENERATION_TEMPLATES: dict[str, str] = {
    "capital": "When you visit the capital of {s}, you",
    "official_language": "In {s}, people usually speak",
    "currency": "When shopping in {s}, you pay with",
    "continent": "{s} is a country that",
    "city_country": "The city of {s} is famous for",
    "author": "{s} is a book that",
}

# Two-hop templates. {c}: a city; {k}: a capital; {b}: a book.
VIA_CITY: dict[str, str] = {
    "capital": "The capital of the country where {c} is located is",
    "official_language": "The official language of the country where {c} is located is",
    "currency": "The currency of the country where {c} is located is the",
    "continent": "The country where {c} is located is on the continent of",
}
VIA_CAPITAL: dict[str, str] = {
    "official_language": "The official language of the country whose capital is {k} is",
    "currency": "The currency of the country whose capital is {k} is the",
    "continent": "The country whose capital is {k} is on the continent of",
}
VIA_AUTHOR = "The native language of the author of {b} is"


@dataclass(frozen=True)
class Fact:
    """One true fact of the bundled tables: relation(subject) = object."""

    relation: str
    subject: str
    object: str


@dataclass(frozen=True)
class FactTables:
    """The bundled tables. Missing (ambiguous) cells are absent from the dicts."""

    countries: tuple[str, ...]
    country_attrs: dict[str, dict[str, str]]  # country -> {relation: object}
    city_country: dict[str, str]
    author: dict[str, str]  # book -> author
    native_language: dict[str, str]  # author -> language


@dataclass(frozen=True)
class FactSplit:
    """Subject-disjoint train, valid and eval records from `make_counterfacts`, and the neighbour-only facts their
    locality prompts are drawn from."""

    train: list[EditRecord]
    valid: list[EditRecord]
    eval: list[EditRecord]
    neighbours: tuple[Fact, ...]
    seed: int


def _read_tsv(name: str) -> list[list[str]]:
    """Rows of a bundled TSV (header and '#' comment lines removed); cells stripped, '' where empty."""
    text = resources.files("emsedit_fast.data").joinpath("facts").joinpath(name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != len(header):
            raise ValueError(f"bundled facts/{name}: row {line!r} has {len(cells)} cells, expected {len(header)}")
        rows.append(cells)
    return rows


@functools.lru_cache(maxsize=1)
def load_tables() -> FactTables:
    """Read the bundled TSV tables (cached)."""
    countries, attrs = [], {}
    for name, *values in _read_tsv("countries.tsv"):
        countries.append(name)
        attrs[name] = {rel: v for rel, v in zip(COUNTRY_RELATIONS, values) if v}
    city_country = dict(_read_tsv("cities.tsv"))
    author = dict(_read_tsv("books.tsv"))
    native = dict(_read_tsv("authors.tsv"))
    unknown = sorted(set(city_country.values()) - set(attrs)) + sorted(set(author.values()) - set(native))
    if unknown:
        raise ValueError(f"bundled facts: cities or books refer to unknown countries or authors: {unknown}")
    return FactTables(tuple(countries), attrs, city_country, author, native)


def true_facts() -> list[Fact]:
    """Every true fact of the bundled tables, in table order (countries, cities, books)."""
    t = load_tables()
    facts = [Fact(rel, c, t.country_attrs[c][rel]) for c in t.countries for rel in COUNTRY_RELATIONS
             if rel in t.country_attrs[c]]
    facts += [Fact("city_country", city, country) for city, country in t.city_country.items()]
    facts += [Fact("author", book, a) for book, a in t.author.items()]
    return facts


def fill(template: str, subject: str) -> str:
    """Put `subject` into `template` ({s}); capitalise it at the start of the sentence."""
    text = template.replace("{s}", subject)
    return text[0].upper() + text[1:]


def _relation_objects(facts: Sequence[Fact]) -> dict[str, list[str]]:
    objects: dict[str, set[str]] = {}
    for f in facts:
        objects.setdefault(f.relation, set()).add(f.object)
    return {rel: sorted(values) for rel, values in objects.items()}


def _portability(fact: Fact, new: str, t: FactTables, max_probes: int) -> list[tuple[str, str]]:
    """Two-hop (prompt, answer) pairs consistent with the edit fact.relation(fact.subject) := new (module docstring)."""
    probes: list[tuple[str, str]] = []
    if fact.relation in COUNTRY_RELATIONS:
        capital = t.country_attrs[fact.subject].get("capital")
        if fact.relation in VIA_CAPITAL and capital:
            probes.append((VIA_CAPITAL[fact.relation].replace("{k}", capital), new))
        for city in sorted(c for c, country in t.city_country.items() if country == fact.subject):
            probes.append((VIA_CITY[fact.relation].replace("{c}", city), new))
    elif fact.relation == "city_country":
        before, after = t.country_attrs[fact.object], t.country_attrs[new]
        for rel in COUNTRY_RELATIONS:
            if rel in after and after[rel] != before.get(rel):
                probes.append((VIA_CITY[rel].replace("{c}", fact.subject), after[rel]))
    elif fact.relation == "author":
        lang_new, lang_old = t.native_language[new], t.native_language[fact.object]
        if lang_new != lang_old:
            probes.append((VIA_AUTHOR.replace("{b}", fact.subject), lang_new))
    return probes[:max_probes]


def _make_record(fact: Fact, seed: int, objects: dict[str, list[str]], pool: dict[str, list[Fact]],
                 t: FactTables, n_neighbours: int, max_portability: int) -> EditRecord:
    case_id = f"{fact.relation}/{fact.subject}"
    # A per-record generator seeded by a string (hashed with SHA-512 by `random`, independent of PYTHONHASHSEED).
    rng = random.Random(f"{seed}/{case_id}")
    new = rng.choice([o for o in objects[fact.relation] if o != fact.object])
    templates = list(TEMPLATES[fact.relation])
    rng.shuffle(templates)
    # The edit prompt must contain the subject verbatim: skip templates that would capitalise "the ...".
    verbatim = [tpl for tpl in templates if fact.subject in fill(tpl, fact.subject)]
    edit_template = verbatim[0]
    rephrases = [fill(tpl, fact.subject) for tpl in templates if tpl != edit_template]

    others = [f for f in pool.get(fact.relation, []) if f.subject != fact.subject and f.object != new]
    rng.shuffle(others)
    # Stable sort: subjects sharing the true object first (CounterFact neighbourhood), then the rest of the relation.
    others.sort(key=lambda f: f.object != fact.object)
    neighbours = others[:n_neighbours]
    canonical = TEMPLATES[fact.relation][0]
    probes = _portability(fact, new, t, max_portability)
    return EditRecord(
        case_id=case_id,
        kind="counterfact",
        prompt=fill(edit_template, fact.subject),
        target_new=new,
        ground_truth=fact.object,
        subject=fact.subject,
        rephrase_prompts=tuple(rephrases),
        locality_prompts=tuple(fill(canonical, f.subject) for f in neighbours),
        locality_answers=tuple(f.object for f in neighbours),
        portability_prompts=tuple(p for p, _ in probes),
        portability_answers=tuple(a for _, a in probes),
        generation_prompts=(fill(GENERATION_TEMPLATES[fact.relation], fact.subject),),
    )


def _group_of(fact: Fact, t: FactTables) -> str:
    """Split unit: a country with its cities, or an author with their books."""
    if fact.relation in COUNTRY_RELATIONS:
        return f"country/{fact.subject}"
    if fact.relation == "city_country":
        return f"country/{fact.object}"
    return f"author/{fact.object}"


def _neighbour_only(facts: list[Fact], t: FactTables, rng: random.Random, fraction: float) -> set[tuple[str, str]]:
    """(relation, subject) of the facts no split edits (module docstring): whole groups, plus one city / book of every
    other group with several."""
    groups: dict[str, list[Fact]] = {}
    for f in facts:
        groups.setdefault(_group_of(f, t), []).append(f)
    reserved: set[tuple[str, str]] = set()
    for kind in ("country", "author"):
        names = sorted(g for g in groups if g.startswith(kind + "/"))
        rng.shuffle(names)
        whole = set(names[:max(1, round(fraction * len(names)))] if fraction > 0 else [])
        for g in sorted(groups):
            if not g.startswith(kind + "/"):
                continue
            members = groups[g]
            if g in whole:
                reserved.update((f.relation, f.subject) for f in members)
                continue
            leaves = sorted(f.subject for f in members if f.relation in ("city_country", "author"))
            if len(leaves) >= 2:  # keep one city / book of this country / author as a same-object neighbour
                relation = "city_country" if kind == "country" else "author"
                reserved.add((relation, rng.choice(leaves)))
    return reserved


def make_counterfacts(seed: int = 0, eval_fraction: float = 0.2, valid_fraction: float = 0.15,
                      neighbour_fraction: float = 0.15, n_neighbours: int = 3, max_portability: int = 3) -> FactSplit:
    """Counterfactual edit records over the bundled facts: train, valid and eval by subject group, with locality
    prompts from a neighbour-only pool that no split edits (module docstring).

    seed: drives the pool, the split, the new objects, the template order and the neighbours. eval_fraction,
    valid_fraction: shares of the editable country groups and of the author groups held out (rounded, at least one of
    each when > 0). neighbour_fraction: share of the country and author groups that are neighbour-only as a whole.
    n_neighbours: locality prompts per record. max_portability: two-hop probes per record. Records are in table order
    within each split.
    """
    for name, value in (("eval_fraction", eval_fraction), ("valid_fraction", valid_fraction),
                        ("neighbour_fraction", neighbour_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"make_counterfacts: {name} must lie in [0, 1), got {value}")
    if eval_fraction + valid_fraction >= 1.0:
        raise ValueError(f"make_counterfacts: eval_fraction + valid_fraction must be < 1, got "
                         f"{eval_fraction} + {valid_fraction}")
    t = load_tables()
    facts = true_facts()
    objects = _relation_objects(facts)
    rng = random.Random(seed)
    reserved = _neighbour_only(facts, t, rng, neighbour_fraction)
    pool: dict[str, list[Fact]] = {}
    for f in facts:
        if (f.relation, f.subject) in reserved:
            pool.setdefault(f.relation, []).append(f)
    editable = [f for f in facts if (f.relation, f.subject) not in reserved]
    which: dict[str, str] = {}
    for kind in ("country", "author"):
        groups = sorted({g for g in (_group_of(f, t) for f in editable) if g.startswith(kind + "/")})
        rng.shuffle(groups)
        n_eval = max(1, round(eval_fraction * len(groups))) if eval_fraction > 0 else 0
        n_valid = max(1, round(valid_fraction * len(groups))) if valid_fraction > 0 else 0
        for i, g in enumerate(groups):
            which[g] = "eval" if i < n_eval else "valid" if i < n_eval + n_valid else "train"
    out: dict[str, list[EditRecord]] = {"train": [], "valid": [], "eval": []}
    for f in editable:
        out[which[_group_of(f, t)]].append(_make_record(f, seed, objects, pool, t, n_neighbours, max_portability))
    logger.info("bundled facts (seed %d): %d train, %d valid and %d eval records; %d neighbour-only facts", seed,
                len(out["train"]), len(out["valid"]), len(out["eval"]), sum(len(v) for v in pool.values()))
    return FactSplit(train=out["train"], valid=out["valid"], eval=out["eval"],
                     neighbours=tuple(f for f in facts if (f.relation, f.subject) in reserved), seed=seed)


@functools.lru_cache(maxsize=8)
def _cached(seed: int) -> FactSplit:
    return make_counterfacts(seed=seed)


def bundled_facts(split: str = "train", seed: int = 0) -> list[EditRecord]:
    """The bundled counterfactual records of one split ("train", "valid" or "eval") with default settings."""
    if split not in ("train", "valid", "eval"):
        raise ValueError(f"bundled_facts: split must be 'train', 'valid' or 'eval', got {split!r}")
    return list(getattr(_cached(seed), split))
