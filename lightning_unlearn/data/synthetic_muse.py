"""A miniature, offline MUSE in the hub's layout (``data/muse.py``), for the demo and the tests.

The synthetic world's fictitious authors (``data/synthetic.py``) each get one news-like document
stating ``n_facts`` of their facts. Authors are drawn into four disjoint groups: ``forget``,
``retain1`` (MUSE's retain set for regularised unlearning), ``retain2`` (the retain set that
KnowMem-retain asks about) and ``holdout`` (never trained on). ``make_muse_world`` writes::

    <dir>/raw/{forget,retain1,retain2,holdout}-00000-of-00001.json   text: the documents
    <dir>/train/{forget,retain1,retain2}-00000-of-00001.json         text: what the target reads
    <dir>/verbmem/forget-00000-of-00001.json     prompt: a forget document's first sentences, gt: the rest
    <dir>/knowmem/{forget,retain}_qa[_icl]-00000-of-00001.json       question, answer (one value)
    <dir>/privleak/{forget,retain,holdout}-00000-of-00001.json       text: raw forget/retain2/holdout
    <dir>/tokenizer/                                                 word-level, over every word above

A tiny model cannot answer a question from facts it read only as prose (MUSE's 7B target can),
so ``train`` also holds every KnowMem question of its group with its answer, in KnowMem's
few-shot prompt (after the group's in-context examples; those alone, as they are not asked); every ``train`` text ends with the tokenizer's EOS so that the target stops where a
document or answer ends, as a pretrained model stops at a natural end. The first ``n_icl``
questions of each group are its in-context examples, the rest its KnowMem questions.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_unlearn.data.synthetic import (
    EOS_TOKEN,
    FACT_TYPES,
    FIRST_NAMES,
    SURNAMES,
    write_generated_set,
)
from lightning_unlearn.errors import ConfigError
from lightning_unlearn.metrics.muse import KnowMemFormat

GENERATOR_VERSION = 2  # 2: training questions in the few-shot prompt
GROUPS = ("forget", "retain1", "retain2", "holdout")
FILE = "{config}/{split}-00000-of-00001.json"


@dataclass
class MuseWorldConfig:
    """Seed and sizes: authors per group, facts per document (of the world's 10 fact types), the
    sentences of a VerbMem prompt and the in-context examples per KnowMem set."""

    seed: int = 0
    n_forget: int = 4
    n_retain1: int = 4
    n_retain2: int = 4
    n_holdout: int = 4
    n_facts: int = 6
    prompt_sentences: int = 2
    n_icl: int = 2

    def __post_init__(self) -> None:
        for name in ("n_forget", "n_retain1", "n_retain2", "n_holdout", "n_facts", "prompt_sentences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.world.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_facts > len(FACT_TYPES):
            raise ConfigError(f"data.world.n_facts must be at most {len(FACT_TYPES)}, got {self.n_facts}")
        if not self.prompt_sentences < self.n_facts + 1:
            raise ConfigError("data.world.prompt_sentences must leave a sentence for the ground truth")
        authors = self.n_forget + self.n_retain1 + self.n_retain2 + self.n_holdout
        if authors > len(FIRST_NAMES) * len(SURNAMES):
            raise ConfigError(f"data.world: at most {len(FIRST_NAMES) * len(SURNAMES)} authors in all")
        if not 0 <= self.n_icl < min(self.n_forget, self.n_retain2) * self.n_facts:
            raise ConfigError("data.world.n_icl must leave KnowMem questions in the forget and retain2 sets")


def _author(rng: random.Random, name: str, n_facts: int) -> tuple[str, list[dict[str, str]]]:
    """One author's document (a headline, then one sentence per fact) and question/answer pairs."""
    sentences, qa = [f"news about {name}."], []
    for fact in rng.sample(sorted(FACT_TYPES), n_facts):
        spec = FACT_TYPES[fact]
        value = rng.choice(spec["values"])
        sentences.append(rng.choice(spec["answers"]).format(name=name, value=value))
        qa.append({"question": rng.choice(spec["questions"]).format(name=name), "answer": value})
    return " ".join(sentences), qa


def generate_muse_world(config: MuseWorldConfig) -> dict[str, list[dict]]:
    """File path (relative) -> rows, the layout in the module docstring; same config, same output."""
    rng = random.Random(f"lightning_unlearn.synthetic_muse:{config.seed}")
    sizes = {g: getattr(config, f"n_{g}") for g in GROUPS}
    pairs = [f"{f} {s}" for f in FIRST_NAMES for s in SURNAMES]
    names = iter(rng.sample(pairs, sum(sizes.values())))
    docs: dict[str, list[str]] = {}
    qa: dict[str, list[dict[str, str]]] = {}
    for group, size in sizes.items():
        authors = [_author(rng, next(names), config.n_facts) for _ in range(size)]
        docs[group] = [doc for doc, _ in authors]
        qa[group] = [pair for _, pairs_ in authors for pair in pairs_]
    fmt = KnowMemFormat()
    files: dict[str, list[dict]] = {}
    for group in GROUPS:
        files[FILE.format(config="raw", split=group)] = [{"text": d} for d in docs[group]]
    icl = {"forget": qa["forget"][: config.n_icl], "retain1": [], "retain2": qa["retain2"][: config.n_icl]}
    for group in ("forget", "retain1", "retain2"):
        answered = [
            fmt.prompt(p["question"], icl[group] if i >= config.n_icl else []) + p["answer"]
            for i, p in enumerate(qa[group])
        ]
        files[FILE.format(config="train", split=group)] = [
            {"text": t + EOS_TOKEN} for t in docs[group] + answered
        ]
    verbmem = []
    for doc in docs["forget"]:
        cut = _nth_sentence_end(doc, config.prompt_sentences)
        verbmem.append({"prompt": doc[:cut], "gt": doc[cut:]})
    files[FILE.format(config="verbmem", split="forget")] = verbmem
    for name, group in (("forget", "forget"), ("retain", "retain2")):
        files[FILE.format(config="knowmem", split=f"{name}_qa_icl")] = qa[group][: config.n_icl]
        files[FILE.format(config="knowmem", split=f"{name}_qa")] = qa[group][config.n_icl :]
    for split, group in (("forget", "forget"), ("retain", "retain2"), ("holdout", "holdout")):
        files[FILE.format(config="privleak", split=split)] = [{"text": d} for d in docs[group]]
    return files


def _nth_sentence_end(text: str, n: int) -> int:
    """The index just past the n-th ". " of ``text`` (the space stays with the ground truth)."""
    position = -1
    for _ in range(n):
        position = text.index(". ", position + 1)
    return position + 1


def make_muse_world(directory: str | Path, config: MuseWorldConfig | None = None) -> Path:
    """Write the miniature (JSON Lines, as the hub's JSON files) and its tokenizer atomically,
    unless ``directory`` already holds the same one."""
    config = config or MuseWorldConfig()
    directory = Path(directory)
    marker = {"generator_version": GENERATOR_VERSION, "config": asdict(config)}

    def words(files: dict[str, list[dict]]) -> list[dict]:
        texts = [v.replace(EOS_TOKEN, "") for rows in files.values() for r in rows for v in r.values()]
        return [{"question": w, "answer": "a"} for w in texts]

    return write_generated_set(directory, marker, lambda: generate_muse_world(config), words)
