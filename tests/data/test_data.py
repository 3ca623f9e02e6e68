"""Record validation, TOFU loading, prompt masking and collation."""

import json
import re
from pathlib import Path

import pytest
import torch

from lightning_unlearn.data.collate import TrainCollator, pad_batch
from lightning_unlearn.data.formatting import PromptFormat, encode, encode_prompt
from lightning_unlearn.data.records import load_records
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError

TOFU = Path(__file__).resolve().parents[3] / "shared" / "data" / "tofu"
needs_tofu = pytest.mark.skipif(not TOFU.is_dir(), reason="../shared/data/tofu not present")


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_records_jsonl_and_array(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2", "id": "x"}]
    jsonl = _write(tmp_path, "d.jsonl", [json.dumps(r) for r in rows])
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows))
    for path in (jsonl, array):
        records = load_records(path)
        assert [r["answer"] for r in records] == ["a1", "a2"]
        assert [r["id"] for r in records] == [f"{path.name}:1", "x"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q"}', r"row 2: missing field 'answer'"),
        ('{"question": "q", "answer": "  "}', r"row 2: field 'answer' is empty"),
        ('{"question": 3, "answer": "a"}', r"row 2: field 'question' must be a string"),
        ('{"question": "q", "answer": "a", "perturbed_answer": []}', r"row 2: field 'perturbed_answer'"),
        ('{"question": "q", "answer": "a", "perturbed_answer": ["ok", ""]}', r"perturbed_answer' item 1"),
        ('{"question": "q", "answer": ', r"row 2: invalid JSON"),
        ("[1, 2]", r"row 2: expected a JSON object"),
    ],
)
def test_bad_record_names_file_row_and_field(tmp_path, line, message):
    path = _write(tmp_path, "bad.json", ['{"question": "fine", "answer": "fine"}', line])
    with pytest.raises(UserError, match=message) as info:
        load_records(path)
    assert str(path) in str(info.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(UserError, match="no records"):
        load_records(_write(tmp_path, "empty.json", []))


@needs_tofu
def test_tofu_local_directory_in_hub_layout():
    forget = load_split(TOFU, "forget01_perturbed")
    assert len(forget) == 40 and len(forget[0]["perturbed_answer"]) == 5
    full, retain = load_split(TOFU, "full"), load_split(TOFU, "retain99")
    assert [r["question"] for r in full] == [r["question"] for r in retain + load_split(TOFU, "forget01")]
    with pytest.raises(UserError, match="unknown split 'forget02'.*forget01"):
        load_split(TOFU, "forget02")


def test_missing_local_source_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_split(str(tmp_path / "missing_dir") + "/", "forget01")


class CharTokenizer:
    """A stand-in fast tokenizer: one token per character, offsets exact, EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def test_plain_prompt_masks_prompt_and_scores_answer_plus_eos():
    tok, fmt = CharTokenizer(), PromptFormat()
    prompt = "Question: Who?\nAnswer: "
    assert fmt.prompt("Who?", tok) == prompt
    enc = encode("Who?", "Me", tok, fmt, max_length=64)
    n = len(prompt)
    assert enc["labels"][:n] == [-100] * n
    assert enc["labels"][n:] == [ord("M"), ord("e"), 0]
    assert enc["input_ids"][-1] == 0 and len(enc["input_ids"]) == n + 3
    # prompt_length gives the same boundary for a tokenizer that does not merge across it.
    assert encode("Who?", "Me", tok, PromptFormat(label_boundary="prompt_length"), 64) == enc
    assert encode_prompt("Who?", tok, fmt, 64) == [ord(c) for c in prompt.rstrip(" ")]


def test_prompt_longer_than_max_length_is_a_user_error():
    with pytest.raises(UserError, match="record r7: prompt is 23 tokens.*max_length=10"):
        encode("Who?", "Me", CharTokenizer(), PromptFormat(), max_length=10, where="record r7")


def test_long_answer_is_truncated_to_max_length():
    enc = encode("Who?", "x" * 100, CharTokenizer(), PromptFormat(), max_length=30)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 30


def test_bad_prompt_format_values():
    with pytest.raises(UserError, match="kind"):
        PromptFormat(kind="chatml")
    with pytest.raises(UserError, match="label_boundary"):
        PromptFormat(label_boundary="tokens")


def test_pad_batch_right_and_left_with_masks_from_lengths():
    # pad id equals a real token id (1): the mask must still come from lengths.
    feats = [{"input_ids": [5, 1], "labels": [-100, 1]}, {"input_ids": [7, 8, 1], "labels": [-100, 8, 1]}]
    right = pad_batch(feats, pad_id=1)
    assert right["input_ids"].tolist() == [[5, 1, 1], [7, 8, 1]]
    assert right["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert right["labels"].tolist() == [[-100, 1, -100], [-100, 8, 1]]
    left = pad_batch([{"input_ids": f["input_ids"]} for f in feats], pad_id=1, side="left")
    assert left["input_ids"].tolist() == [[1, 5, 1], [7, 8, 1]]
    assert left["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert "labels" not in left


def test_train_collator_handles_named_sub_batches():
    item = {"forget": {"input_ids": [3], "labels": [3]}, "retain": {"input_ids": [4, 4], "labels": [4, 4]}}
    batch = TrainCollator(pad_id=0)([item, item])
    assert set(batch) == {"forget", "retain"}
    assert batch["retain"]["input_ids"].shape == torch.Size([2, 2])


def test_unlearning_batches_with_refusals(world_dir, tokenizer_dir, tmp_path):
    from lightning_unlearn.data.datamodule import UnlearningDataModule
    from lightning_unlearn.data.refusals import load_refusals, refusal_records

    def module(**kwargs):
        dm = UnlearningDataModule(
            tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
            max_length=64, batch_size=3, retain_per_forget=2, **kwargs,
        )  # fmt: skip
        dm.setup()
        return dm

    builtin = load_refusals("builtin")
    assert len(builtin) >= 20
    dm = module(refusals="builtin", seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"forget", "retain", "forget_idk", "retain_idk"}
    assert batch["retain"]["input_ids"].shape[0] == 2 * batch["forget"]["input_ids"].shape[0]
    assert torch.equal(batch["retain_idk"]["index"], batch["retain"]["index"])
    tok = load_tokenizer(tokenizer_dir)
    # retain_idk asks the same retain questions, row for row, and answers with a builtin refusal.
    refusal_ids = {tuple(tok(r)["input_ids"] + [tok.eos_token_id]) for r in builtin}
    for item in dm.dataset:
        for plain, idk in zip(item["retain"], item["retain_idk"], strict=True):
            start = next(i for i, t in enumerate(idk["labels"]) if t != -100)
            assert plain["index"] == idk["index"] and plain["input_ids"][:start] == idk["input_ids"][:start]
            assert tuple(idk["input_ids"][start:]) in refusal_ids
    forget_records = load_split(world_dir, "forget10")
    chosen = refusal_records(forget_records, builtin, seed=0)
    assert all(
        c["answer"] in builtin and c["question"] == r["question"]
        for c, r in zip(chosen, forget_records, strict=True)
    )
    for item, record in zip(dm.dataset, chosen, strict=True):  # labels are exactly the chosen refusal + EOS
        labels = [t for t in item["forget_idk"]["labels"] if t != -100]
        assert labels == tok(record["answer"])["input_ids"] + [tok.eos_token_id]
    # A seeded choice per item: same seed same picks, another seed other picks.
    picks = [item["forget_idk"]["input_ids"] for item in dm.dataset]
    assert picks == [item["forget_idk"]["input_ids"] for item in module(refusals="builtin", seed=0).dataset]
    assert picks != [item["forget_idk"]["input_ids"] for item in module(refusals="builtin", seed=1).dataset]
    # Overridable from a file.
    own = tmp_path / "refusals.txt"
    own.write_text("no idea\n\n")
    assert {tuple(i["forget_idk"]["labels"][-3:]) for i in module(refusals=str(own)).dataset} == {
        tuple(tok("no idea")["input_ids"]) + (tok.eos_token_id,)
    }
    with pytest.raises(UserError, match="refusals file"):
        module(refusals=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 25])
def test_reference_shards_cover_the_split_with_equal_lengths(unlearning_data, world_size):
    data = unlearning_data.dataset
    shards = [data.shard("forget", rank, world_size) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert {item["index"] for s in shards for item in s} == set(range(len(data.forget)))
    assert all(item["input_ids"] == data.forget[item["index"]]["input_ids"] for s in shards for item in s)


def test_retain_pairing_changes_with_epoch_but_not_with_order(world_dir, tokenizer_dir):
    from lightning_unlearn.data.datamodule import UnlearningDataModule

    dm = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                              retain_split="retain90", max_length=64, seed=5)  # fmt: skip
    dm.setup()
    data = dm.dataset
    epoch0 = [data.retain_indices(i) for i in range(len(data))]
    assert [data.retain_indices(i) for i in reversed(range(len(data)))] == epoch0[::-1]
    dm.set_epoch(1)
    assert [data.retain_indices(i) for i in range(len(data))] != epoch0


def test_hub_id_offline_and_unknown_split_errors(monkeypatch):
    import huggingface_hub.constants

    # Read once at import, so patch the constant: no network wait, the same path as an offline user.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="unknown TOFU split 'forget02'"):
        load_split("locuslab/TOFU", "forget02")
    with pytest.raises(UserError, match="could not fetch split 'forget01'.*local directory"):
        load_split("locuslab/TOFU", "forget01")


class MergingTokenizer:
    """A stand-in BPE: a word carries its leading space (" The"), a lone trailing space is its own
    token, so the prompt's trailing space merges into the first answer word as in SmolLM2."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        spans = [m.span() for m in re.finditer(r"\s?\S+|\s", text)]
        out = {"input_ids": [hash(text[a:b]) % 1000 + 1 for a, b in spans]}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


def test_offsets_score_the_first_answer_word_that_prompt_length_drops():
    tok = MergingTokenizer()
    offsets = encode("Who?", "The cat", tok, PromptFormat(), 64)
    legacy = encode("Who?", "The cat", tok, PromptFormat(label_boundary="prompt_length"), 64)
    the, cat = tok(" The")["input_ids"][0], tok(" cat")["input_ids"][0]
    assert offsets["input_ids"] == legacy["input_ids"]
    assert [t for t in offsets["labels"] if t != -100] == [the, cat, 0]
    assert [t for t in legacy["labels"] if t != -100] == [cat, 0]


@pytest.mark.parametrize("path", ["runs/smollm2_tofu/models/finetuned", "./model", "~/nope/model", "m.gguf"])
def test_missing_local_model_path_is_named_not_looked_up_on_the_hub(path, monkeypatch, tmp_path):
    """A relative path such as the protocol's output directory, before the protocol made it, is a
    local path: the error names it and says how it comes to exist (no hub lookup, which would
    fail with "Repo id must be in the form ...")."""
    from lightning_unlearn.data.tokenizer import load_tokenizer

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)  # a checkout that ran `make smollm2` has the first path
    with pytest.raises(UserError, match=f"model path '{path}' does not exist: train or export"):
        load_tokenizer(path)


def test_hub_ids_are_not_taken_for_local_paths():
    from lightning_unlearn.data.tokenizer import check_local

    check_local("HuggingFaceTB/SmolLM2-135M-Instruct")  # namespace/name: left to the hub
    check_local("gpt2")
    check_local("meta-llama/Llama-3.2-1B")  # a dot in a hub id is no file suffix
