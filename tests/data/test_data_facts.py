"""The bundled fact tables and the seeded counterfactual generator."""

from __future__ import annotations

from collections import Counter

import pytest

from emsedit_fast.data import bundled_facts
from emsedit_fast.data import make_counterfacts
from emsedit_fast.data.facts import COUNTRY_RELATIONS
from emsedit_fast.data.facts import RELATIONS
from emsedit_fast.data.facts import TEMPLATES
from emsedit_fast.data.facts import VIA_AUTHOR
from emsedit_fast.data.facts import VIA_CITY
from emsedit_fast.data.facts import fill
from emsedit_fast.data.facts import load_tables
from emsedit_fast.data.facts import true_facts


@pytest.fixture(scope="module")
def split():
    return make_counterfacts(seed=0)


def test_tables_are_large_enough_and_correct_on_spot_checks():
    t = load_tables()
    assert len(t.countries) >= 60 and len(t.author) >= 40 and len(t.city_country) >= 40
    facts = true_facts()
    assert len(facts) >= 300
    assert {f.relation for f in facts} == set(RELATIONS)
    assert t.country_attrs["France"] == {"capital": "Paris", "official_language": "French", "currency": "Euro",
                                         "continent": "Europe"}
    assert t.country_attrs["Japan"]["currency"] == "yen"
    assert t.city_country["Munich"] == "Germany" and t.author["War and Peace"] == "Leo Tolstoy"
    assert "continent" not in t.country_attrs["Russia"]  # ambiguous facts are left out
    assert len(set((f.relation, f.subject) for f in facts)) == len(facts)


def test_deterministic_for_a_seed(split):
    again = make_counterfacts(seed=0)
    assert again.train == split.train and again.valid == split.valid and again.eval == split.eval
    other = make_counterfacts(seed=1)
    assert [r.target_new for r in other.train] != [r.target_new for r in split.train]
    assert bundled_facts("train") == split.train and bundled_facts("eval", seed=0) == split.eval
    assert bundled_facts("valid") == split.valid
    with pytest.raises(ValueError, match="split must be"):
        bundled_facts("test")


def test_one_record_per_fact_and_subject_disjoint(split):
    records = split.train + split.valid + split.eval
    assert len(records) + len(split.neighbours) == len(true_facts())  # every fact: edited once, or a neighbour
    assert len({r.case_id for r in records}) == len(records)
    subjects = {name: {r.subject for r in part} for name, part in (("train", split.train), ("valid", split.valid),
                                                                   ("eval", split.eval))}
    assert subjects["train"].isdisjoint(subjects["eval"]) and subjects["train"].isdisjoint(subjects["valid"])
    assert subjects["valid"].isdisjoint(subjects["eval"])
    assert len(split.eval) > 0.15 * len(records) and len(split.valid) > 0.1 * len(records)
    assert len(split.train) > 0.6 * len(records)
    # every relation is present in every split
    for part in (split.train, split.valid, split.eval):
        assert {r.case_id.split("/")[0] for r in part} == set(RELATIONS)
    # neighbourhood prompts only mention neighbour-only subjects, which no split edits
    pool = {(f.relation, f.subject) for f in split.neighbours}
    edited = {(r.case_id.split("/")[0], r.subject) for r in records}
    assert pool.isdisjoint(edited)
    for r in records:
        relation = r.case_id.split("/")[0]
        canonical = TEMPLATES[relation][0]
        allowed = {fill(canonical, f.subject) for f in split.neighbours if f.relation == relation}
        assert r.locality_prompts and set(r.locality_prompts) <= allowed


def test_no_locality_prompt_is_an_edited_prompt(split):
    """Protocol hygiene: a locality prompt must not be the edit or paraphrase prompt of any record a protocol edits
    (such a prompt is meant to change); and no validation record is in training."""
    from emsedit_fast.data.splits import locality_overlap

    records = split.train + split.valid + split.eval
    for part in (split.train, split.valid, split.eval):
        assert locality_overlap(part, records) == []
    assert {r.case_id for r in split.valid}.isdisjoint({r.case_id for r in split.train})
    assert {r.case_id for r in split.eval}.isdisjoint({r.case_id for r in split.train + split.valid})


def test_records_are_well_formed(split):
    t = load_tables()
    truth = {(f.relation, f.subject): f.object for f in true_facts()}
    objects = {}
    for f in true_facts():
        objects.setdefault(f.relation, set()).add(f.object)
    for r in split.train + split.valid + split.eval:
        relation = r.case_id.split("/")[0]
        assert r.kind == "counterfact" and r.metric_family == "margin"
        assert r.ground_truth == truth[(relation, r.subject)]
        assert r.target_new != r.ground_truth and r.target_new in objects[relation]
        assert r.subject in r.prompt  # verbatim, not capitalised
        assert len(r.rephrase_prompts) == len(TEMPLATES[relation]) - 1 and r.prompt not in r.rephrase_prompts
        assert all(r.subject.lower() in p.lower() for p in r.rephrase_prompts)
        assert 1 <= len(r.locality_prompts) <= 3 and r.target_new not in r.locality_answers
        assert r.generation_prompts
        for answer in (r.target_new, r.ground_truth, *r.locality_answers, *r.portability_answers):
            assert 1 <= len(answer.split()) <= 4
    # neighbours share the true object whenever the neighbour-only pool has such subjects
    for r in split.train + split.valid + split.eval:
        relation = r.case_id.split("/")[0]
        same = [f for f in split.neighbours if f.relation == relation and f.object == r.ground_truth]
        if same:
            assert r.locality_answers[0] == r.ground_truth, r.case_id
    assert t.city_country["Lyon"] == "France"


def test_portability_probes_follow_the_documented_rule(split):
    t = load_tables()
    records = split.train + split.eval
    with_probes = [r for r in records if r.portability_prompts]
    assert len(with_probes) > 0.75 * len(records)
    counts = Counter(r.case_id.split("/")[0] for r in with_probes)
    assert set(counts) == set(RELATIONS)
    for r in with_probes:
        relation = r.case_id.split("/")[0]
        assert len(r.portability_prompts) <= 3
        if relation in COUNTRY_RELATIONS:
            assert set(r.portability_answers) == {r.target_new}  # the edited object, reached through another hop
        elif relation == "city_country":
            new = t.country_attrs[r.target_new]
            old = t.country_attrs[r.ground_truth]
            for prompt, answer in zip(r.portability_prompts, r.portability_answers):
                rel = next(k for k, tpl in VIA_CITY.items() if prompt == tpl.replace("{c}", r.subject))
                assert answer == new[rel] != old.get(rel)
        else:
            assert r.portability_prompts == (VIA_AUTHOR.replace("{b}", r.subject),)
            assert r.portability_answers[0] == t.native_language[r.target_new]
            assert r.portability_answers[0] != t.native_language[r.ground_truth]


def test_eval_fraction_and_neighbour_count():
    small = make_counterfacts(seed=3, eval_fraction=0.45, valid_fraction=0.1, n_neighbours=1, max_portability=1)
    assert abs(len(small.eval) - len(small.train)) < 0.25 * (len(small.eval) + len(small.train))
    assert all(len(r.locality_prompts) == 1 and len(r.portability_prompts) <= 1
               for r in small.train + small.valid + small.eval)
    with pytest.raises(ValueError, match="eval_fraction"):
        make_counterfacts(eval_fraction=1.0)
    with pytest.raises(ValueError, match="eval_fraction \\+ valid_fraction"):
        make_counterfacts(eval_fraction=0.6, valid_fraction=0.5)
