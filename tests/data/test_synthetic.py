"""The synthetic TOFU-like world: determinism, split layout, paraphrase/perturbation design, tokenizer, files."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_unlearn.data import synthetic
from lightning_unlearn.data.synthetic import (
    WorldConfig,
    build_tokenizer,
    generate_world,
    make_world,
    write_world,
)

SPLITS = (
    "full",
    "forget10",
    "retain90",
    "forget10_perturbed",
    "retain_perturbed",
    "world_facts",
    "world_facts_perturbed",
    "holdout10",
)


@pytest.fixture(scope="module")
def world() -> dict[str, list[dict]]:
    return generate_world(WorldConfig())


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def value_of(fact: str, text: str) -> str:
    """The single value of ``fact``'s pool in ``text`` (fails if there is not exactly one)."""
    found = [w for w in words(text) if w in synthetic.FACT_TYPES[fact]["values"]]
    assert len(found) == 1, (fact, text, found)
    return found[0]


def shape(record_text: str, author: str, fact: str) -> str:
    """The sentence with the author and the value replaced by placeholders: its template."""
    value = value_of(fact, record_text)
    return re.sub(rf"\b{value}\b", "{value}", record_text.replace(author, "{name}"))


def test_same_seed_same_world_and_different_seed_different_world(world):
    assert generate_world(WorldConfig()) == world
    other = generate_world(WorldConfig(seed=1))
    assert other.keys() == world.keys()
    for split in ("full", "forget10_perturbed", "holdout10", "world_facts_perturbed"):
        assert other[split] != world[split]


def test_split_names_and_sizes(world):
    assert tuple(world) == SPLITS
    sizes = {split: len(records) for split, records in world.items()}
    assert sizes == {
        "full": 40 * 10 + 50,
        "forget10": 40,
        "retain90": 36 * 10 + 50,
        "forget10_perturbed": 40,
        "retain_perturbed": 100,
        "world_facts": 50,
        "world_facts_perturbed": 50,
        "holdout10": 40,
    }


def test_split_names_follow_the_forget_percentage():
    small = generate_world(
        WorldConfig(n_authors=20, n_forget_authors=1, n_world_facts=5, n_eval_retain_authors=2)
    )
    assert {"forget05", "retain95", "forget05_perturbed", "holdout05"} <= small.keys()
    assert len(small["full"]) == 20 * 10 + 5
    assert len(small["retain_perturbed"]) == 20


@pytest.mark.parametrize(
    "config",
    [
        WorldConfig(n_forget_authors=3),  # 7.5 %
        WorldConfig(n_forget_authors=0),
        WorldConfig(n_forget_authors=40),
        WorldConfig(n_perturbed=12),  # more than the other values of the smallest pool
        WorldConfig(n_world_facts=1000),
        WorldConfig(n_eval_retain_authors=37),
    ],
)
def test_bad_config_raises_value_error(config):
    with pytest.raises(ValueError):
        generate_world(config)


def test_full_is_world_facts_then_retain_then_forget(world):
    full, retain, forget = world["full"], world["retain90"], world["forget10"]
    assert full == retain + forget
    assert full[-40:] == forget
    assert full[:50] == world["world_facts"]
    assert all(r["author"] == "world" for r in full[:50])
    assert all(r["author"] != "world" for r in full[50:])
    forget_authors = {r["author"] for r in forget}
    assert len(forget_authors) == 4
    assert forget_authors.isdisjoint(r["author"] for r in retain)
    for record in full:
        assert set(record) == {"question", "answer", "author", "fact"}


def test_authors_have_one_record_per_fact_and_unique_names(world):
    by_author: dict[str, list[str]] = {}
    for record in world["full"][50:] + world["holdout10"]:
        by_author.setdefault(record["author"], []).append(record["fact"])
    assert len(by_author) == 44
    assert all(facts == list(synthetic.FACT_TYPES) for facts in by_author.values())
    for name in by_author:
        first, last = name.split()
        assert first in synthetic.FIRST_NAMES and last in synthetic.SURNAMES
    holdout = {r["author"] for r in world["holdout10"]}
    assert len(holdout) == 4
    assert holdout.isdisjoint(r["author"] for r in world["full"])


def test_templates_are_short_and_values_never_occur_in_names_or_templates():
    """Else a perturbed sentence could hold the true value via its name or template; short answers ending in
    the value keep the one differing token from being diluted in the truth ratio."""
    template_words = {
        w
        for spec in synthetic.FACT_TYPES.values()
        for t in spec["questions"] + spec["answers"]
        for w in words(t)
    }
    name_words = set(synthetic.FIRST_NAMES) | set(synthetic.SURNAMES)
    assert name_words.isdisjoint(template_words)
    for spec in synthetic.FACT_TYPES.values():
        assert len(set(spec["values"])) == len(spec["values"])
        assert set(spec["values"]).isdisjoint(template_words | name_words)
        assert len(set(spec["questions"])) == 3 and len(set(spec["answers"])) == 3
        assert all(a.endswith(" {value}.") and len(words(a)) <= 9 for a in spec["answers"])
    questions = [q for spec in synthetic.FACT_TYPES.values() for q in spec["questions"]]
    assert len(set(questions)) == len(questions)


@pytest.mark.parametrize("split", ["forget10_perturbed", "retain_perturbed"])
def test_perturbed_records_are_the_paraphrase_with_wrong_values(world, split):
    records = world[split]
    training = {(r["author"], r["fact"]): r for r in world["full"]}
    for record in records:
        train = training[(record["author"], record["fact"])]
        assert (record["question"], record["answer"]) == (train["question"], train["answer"])
        fact, author = record["fact"], record["author"]
        true_value = value_of(fact, record["answer"])
        paraphrase = record["paraphrased_answer"]
        assert paraphrase != record["answer"]
        assert value_of(fact, paraphrase) == true_value
        assert author in paraphrase
        assert record["paraphrased_question"] != record["question"]
        assert author in record["paraphrased_question"]

        perturbed = record["perturbed_answer"]
        assert len(perturbed) == 5 and len(set(perturbed)) == 5
        wrong_values = [value_of(fact, p) for p in perturbed]
        assert true_value not in wrong_values
        for sentence, wrong in zip(perturbed, wrong_values, strict=True):
            assert true_value not in words(sentence)
            assert re.sub(rf"\b{wrong}\b", true_value, sentence) == paraphrase


def test_paraphrase_templates_occur_in_training_for_other_authors(world):
    """The paraphrase's sentence shape is familiar: only the fact tells it apart from the perturbations."""
    shapes: dict[tuple[str, str], set[str]] = {}
    for r in world["retain90"][50:]:
        shapes.setdefault((r["fact"], r["author"]), set()).add(shape(r["answer"], r["author"], r["fact"]))
    for record in world["forget10_perturbed"] + world["retain_perturbed"]:
        fact, author = record["fact"], record["author"]
        para = shape(record["paraphrased_answer"], author, fact)
        others = [a for (f, a), s in shapes.items() if f == fact and a != author and para in s]
        assert len(others) >= 5


def test_every_pool_value_occurs_in_retain_training(world):
    seen: dict[str, set[str]] = {fact: set() for fact in synthetic.FACT_TYPES}
    for r in world["retain90"][50:]:
        seen[r["fact"]].add(value_of(r["fact"], r["answer"]))
    for fact, spec in synthetic.FACT_TYPES.items():
        assert seen[fact] == set(spec["values"])


def test_world_facts_perturbed(world):
    perturbed = world["world_facts_perturbed"]
    assert [{k: r[k] for k in ("question", "answer")} for r in perturbed] == [
        {k: r[k] for k in ("question", "answer")} for r in world["world_facts"]
    ]
    assert len({r["question"] for r in perturbed}) == 50
    kinds = {r["fact"] for r in perturbed}
    assert len(kinds) >= 5
    for record in perturbed:
        wrong = record["perturbed_answer"]
        assert len(wrong) == 3 and len(set(wrong)) == 3
        assert record["answer"] not in wrong
        assert "paraphrased_answer" not in record
        same_kind = {a for _, a in synthetic.WORLD_FACTS[record["fact"]]}
        assert set(wrong) <= same_kind


def test_tokenizer_covers_every_record_without_unk(world, tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "<eos>", "<unk>")
    assert 200 < len(tokenizer) < 1000
    texts = synthetic._texts(world)
    assert len(texts) > 2000
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text  # word-level round trip, punctuation re-attached
    prompt = "Question: " + world["full"][60]["question"] + "\nAnswer: "
    assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"]
    assert tokenizer("Never SEEN zzz")["input_ids"][-1] == tokenizer.unk_token_id


def test_tokenizer_has_sorted_vocab_offsets_and_no_added_special_tokens(world, tokenizer):
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    assert ordered[:3] == ["<pad>", "<eos>", "<unk>"]
    assert ordered[3:] == sorted(ordered[3:])
    assert list(vocab.values()) and sorted(vocab.values()) == list(range(len(vocab)))
    text = "Question: Where was X born?\nAnswer: Velora."
    enc = tokenizer(text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "question" and tokens[-2:] == ["velora", "."]  # lowercased, no BOS / EOS added
    assert [text[a:b] for a, b in enc["offset_mapping"]][-2:] == ["Velora", "."]
    assert build_tokenizer(generate_world(WorldConfig())).get_vocab() == vocab


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_world_round_trips_and_is_atomic(world, tokenizer, tmp_path):
    target = tmp_path / "world"
    assert write_world(world, target) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no temporary directory left
    for split, records in world.items():
        assert read_jsonl(target / f"{split}.json") == records
    loaded = AutoTokenizer.from_pretrained(target / "tokenizer")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    for text in synthetic._texts(world)[::37]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    enc = loaded("Question: A?\nAnswer: B.", return_offsets_mapping=True)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])

    other = generate_world(WorldConfig(seed=3))
    write_world(other, target)  # replaces the existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]
    assert read_jsonl(target / "full.json") == other["full"]


def test_interrupted_write_leaves_nothing(world, tmp_path, monkeypatch):
    def fail(splits):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic, "build_tokenizer", fail)
    with pytest.raises(RuntimeError):
        write_world(world, tmp_path / "world")
    assert list(tmp_path.iterdir()) == []


def test_make_world_reuses_a_world_with_the_same_config(tmp_path, monkeypatch):
    config = WorldConfig(seed=5)
    target = make_world(tmp_path / "w", config)
    marker = json.loads((target / "world.json").read_text())
    assert marker["config"]["seed"] == 5
    assert read_jsonl(target / "forget10.json") == generate_world(config)["forget10"]

    calls = []
    real = synthetic.generate_world
    monkeypatch.setattr(synthetic, "generate_world", lambda c: calls.append(c) or real(c))
    assert make_world(tmp_path / "w", replace(config)) == target
    assert calls == []
    make_world(tmp_path / "w", replace(config, seed=6))
    assert [c.seed for c in calls] == [6]
    assert read_jsonl(target / "full.json") == real(replace(config, seed=6))["full"]
    (target / "world.json").unlink()  # an unmarked directory is regenerated, not trusted
    make_world(tmp_path / "w", config)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
