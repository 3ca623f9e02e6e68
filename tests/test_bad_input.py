"""Bad input everywhere a user gives it: each gets one message naming what and where, and, run
from the command line, exit status 2, no traceback and no output that looks complete.

The property tests feed the record loader random bytes, random JSON and random records with wrong
types: it returns valid records or raises UserError, never anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from lightning_unlearn.data.datamodule import FineTuneDataModule, UnlearningDataModule
from lightning_unlearn.data.edits import InfluenceDataModule
from lightning_unlearn.data.records import check_disjoint, load_records
from lightning_unlearn.data.synthetic import WorldConfig, generate_world
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.errors import ConfigError, UserError, find_user_error
from lightning_unlearn.evaluate import EvaluateCommand
from lightning_unlearn.models import LoraSpec, ModelSpec, load_adapter, load_model
from lightning_unlearn.protocol import DataSettings, EvalSettings, Stage

# -- the record loader never fails with anything but UserError -----------------------------------

PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
FIELDS = ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer", "id")
# text with the awkward cases: empty, blank, lone surrogates (JSON can spell them), NUL, emoji
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\t\n", "\x00", "\ud800", "a\udfffb", "😀", "q"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | TEXT, inner, max_size=5)
    ),
    max_leaves=12,
)
# mostly record-shaped dicts with a wrong value here and there, so validation goes deep
RECORDS = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES | TEXT, max_size=6)


def _loads_or_refuses(path: Path) -> None:
    """The property: valid records out, or UserError; any other exception fails the test."""
    try:
        records = load_split(path, "ignored")  # a file source: what every data module calls
    except UserError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
        return
    assert records
    ids = [str(r["id"]) for r in records]
    assert len(set(ids)) == len(ids)
    for record in records:
        for field in ("question", "answer"):
            assert isinstance(record[field], str) and record[field].strip()
            record[field].encode("utf-8")  # no lone surrogates got through
        for answer in record.get("perturbed_answer") or []:
            assert isinstance(answer, str) and answer.strip()


@pytest.fixture(scope="module")
def scratch() -> Path:
    """One directory for every example (hypothesis reruns a test body; tmp_path would be shared anyway)."""
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@PROPERTY
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_bytes_load_or_refuse(scratch, data, suffix):
    path = scratch / f"bytes{suffix}"
    path.write_bytes(data)
    _loads_or_refuses(path)


@PROPERTY
@given(values=st.lists(JSON_VALUES, max_size=5), as_array=st.booleans(), ascii_only=st.booleans())
def test_random_json_values_load_or_refuse(scratch, values, as_array, ascii_only):
    path = scratch / "values.json"
    if as_array:
        text = json.dumps(values, ensure_ascii=ascii_only)
    else:
        text = "".join(json.dumps(v, ensure_ascii=ascii_only) + "\n" for v in values)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _loads_or_refuses(path)


@PROPERTY
@given(
    records=st.lists(RECORDS, min_size=1, max_size=5),
    as_array=st.booleans(),
    suffix=st.sampled_from([".json", ".jsonl"]),
)
def test_random_records_with_wrong_types_load_or_refuse(scratch, records, as_array, suffix):
    path = scratch / f"records{suffix}"
    if as_array:
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _loads_or_refuses(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000, r"invalid JSON \(nested too deeply\)"),
        ('{"question": "q", "answer": ' + "1" * 5000 + "}", r"row 1: invalid JSON \(Exceeds the limit"),
        ('{"question": "\\ud800", "answer": "a"}', r"row 1: field 'question' holds an invalid Unicode escape"),
        ('{"question": "q", "answer": "a", "perturbed_answer": ["\\udfff"]}', r"'perturbed_answer' item 0 holds"),
        ('{"question": "q", "answer": "a", "id": true}', r"row 1: field 'id' must be a string or an integer, got bool"),
        ('{"question": "q", "answer": "a", "id": " "}', r"row 1: field 'id' is empty"),
    ],
    ids=["deep", "long-int", "surrogate", "surrogate-item", "bool-id", "blank-id"],
)  # fmt: skip
def test_what_the_property_found_names_file_row_and_field(tmp_path, text, message):
    """Each was a crash (RecursionError, ValueError) or slipped through to fail in the tokenizer."""
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(UserError, match=message) as info:
        load_records(path)
    assert str(info.value).startswith(str(path))


def test_a_byte_order_mark_is_read_not_refused(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"question": "q", "answer": "a"}]).encode())
    assert [r["answer"] for r in load_records(path)] == ["a"]


# -- duplicate ids, and forget records that sit in the retain set --------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_duplicate_ids_name_the_file_and_both_rows(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [{"question": "a", "answer": "1", "id": 7}, {"question": "b", "answer": "2"}, {"question": "c", "answer": "3", "id": "7"}],
    )  # fmt: skip
    with pytest.raises(UserError) as info:
        load_records(path)
    assert str(info.value) == f"{path}: row 3: id '7' is also the id of row 1"
    # an explicit id equal to another row's generated one is the same clash
    path = _jsonl(
        tmp_path / "e.jsonl",
        [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2", "id": "e.jsonl:1"}],
    )
    with pytest.raises(UserError, match="row 2: id 'e.jsonl:1' is also the id of row 1"):
        load_records(path)


def test_check_disjoint_names_both_records_and_both_places():
    forget = [
        {"id": "f:1", "question": "q1", "answer": "a1"},
        {"id": "f:2", "question": "q2", "answer": "a2"},
    ]
    retain = [
        {"id": "r:1", "question": "q0", "answer": "a0"},
        {"id": "r:9", "question": "q2", "answer": "a2"},
    ]
    with pytest.raises(UserError) as info:
        check_disjoint(forget, retain, "forget.json", "retain.json")
    assert str(info.value) == (
        "forget record 'f:2' (forget.json) is also in the retain set as record 'r:9' (retain.json): "
        "the same question and answer; a record cannot be both forgotten and kept"
    )
    same_id = [{"id": "f:1", "question": "other", "answer": "other"}]
    with pytest.raises(UserError, match="record 'f:1' .* as record 'f:1' .*: the same id"):
        check_disjoint(forget, same_id, "forget.json", "retain.json")
    # the same question with another answer is not the same record
    check_disjoint(forget, [{"id": "r:2", "question": "q1", "answer": "different"}], "f", "r")


@pytest.fixture
def overlapping_source(tmp_path, world_dir) -> Path:
    """A copy of the test world whose retain90 also holds forget10's third record."""
    source = tmp_path / "overlap"
    shutil.copytree(world_dir, source, ignore=shutil.ignore_patterns("tokenizer"))
    forget = (source / "forget10.json").read_text().splitlines()
    with (source / "retain90.json").open("a") as handle:
        handle.write(forget[2] + "\n")
    return source


def test_unlearning_data_refuses_forget_records_in_the_retain_set(overlapping_source, tokenizer_dir):
    data = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(overlapping_source), forget_split="forget10",
                                retain_split="retain90", max_length=64)  # fmt: skip
    with pytest.raises(UserError) as info:
        data.setup("fit")
    n_retain = len((overlapping_source / "retain90.json").read_text().splitlines())
    message = str(info.value)
    assert f"forget record 'forget10.json:3' ({overlapping_source / 'forget10.json'})" in message
    assert f"as record 'retain90.json:{n_retain}' ({overlapping_source / 'retain90.json'})" in message


def test_a_prompt_longer_than_max_length_names_file_and_record(tmp_path, tokenizer_dir):
    """With the record's own id (not a generated ``<file>:<row>``) the message still names the file."""
    path = _jsonl(tmp_path / "train.jsonl", [{"question": "who wrote it", "answer": "someone", "id": "q-17"}])
    data = FineTuneDataModule(tokenizer=tokenizer_dir, source=str(path), max_length=3)
    with pytest.raises(
        UserError,
        match=rf"^{path}: record q-17: prompt is \d+ tokens, no room for the answer within max_length=3$",
    ):
        data.setup("fit")


# -- config values out of range name their key -------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoraSpec(r=0), "adapter.r must be at least 1, got 0"),
        (lambda: LoraSpec(alpha=0), "adapter.alpha must be positive"),
        (lambda: LoraSpec(alpha=-8), "adapter.alpha must be positive"),
        (lambda: LoraSpec(dropout=1.0), r"adapter.dropout must be in \[0, 1\), got 1.0"),
        (lambda: LoraSpec(dropout=-0.1), r"adapter.dropout must be in \[0, 1\), got -0.1"),
        (lambda: LoraSpec(target_modules=[]), "adapter.target_modules is empty"),
        (lambda: ModelSpec(path=" "), "model.path is empty"),
        (lambda: UnlearningDataModule(tokenizer="t", batch_size=0), "data.batch_size must be at least 1, got 0"),
        (lambda: UnlearningDataModule(tokenizer="t", max_length=0), "data.max_length must be at least 1, got 0"),
        (lambda: UnlearningDataModule(tokenizer="t", retain_per_forget=0), "data.retain_per_forget must be at least 1"),
        (lambda: UnlearningDataModule(tokenizer="t", num_workers=-1), "data.num_workers must be at least 0, got -1"),
        (lambda: UnlearningDataModule(tokenizer="t", forget_split="x", retain_split="x"), "data.retain_split is the forget split 'x'"),
        (lambda: FineTuneDataModule(tokenizer="t", max_length=-5), "data.max_length must be at least 1, got -5"),
        (lambda: InfluenceDataModule(tokenizer="t", removed_split="f", batch_size=0), "data.batch_size must be at least 1"),
        (lambda: generate_world(WorldConfig(n_authors=10, n_forget_authors=10)), "data.world.n_forget_authors must be between 1 and data.world.n_authors - 1 .*smaller than the data"),
        (lambda: generate_world(WorldConfig(n_perturbed=0)), "data.world.n_perturbed must be between 1 and"),
        (lambda: DataSettings(eval_limit=-3), "data.eval_limit must be at least 1, got -3"),
        (lambda: Stage(max_epochs=0), "stage.max_epochs must be at least 1, got 0"),
        (lambda: EvalSettings(batch_size=0), "evaluation.batch_size must be at least 1, got 0"),
        (lambda: EvaluateCommand(model="m", limit=0), "evaluate.limit must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_impossible_config_values_name_their_key(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_config_errors_are_also_value_errors():
    """Callers that validate with ``except ValueError`` (and the synthetic tests) keep working."""
    with pytest.raises(ValueError):
        generate_world(WorldConfig(n_authors=10, n_forget_authors=10))


def test_removing_every_training_record_is_refused(tmp_path, world_dir, tokenizer_dir):
    data = InfluenceDataModule(tokenizer=tokenizer_dir, source=str(world_dir), train_split="forget10",
                               removed_split="forget10", max_length=64)  # fmt: skip
    n = len(load_split(world_dir, "forget10"))
    with pytest.raises(
        UserError, match=f"removes all {n} records of the training data .*nothing would be left"
    ):
        data.setup("fit")


def test_find_user_error_digs_out_a_constructor_error_jsonargparse_rewrapped(
    tmp_path, world_dir, tokenizer_dir
):
    """LightningCLI re-raises a data module's UserError as a ValueError listing the whole config;
    find_user_error recovers ours (the CLI prints that one line)."""
    from lightning_unlearn.cli import lightning_main

    config = _fit_config(tmp_path, world_dir, tokenizer_dir, batch_size=0)
    with pytest.raises(Exception) as info:
        lightning_main(["--config", str(config), "--trainer.logger=false"], run=False)
    assert not isinstance(info.value, UserError)  # what jsonargparse raises
    found = find_user_error(info.value)
    assert isinstance(found, ConfigError) and str(found) == "data.batch_size must be at least 1, got 0"
    assert find_user_error(ValueError("unrelated")) is None


# -- models and adapters -------------------------------------------------------------------------


def _save_llama(directory: Path, hidden: int = 32, layers: int = 1) -> Path:
    load_model(ModelSpec(config={**TINY_LLAMA, "hidden_size": hidden, "num_hidden_layers": layers,
                                 "vocab_size": 64})).save_pretrained(directory)  # fmt: skip
    return directory


def _base(hidden: int = 32, layers: int = 1):
    return load_model(
        ModelSpec(config={**TINY_LLAMA, "hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": 64})
    )


def _save_adapter(directory: Path, hidden: int = 32, layers: int = 1, targets=("q_proj", "v_proj")) -> Path:
    lora = LoraConfig(r=2, target_modules=list(targets), task_type="CAUSAL_LM")
    get_peft_model(_base(hidden, layers), lora).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "t5", "d_model": 16, "num_layers": 1, "num_heads": 2, "d_kv": 8, "d_ff": 32, "vocab_size": 64},
         "model_type 't5' is not a causal language model"),
        ({"model_type": "not_a_model"}, "no readable model config .*not_a_model"),
    ],
    ids=["t5", "bogus"],
)  # fmt: skip
def test_model_directory_of_the_wrong_architecture(tmp_path, config, message):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"could not load a causal LM from '{directory}': {message}") as info:
        load_model(ModelSpec(path=str(directory)))
    assert "\n" not in str(info.value)


def test_model_weights_that_do_not_fit_their_config(tmp_path):
    directory = _save_llama(tmp_path / "model", hidden=32)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(
        json.dumps({**config, "hidden_size": 64, "intermediate_size": 128})
    )
    with pytest.raises(
        UserError, match=f"'{directory}': its weights do not fit its config.json \\(tensor shapes differ"
    ):
        load_model(ModelSpec(path=str(directory)))


def test_model_config_of_an_unknown_or_non_causal_type_names_the_key():
    """Refused when the config is read, before a tokenizer is looked up or anything runs."""
    with pytest.raises(
        ConfigError, match="model.config.model_type 'not_a_model' is not a model type transformers knows"
    ):
        ModelSpec(config={"model_type": "not_a_model"}, tokenizer="unused")
    with pytest.raises(ConfigError, match="model.config.model_type 't5' is not a causal language model"):
        ModelSpec(config={"model_type": "t5"}, tokenizer="unused")


def test_model_config_that_cannot_build_names_model_config():
    config = {**TINY_LLAMA, "hidden_size": 30, "num_attention_heads": 4, "vocab_size": 64}  # 30 / 4 heads
    with pytest.raises(
        ConfigError,
        match=r"model.config: The hidden size \(30\) is not a multiple of the number of attention heads \(4\)",
    ):
        load_model(ModelSpec(config=config))


def test_adapter_for_a_wider_base_names_adapter_and_base(tmp_path):
    """Two tiny Llamas of different hidden sizes: peft's size mismatch becomes one line."""
    adapter = _save_adapter(tmp_path / "adapter64", hidden=64)
    with pytest.raises(UserError) as info:
        load_adapter(_base(hidden=32), str(adapter))
    message = str(info.value)
    assert message.startswith(f"adapter '{adapter}' does not fit the base model a model built from config "
                              "(llama, hidden_size 32, 1 layers): size mismatch")  # fmt: skip
    assert "torch.Size([2, 64])" in message and "\n" not in message


def test_adapter_for_a_deeper_base_is_refused_not_silently_truncated(tmp_path):
    """peft itself loads a 2-layer adapter onto a 1-layer base without a word, dropping layer 1."""
    adapter = _save_adapter(tmp_path / "deep", layers=2)
    with pytest.raises(UserError, match=r"was saved for another base model than .*1 layers\): it has "
                                        r"'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight'.* "
                                        r"\(4 tensors without a place, 0 missing\)"):  # fmt: skip
        load_adapter(_base(layers=1), str(adapter))
    shallow = _save_adapter(tmp_path / "shallow", layers=1)
    with pytest.raises(
        UserError,
        match=r"it lacks 'base_model.model.model.layers.1.*\(0 tensors without a place, 4 missing\)",
    ):
        load_adapter(_base(layers=2), str(shallow))


def test_adapter_targeting_modules_the_base_lacks(tmp_path):
    adapter = _save_adapter(tmp_path / "gpt2ish")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(UserError, match=f"adapter '{adapter}' does not fit .*c_attn.* not found"):
        load_adapter(_base(), str(adapter))


def test_adapter_directory_without_config_is_named_not_looked_up_on_the_hub(tmp_path):
    adapter = _save_adapter(tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(
        UserError, match=f"'{adapter}' is not a saved peft adapter: 'adapter_config.json' is missing"
    ):
        load_adapter(_base(), str(adapter))
    (adapter / "adapter_config.json").write_text("{oops")
    with pytest.raises(UserError, match="adapter_config.json' is not valid JSON"):
        load_adapter(_base(), str(adapter))


def test_a_good_adapter_still_loads(tmp_path):
    adapter = _save_adapter(tmp_path / "adapter")
    model = load_adapter(_base(), str(adapter))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2


# -- end to end: python -m lightning_unlearn, exit 2, one line, nothing written ---------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_unlearn", *args], capture_output=True, text=True, env=env
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and the error is one line that names every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lightning-unlearn: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _fit_config(tmp_path: Path, world_dir: Path, tokenizer_dir: str, **data) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 1, "accelerator": "cpu", "enable_checkpointing": False, "enable_progress_bar": False,
                    "logger": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning_unlearn.callbacks.ExportModel",
                                   "init_args": {"dirpath": str(tmp_path / "out")}}]},
        "model": {"class_path": "lightning_unlearn.objectives.GradDiff",
                  "init_args": {"model": {"config": TINY_LLAMA, "tokenizer": tokenizer_dir}}},
        "data": {"class_path": "lightning_unlearn.data.datamodule.UnlearningDataModule",
                 "init_args": {"tokenizer": tokenizer_dir, "source": str(world_dir), "forget_split": "forget10",
                               "retain_split": "retain90", "max_length": 64, "batch_size": 2, **data}},
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_fit_refuses_forget_records_in_the_retain_set(tmp_path, overlapping_source, tokenizer_dir):
    config = _fit_config(tmp_path, overlapping_source, tokenizer_dir)
    assert_user_error(
        run_cli("fit", "--config", str(config)),
        f"forget record 'forget10.json:3' ({overlapping_source / 'forget10.json'})",
        f"({overlapping_source / 'retain90.json'})",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fit_refuses_duplicate_ids(tmp_path, world_dir, tokenizer_dir):
    source = tmp_path / "dups"
    shutil.copytree(world_dir, source, ignore=shutil.ignore_patterns("tokenizer"))
    rows = [json.loads(line) for line in (source / "forget10.json").read_text().splitlines()]
    rows[0]["id"], rows[4]["id"] = "author-1", "author-1"
    _jsonl(source / "forget10.json", rows)
    config = _fit_config(tmp_path, source, tokenizer_dir)
    assert_user_error(
        run_cli("fit", "--config", str(config)),
        f"{source / 'forget10.json'}: row 5: id 'author-1' is also the id of row 1",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evaluate_refuses_an_adapter_for_another_base(tmp_path, world_dir):
    base = _save_llama(tmp_path / "base", hidden=32)
    shutil.copytree(world_dir / "tokenizer", base, dirs_exist_ok=True)
    adapter = _save_adapter(tmp_path / "adapter64", hidden=64)
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--model", str(base), "--adapter", str(adapter), "--source", str(world_dir),
                     "--splits", "{forget: forget10_perturbed}", "--out_dir", str(out))  # fmt: skip
    assert_user_error(result, f"adapter '{adapter}' does not fit the base model '{base}'", "size mismatch")
    assert not out.exists()


@pytest.mark.slow
def test_fit_config_value_out_of_range_is_one_line(tmp_path, world_dir, tokenizer_dir):
    config = _fit_config(tmp_path, world_dir, tokenizer_dir, retain_per_forget=0)
    assert_user_error(
        run_cli("fit", "--config", str(config)), "data.retain_per_forget must be at least 1, got 0"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fit_unknown_config_key_is_refused_by_the_parser(tmp_path, world_dir, tokenizer_dir):
    """jsonargparse refuses unknown keys itself: exit 2, no traceback, the key named."""
    config = _fit_config(tmp_path, world_dir, tokenizer_dir, bogus_key=3)
    result = run_cli("fit", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bogus_key" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fit_refuses_a_malicious_checkpoint(tmp_path, world_dir, tokenizer_dir):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Payload()}, evil)
    config = _fit_config(tmp_path, world_dir, tokenizer_dir)
    try:
        assert_user_error(
            run_cli("fit", "--config", str(config), "--ckpt_path", str(evil)), f"refusing to load '{evil}'"
        )
    finally:
        assert not marker.exists(), "the malicious checkpoint ran"
    assert not (tmp_path / "out").exists()
