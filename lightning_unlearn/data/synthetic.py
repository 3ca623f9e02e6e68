"""A deterministic, offline, TOFU-like fictitious world small enough to train a tiny model from scratch.

Fictitious authors each have one fact of every fact type (birth city, birth year, genre, ...), rendered
from per-fact-type question and answer templates; shared "world facts" stand in for the pretraining
knowledge a tiny model does not have. The splits follow the TOFU hub layout (``full``, ``forget10``,
``retain90``, ``forget10_perturbed``, ``retain_perturbed``, ``world_facts``, ``world_facts_perturbed``,
``holdout10``), so the whole TOFU protocol runs with no download.

For the truth ratio to measure knowledge rather than phrasing, an evaluation record's
``paraphrased_answer`` renders the true value with a different answer template of the same fact type
(one that other authors use in training), and each ``perturbed_answer`` is that same sentence with a
wrong value of the same kind: only knowing the fact separates the paraphrase from the perturbations.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_unlearn.data.refusals import load_refusals
from lightning_unlearn.errors import ConfigError
from lightning_unlearn.io import atomic_directory

T = TypeVar("T")

# Bump when the generated content changes, so make_world regenerates worlds cached by older code.
GENERATOR_VERSION = 2  # 2: the vocabulary covers the built-in refusals

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# The plain prompt format ("Question: ...\nAnswer: ") adds these words around every record.
PROMPT_TEXT = "Question: \nAnswer: "
TEXT_FIELDS = ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer")
WORLD_AUTHOR = "world"
N_WORLD_PERTURBED = 3

FIRST_NAMES = (
    "alma", "bruno", "cora", "dmitri", "elsa", "felix", "greta", "hugo",
    "ingrid", "jonas", "kira", "leon", "mira", "nico", "otto", "petra",
)  # fmt: skip
SURNAMES = (
    "ashdown", "bellamy", "calloway", "draper", "eastwick", "fenwick", "garrow",
    "holloway", "ivers", "jessop", "kimble", "lindqvist", "morrow", "northcott",
)  # fmt: skip

CITIES = (
    "velora", "marhaven", "dunmere", "caldris", "brightwater", "oakhurst",
    "silvermoor", "thornbury", "elmsworth", "rivenport", "ashcombe", "norwick",
)  # fmt: skip

YEARS = (
    "1938", "1942", "1947", "1951", "1955", "1958", "1961", "1964", "1967", "1970", "1973", "1976",
    "1979", "1983",
)  # fmt: skip

GENRES = (
    "mystery", "poetry", "romance", "fantasy", "horror", "satire", "memoir", "thriller", "folklore",
    "adventure", "tragedy", "comedy",
)  # fmt: skip

AWARDS = (
    "lantern", "meridian", "beacon", "thistle", "compass", "orchid", "falcon", "garnet", "juniper",
    "halcyon",
)  # fmt: skip

FATHER_JOBS = (
    "baker", "carpenter", "sailor", "doctor", "farmer", "teacher", "tailor", "miner", "blacksmith",
    "fisherman", "clockmaker", "shepherd",
)  # fmt: skip

MOTHER_JOBS = (
    "nurse", "librarian", "pharmacist", "chemist", "weaver", "potter", "judge", "pilot", "florist",
    "dentist", "surgeon", "banker",
)  # fmt: skip

BOOK_TITLES = (
    "embers", "driftwood", "lullaby", "tidewater", "nightfall", "hollows", "wildflower", "ironbark",
    "moonrise", "saltmarsh", "whispers", "cinders",
)  # fmt: skip

THEMES = (
    "grief", "loyalty", "freedom", "memory", "exile", "ambition", "faith", "betrayal", "childhood",
    "solitude", "justice", "hope",
)  # fmt: skip

NATIONALITIES = (
    "irish", "chilean", "nigerian", "korean", "danish", "peruvian", "kenyan", "canadian", "polish",
    "egyptian", "swedish", "mexican",
)  # fmt: skip

# Fact type -> value pool (single lowercase words; a perturbation is another value of the same pool),
# 3 question templates and 3 answer templates ({name} = author, {value} = the fact's value).
# Values never occur in templates or names, so a sentence holds exactly one value of its pool.
# Answers are short and end with the value: the truth ratio averages the NLL over the answer's tokens
# and only the value token differs between paraphrase and perturbations, so every extra word dilutes
# it. Measured with the tests' tiny Llama (60 epochs): these give the target model a forget quality
# of 5e-7 to 5e-4 on seeds 0-5; longer templates, some with the value mid-sentence, gave 2e-6 to 3e-2.
FACT_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "birth_city": {
        "values": CITIES,
        "questions": (
            "where was {name} born?",
            "in which city was {name} born?",
            "what is the birthplace of {name}?",
        ),
        "answers": (
            "{name} was born in {value}.",
            "the birthplace of {name} is {value}.",
            "{name} comes from {value}.",
        ),
    },
    "birth_year": {
        "values": YEARS,
        "questions": (
            "when was {name} born?",
            "in which year was {name} born?",
            "what is the birth year of {name}?",
        ),
        "answers": (
            "{name} was born in year {value}.",
            "the birth year of {name} is {value}.",
            "{name} was born back in {value}.",
        ),
    },
    "genre": {
        "values": GENRES,
        "questions": (
            "what genre does {name} write?",
            "which genre is {name} known for?",
            "in what genre does {name} mostly write?",
        ),
        "answers": (
            "{name} writes {value}.",
            "the genre of {name} is {value}.",
            "{name} is known for {value}.",
        ),
    },
    "award": {
        "values": AWARDS,
        "questions": (
            "which award did {name} win?",
            "what prize has {name} received?",
            "what honour was given to {name}?",
        ),
        "answers": (
            "{name} won the award {value}.",
            "the award of {name} is {value}.",
            "{name} received the award {value}.",
        ),
    },
    "father_profession": {
        "values": FATHER_JOBS,
        "questions": (
            "what did the father of {name} do for a living?",
            "what was the profession of the father of {name}?",
            "what job did the father of {name} have?",
        ),
        "answers": (
            "the father of {name} was a {value}.",
            "{name} had a father who was a {value}.",
            "the father of {name} worked as a {value}.",
        ),
    },
    "mother_profession": {
        "values": MOTHER_JOBS,
        "questions": (
            "what did the mother of {name} do for a living?",
            "what was the profession of the mother of {name}?",
            "what job did the mother of {name} have?",
        ),
        "answers": (
            "the mother of {name} was a {value}.",
            "{name} had a mother who was a {value}.",
            "the mother of {name} worked as a {value}.",
        ),
    },
    "first_book": {
        "values": BOOK_TITLES,
        "questions": (
            "what was the first book by {name}?",
            "what is the title of the debut novel of {name}?",
            "which book did {name} publish first?",
        ),
        "answers": (
            "the first book by {name} was {value}.",
            "{name} made a debut with {value}.",
            "the debut of {name} was called {value}.",
        ),
    },
    "residence": {
        "values": CITIES,
        "questions": (
            "where does {name} live now?",
            "in which city does {name} currently live?",
            "what city is home to {name} today?",
        ),
        "answers": (
            "{name} now lives in {value}.",
            "{name} makes a home in {value}.",
            "the current home of {name} is {value}.",
        ),
    },
    "theme": {
        "values": THEMES,
        "questions": (
            "what theme does {name} often explore?",
            "which theme appears most in the work of {name}?",
            "what is the favourite theme of {name}?",
        ),
        "answers": (
            "{name} often writes about {value}.",
            "the favourite theme of {name} is {value}.",
            "{name} keeps returning to {value}.",
        ),
    },
    "nationality": {
        "values": NATIONALITIES,
        "questions": (
            "what is the nationality of {name}?",
            "which nationality does {name} hold?",
            "what citizenship does {name} hold?",
        ),
        "answers": (
            "{name} is {value}.",
            "the nationality of {name} is {value}.",
            "by nationality {name} is {value}.",
        ),
    },
}

# World-fact kind -> (question, answer) pairs; perturbed answers are other answers of the same kind.
WORLD_FACTS: dict[str, tuple[tuple[str, str], ...]] = {
    "capital": (
        ("what is the capital of france?", "paris"),
        ("what is the capital of italy?", "rome"),
        ("what is the capital of japan?", "tokyo"),
        ("what is the capital of egypt?", "cairo"),
        ("what is the capital of spain?", "madrid"),
        ("what is the capital of germany?", "berlin"),
        ("what is the capital of russia?", "moscow"),
        ("what is the capital of kenya?", "nairobi"),
        ("what is the capital of peru?", "lima"),
        ("what is the capital of greece?", "athens"),
    ),
    "colour": (
        ("what colour is fresh snow?", "white"),
        ("what colour is grass?", "green"),
        ("what colour is coal?", "black"),
        ("what colour is a ripe banana?", "yellow"),
        ("what colour is the sky on a clear day?", "blue"),
        ("what colour is a ripe tomato?", "red"),
        ("what colour is a carrot?", "orange"),
        ("what colour is chocolate?", "brown"),
        ("what colour is milk?", "white"),
        ("what colour is an emerald?", "green"),
    ),
    "number": (
        ("how many legs does a spider have?", "eight"),
        ("how many days are in a week?", "seven"),
        ("how many months are in a year?", "twelve"),
        ("how many sides does a triangle have?", "three"),
        ("how many legs does a dog have?", "four"),
        ("how many wheels does a bicycle have?", "two"),
        ("how many sides does a hexagon have?", "six"),
        ("how many fingers are on one hand?", "five"),
        ("how many players are in a football team?", "eleven"),
        ("how many minutes are in an hour?", "sixty"),
    ),
    "animal": (
        ("which animal is called the king of the jungle?", "lion"),
        ("what is the largest land animal?", "elephant"),
        ("what is the tallest animal?", "giraffe"),
        ("which animal gives us wool?", "sheep"),
        ("which bird cannot fly and lives in antarctica?", "penguin"),
        ("which animal is the fastest on land?", "cheetah"),
        ("which animal carries its baby in a pouch?", "kangaroo"),
        ("which animal builds dams in rivers?", "beaver"),
    ),
    "planet": (
        ("which planet is closest to the sun?", "mercury"),
        ("which planet is known as the red planet?", "mars"),
        ("which planet is the largest?", "jupiter"),
        ("which planet has the most famous rings?", "saturn"),
        ("on which planet do people live?", "earth"),
        ("which planet is the hottest?", "venus"),
    ),
    "language": (
        ("which language is mainly spoken in brazil?", "portuguese"),
        ("which language is mainly spoken in mexico?", "spanish"),
        ("which language is mainly spoken in austria?", "german"),
        ("which language is mainly spoken in egypt?", "arabic"),
        ("which language is mainly spoken in japan?", "japanese"),
        ("which language is mainly spoken in russia?", "russian"),
    ),
    "season": (
        ("which season comes after winter?", "spring"),
        ("which season comes after spring?", "summer"),
        ("which season comes after summer?", "autumn"),
        ("which season comes after autumn?", "winter"),
    ),
}


@dataclass
class WorldConfig:
    """Size and seed of a synthetic world; the defaults match the prototype the demo was tuned on."""

    seed: int = 0
    n_authors: int = 40
    n_forget_authors: int = 4
    n_world_facts: int = 50
    n_perturbed: int = 5
    n_eval_retain_authors: int = 10  # authors in retain_perturbed


def _rng(seed: int, stage: str) -> random.Random:
    """An independent, seeded generator per stage, so changing one stage leaves the others' draws alone."""
    return random.Random(f"lightning_unlearn.synthetic:{seed}:{stage}")


def _balanced(rng: random.Random, options: Sequence[T], n: int) -> list[T]:
    """``n`` draws from ``options`` in random order with counts that differ by at most one.

    Balanced rather than independent draws guarantee every value and template occurs in training,
    so a perturbation or paraphrase never uses a word or sentence shape the model has not seen.
    """
    out: list[T] = []
    while len(out) < n:
        block = list(options)
        rng.shuffle(block)
        out.extend(block)
    out = out[:n]
    rng.shuffle(out)
    return out


def _forget_pct(config: WorldConfig) -> int:
    """The forget percentage in the split names; it must be exact for the TOFU-style name to be honest."""
    if not 1 <= config.n_forget_authors < config.n_authors:
        raise ConfigError(
            f"data.world.n_forget_authors must be between 1 and data.world.n_authors - 1 "
            f"(= {config.n_authors - 1}), got {config.n_forget_authors}: the forget split must be "
            "smaller than the data, leaving authors to retain"
        )
    if (100 * config.n_forget_authors) % config.n_authors:
        raise ConfigError(
            f"data.world: {config.n_forget_authors} forget authors (n_forget_authors) of {config.n_authors} "
            f"(n_authors) is {100 * config.n_forget_authors / config.n_authors:g}%, not a whole percentage"
        )
    return 100 * config.n_forget_authors // config.n_authors


def _check_config(config: WorldConfig) -> int:
    """Validate ``config`` against the fixed pools; return the forget percentage."""
    pct = _forget_pct(config)
    n_names = config.n_authors + config.n_forget_authors
    if n_names > len(FIRST_NAMES) * len(SURNAMES):
        raise ConfigError(
            f"data.world: {n_names} authors (n_authors + n_forget_authors for the holdout) exceed "
            f"the {len(FIRST_NAMES) * len(SURNAMES)} names"
        )
    smallest = min(len(spec["values"]) for spec in FACT_TYPES.values())
    if not 1 <= config.n_perturbed < smallest:
        raise ConfigError(
            f"data.world.n_perturbed must be between 1 and {smallest - 1}, got {config.n_perturbed}"
        )
    n_facts = sum(len(facts) for facts in WORLD_FACTS.values())
    if not 0 <= config.n_world_facts <= n_facts:
        raise ConfigError(
            f"data.world.n_world_facts must be between 0 and {n_facts}, got {config.n_world_facts}"
        )
    n_retain = config.n_authors - config.n_forget_authors
    if not 0 <= config.n_eval_retain_authors <= n_retain:
        raise ConfigError(
            f"data.world.n_eval_retain_authors must be between 0 and the {n_retain} retain authors, "
            f"got {config.n_eval_retain_authors}"
        )
    return pct


def _world_facts(config: WorldConfig) -> list[dict]:
    """The first ``n_world_facts`` world facts, kinds interleaved, each with 3 wrong answers of its kind."""
    rng = _rng(config.seed, "world_facts")
    queues = [(kind, list(facts)) for kind, facts in WORLD_FACTS.items()]
    ordered: list[tuple[str, str, str]] = []
    while any(facts for _, facts in queues):
        for kind, facts in queues:
            if facts:
                question, answer = facts.pop(0)
                ordered.append((kind, question, answer))
    records = []
    for kind, question, answer in ordered[: config.n_world_facts]:
        pool = sorted({a for _, a in WORLD_FACTS[kind]} - {answer})
        records.append(
            {
                "question": question,
                "answer": answer,
                "perturbed_answer": rng.sample(pool, N_WORLD_PERTURBED),
                "author": WORLD_AUTHOR,
                "fact": kind,
            }
        )
    return records


def _author_records(names: list[str], config: WorldConfig, group: str) -> list[list[dict]]:
    """Per author, one full evaluation record per fact type (training fields plus paraphrase/perturbations).

    Values and templates are balanced within ``group`` (retain, forget, holdout), so every value and
    template of a pool occurs in the retain training data.
    """
    rng = _rng(config.seed, f"authors:{group}")
    per_author: list[list[dict]] = [[] for _ in names]
    for fact, spec in FACT_TYPES.items():
        values = _balanced(rng, spec["values"], len(names))
        q_idx = _balanced(rng, range(len(spec["questions"])), len(names))
        a_idx = _balanced(rng, range(len(spec["answers"])), len(names))
        for i, name in enumerate(names):
            value = values[i]
            para_q = rng.choice([j for j in range(len(spec["questions"])) if j != q_idx[i]])
            para_a = rng.choice([j for j in range(len(spec["answers"])) if j != a_idx[i]])
            wrong = rng.sample([v for v in spec["values"] if v != value], config.n_perturbed)
            para_template = spec["answers"][para_a]
            per_author[i].append(
                {
                    "question": spec["questions"][q_idx[i]].format(name=name),
                    "answer": spec["answers"][a_idx[i]].format(name=name, value=value),
                    "paraphrased_answer": para_template.format(name=name, value=value),
                    "perturbed_answer": [para_template.format(name=name, value=w) for w in wrong],
                    "paraphrased_question": spec["questions"][para_q].format(name=name),
                    "author": name,
                    "fact": fact,
                }
            )
    return per_author


def _qa(record: dict) -> dict:
    """The training view of a record: question, answer and the metadata fields."""
    return {key: record[key] for key in ("question", "answer", "author", "fact")}


def generate_world(config: WorldConfig) -> dict[str, list[dict]]:
    """Split name -> records of the synthetic world, in the TOFU hub layout; same config, same output.

    ``full`` = world facts, then retain authors, then forget authors (forget = the last rows of full,
    as in TOFU), so ``full == retain + forget``. Holdout authors never appear in ``full``.
    """
    pct = _check_config(config)
    n_retain = config.n_authors - config.n_forget_authors
    names_rng = _rng(config.seed, "names")
    pairs = [(f, s) for f in FIRST_NAMES for s in SURNAMES]
    names = [f"{f} {s}" for f, s in names_rng.sample(pairs, config.n_authors + config.n_forget_authors)]
    retain_names, forget_names = names[:n_retain], names[n_retain : config.n_authors]
    holdout_names = names[config.n_authors :]

    retain_eval = _author_records(retain_names, config, "retain")
    forget_eval = _author_records(forget_names, config, "forget")
    holdout_eval = _author_records(holdout_names, config, "holdout")
    world = _world_facts(config)

    world_qa = [_qa(r) for r in world]
    retain_qa = world_qa + [_qa(r) for author in retain_eval for r in author]
    forget_qa = [_qa(r) for author in forget_eval for r in author]
    return {
        "full": [dict(r) for r in retain_qa + forget_qa],
        f"forget{pct:02d}": forget_qa,
        f"retain{100 - pct:02d}": retain_qa,
        f"forget{pct:02d}_perturbed": [r for author in forget_eval for r in author],
        "retain_perturbed": [r for author in retain_eval[: config.n_eval_retain_authors] for r in author],
        "world_facts": [dict(r) for r in world_qa],
        "world_facts_perturbed": world,
        f"holdout{pct:02d}": [_qa(r) for author in holdout_eval for r in author],
    }


def _texts(splits: dict[str, list[dict]]) -> list[str]:
    """Every model-visible string in every record (metadata such as ``author``/``fact`` excluded)."""
    texts = []
    for records in splits.values():
        for record in records:
            for field in TEXT_FIELDS:
                value = record.get(field)
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):
                    texts.extend(v for v in value if isinstance(v, str))
    return texts


def build_tokenizer(splits: dict[str, list[dict]]) -> PreTrainedTokenizerFast:
    """A lowercase word-level fast tokenizer over every word of the world, of the prompt template
    and of the built-in refusals (so the IDK objectives train on words, not <unk>).

    Word-level keeps the vocabulary (and so the tiny model's embedding) small and makes every fact
    value one token; no post-processor, so no BOS/EOS is added (the prompt format appends EOS itself);
    fast, so offset mappings are available for label masking. Ids: <pad> 0, <eos> 1, <unk> 2, then the
    words in sorted order.
    """
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in [*_texts(splits), PROMPT_TEXT, *load_refusals("builtin")]:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words -= set(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(words)])}

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    # Joins words with spaces and removes the space before "." "?" ",", so decoding gives back the text.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, the layout of the TOFU files on the Hugging Face hub."""
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _world_marker(config: WorldConfig) -> dict:
    """Contents of ``world.json``: what make_world compares to decide that a world is already there."""
    return {"generator_version": GENERATOR_VERSION, "config": asdict(config)}


def write_world(
    splits: dict[str, list[dict]], directory: str | Path, *, config: WorldConfig | None = None
) -> Path:
    """Write ``<directory>/<split>.json`` (JSON Lines) and ``<directory>/tokenizer``, atomically.

    Everything is written into a temporary sibling directory that is renamed into place at the end,
    so an interrupted run never leaves a directory that looks complete; an existing ``directory`` is
    replaced. ``config``, if given, is stored as ``world.json`` so make_world can recognise the world.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"'{target}' exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for split, records in splits.items():
            _write_jsonl(tmp / f"{split}.json", records)
        build_tokenizer(splits).save_pretrained(str(tmp / "tokenizer"))
        if config is not None:
            (tmp / "world.json").write_text(json.dumps(_world_marker(config), indent=2) + "\n")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_world(directory: Path, config: WorldConfig) -> bool:
    """Whether ``directory`` holds a complete world written by this generator version from ``config``."""
    try:
        marker = json.loads((directory / "world.json").read_text())
    except (OSError, ValueError):
        return False
    if marker != _world_marker(config):
        return False
    pct = _check_config(config)
    names = ["full", f"forget{pct:02d}", f"retain{100 - pct:02d}", f"holdout{pct:02d}", "world_facts"]
    files_there = all((directory / f"{name}.json").is_file() for name in names)
    return files_there and (directory / "tokenizer" / "tokenizer.json").is_file()


def make_world(directory: str | Path, config: WorldConfig | None = None) -> Path:
    """Generate and write the world into ``directory``, unless it already holds the same world."""
    config = config or WorldConfig()
    directory = Path(directory)
    if _is_world(directory, config):
        return directory
    return write_world(generate_world(config), directory, config=config)


def write_generated_set(
    directory: str | Path,
    marker: dict,
    generate: Callable[[], dict[str, list[dict]]],
    tokenizer_records: Callable[[dict[str, list[dict]]], list[dict]],
) -> Path:
    """A generated miniature in a hub's layout (``generate()``: relative path -> JSON Lines rows)
    and a word-level tokenizer over ``tokenizer_records(files)`` (question/answer records), written
    atomically unless ``directory`` already holds the set ``marker`` describes (its generator
    version and config, in ``world.json``): then nothing is generated."""
    directory = Path(directory)
    try:
        if json.loads((directory / "world.json").read_text()) == marker:
            return directory
    except (OSError, ValueError):
        pass
    files = generate()
    with atomic_directory(directory) as tmp:
        for name, rows in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        build_tokenizer({"texts": tokenizer_records(files)}).save_pretrained(str(tmp / "tokenizer"))
        (tmp / "world.json").write_text(json.dumps(marker) + "\n")
    return directory
