"""Evaluator: scores and generates over the evaluation splits and returns a Report.

Every answer variant of a question (answer, paraphrase, perturbed answers) is scored in the same
forward pass, packed as a prefix tree so that the prompt and any shared answer start run once
(``metrics/prefix_tree.py``). The greedy answers of every split are decoded together in large
left-padded batches from which each answer drops out at its EOS (``metrics/greedy.py``). With
``fast=False`` the Evaluator runs the straightforward passes instead (each variant padded and
scored in full, ``generate`` per batch of questions of a split), which the fast ones are tested
against: per-sample scores agree to float rounding and the greedy answers are the same.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.data.formatting import PromptFormat, encode, encode_prompt
from lightning_unlearn.data.records import validate_record
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.distributed import gather_rows, shard_indices
from lightning_unlearn.errors import UserError
from lightning_unlearn.logits import decoder_and_head, soft_capped
from lightning_unlearn.losses import IGNORE_INDEX, mean_token_nll
from lightning_unlearn.metrics.closer_look import closer_look_fe, closer_look_mu
from lightning_unlearn.metrics.generation import (
    CLOSER_LOOK_PREMISE,
    CosineSimilarity,
    EntailmentScore,
    text_token_entropy,
)
from lightning_unlearn.metrics.greedy import (
    cache_bytes_per_row,
    greedy_decode,
    plain_greedy,
    similar_length_groups,
)
from lightning_unlearn.metrics.memorisation import (
    exact_memorization,
    extraction_strength,
    mia_auc,
    mia_gap,
    mia_loss,
    mia_min_k,
    mia_min_k_plus_plus,
    mia_zlib,
    privleak,
)
from lightning_unlearn.metrics.prefix_tree import (
    PrefixTree,
    build_prefix_tree,
    can_pack,
    first_variant_logits,
    node_logits,
    scored_pairs,
    tree_batch,
    variant_nll,
)
from lightning_unlearn.metrics.tofu import (
    answer_probability,
    forget_quality,
    forget_quality_holdout,
    forget_truth_ratio,
    model_utility,
    prob_normalised,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)
from lightning_unlearn.report import Report
from lightning_unlearn.sharding import is_sharded

ROLES = {
    "forget": "forget",
    "retain": "retain",
    "real_authors": "ra",
    "world_facts": "wf",
    "holdout": "holdout",
}
MIA_SCORES = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")
# Key/value cache a fast decode may fill when generation_batch_size is None: the decode
# preallocates it for its whole length, so this bounds its memory.
GENERATION_CACHE_BYTES = 2 << 30
# Roles whose truth ratio takes the paraphrased answer as the correct side (TOFU-style authors).
PARAPHRASE_ROLES = ("forget", "retain", "holdout")
# The MIA score whose AUC privleak and mia_gap use (open-unlearning's choice for privleak).
MIA_GAP_SCORE = "mia_min_k"


def load_eval_splits(source: str, splits: dict[str, str], limit: int | None = None) -> dict[str, list[dict]]:
    """Role -> the first ``limit`` records of its split, from a local directory or a hub id."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    resolved = Path(source) if Path(source).exists() else source
    return {role: load_split(resolved, name)[:limit] for role, name in splits.items()}


def _world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only at the positions that predict an answer token, with matching labels.

    Scoring needs no logits elsewhere, and at a 50k vocabulary the full ``[B, T, V]`` tensor of
    every variant of a batch of questions is large (16 TOFU questions: 112 sequences x 113
    positions x 49,152 = 2.5 GB in float32; about a third of those positions are answers). The
    body runs once over the padded batch; the output projection runs on the gathered answer
    positions only. Returns ``(logits [B, L+1, V], labels [B, L+1])`` in the usual shifted
    convention (label 0 is -100), so every per-sequence function of ``losses.py`` and
    ``metrics/`` applies unchanged. Models without a separable body and head use the full logits,
    and so do FSDP2-sharded ones: their embeddings, final norm and head are gathered only by a
    forward of the whole model.
    """
    labels = batch["labels"]
    decoder, head = decoder_and_head(model)
    if decoder is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    scored = labels[:, 1:] != IGNORE_INDEX  # position t predicts label t + 1
    counts = scored.sum(1)
    width = int(counts.max()) + 1
    # Scored positions first, in order (a stable sort of "not scored"), then an unused slot.
    order = torch.argsort((~scored).to(torch.int8), dim=1, stable=True)[:, : width - 1]
    order = torch.cat([order, torch.zeros_like(order[:, :1])], dim=1)
    gathered = hidden[:, :-1].gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
    logits = soft_capped(model, head(gathered))
    targets = labels[:, 1:].gather(1, order[:, :-1])
    targets = targets.masked_fill(
        torch.arange(width - 1, device=labels.device) >= counts[:, None], IGNORE_INDEX
    )
    compact = torch.cat([torch.full_like(targets[:, :1], IGNORE_INDEX), targets], dim=1)
    return logits, compact


class Evaluator:
    """Evaluate a causal LM on TOFU-style splits.

    Args:
        tokenizer: the model's tokenizer.
        splits: role (``forget``, ``retain``, ``real_authors``, ``world_facts``, ``holdout``) ->
            records; an absent role's metrics are absent. ``forget`` with ``holdout`` adds the
            metrics that need no retain model: the MIA AUCs, ``mia_gap`` and
            ``forget_quality_holdout`` (see ``_against_holdout``).
        prompt_format: the format the model was trained with.
        batch_size: questions per forward (each with all of its answer variants).
        max_new_tokens: generation budget for ROUGE.
        generation_batch_size: prompts decoded together (every split's, longest prompt first);
            finished answers leave the batch, so a large one costs little more per step than a
            small one on a CPU. None: as many as a key/value cache of ``GENERATION_CACHE_BYTES``
            holds (SmolLM2 at 200 new tokens: about 190 prompts; Llama-2-7B in bf16: 15), and at
            least ``batch_size``.
        retain_truth_ratios: the retain model's per-sample forget truth ratios, or a path to its
            report, for ``forget_quality`` (and its min-k MIA AUC, for ``privleak``).
        retain_mia_auc: the retain model's min-k AUC, for ``privleak`` (with a ``holdout`` split).
        cosine_model: a sentence-transformers model (name or path) for closer-look's cosine
            similarity, e.g. ``paraphrase-MiniLM-L6-v2``; None skips the metric.
        nli_model: an NLI classifier (name or path) for closer-look's entailment score, e.g.
            ``sileod/deberta-v3-base-tasksource-nli``; None skips it. A model that cannot be
            loaded is an error, never a skip.
        distributed: under torch.distributed, shard the work across ranks (every rank must call
            ``run``); False evaluates everything on the calling rank.
        fast: score prefix-packed variants and decode with finished answers dropping out (see the
            module docstring); False runs the straightforward passes they are checked against.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        splits: dict[str, list[dict]],
        prompt_format: PromptFormat | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 200,
        retain_truth_ratios: Sequence[float] | str | Path | None = None,
        max_length: int = 512,
        progress: bool = True,
        retain_mia_auc: float | None = None,
        cosine_model: str | None = None,
        nli_model: str | None = None,
        distributed: bool = True,
        generation_batch_size: int | None = None,
        fast: bool = True,
    ) -> None:
        unknown = set(splits) - set(ROLES)
        if unknown:
            raise UserError(f"unknown evaluation role(s) {sorted(unknown)}: choose from {', '.join(ROLES)}")
        self.tokenizer, self.splits = tokenizer, splits
        self.prompt_format = prompt_format or PromptFormat()
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length
        self.progress, self.distributed = progress, distributed
        if generation_batch_size is not None and generation_batch_size < 1:
            raise UserError(f"generation_batch_size must be at least 1, got {generation_batch_size}")
        self.generation_batch_size, self.fast = generation_batch_size, fast
        self._packing: bool | None = None  # whether prefix packing scores as plain does (per run)
        if isinstance(retain_truth_ratios, (str, Path)):
            retain_report = Report.load(retain_truth_ratios)
            retain_truth_ratios = retain_report.per_sample.get("forget_truth_ratio")
            if retain_truth_ratios is None:
                raise UserError("the retain model's report has no per-sample 'forget_truth_ratio'")
            retain_mia_auc = retain_report.metrics.get("mia_min_k", retain_mia_auc)
        self.retain_mia_auc = retain_mia_auc
        # Loaded here so a missing model fails before any scoring.
        self.cosine = CosineSimilarity(cosine_model) if cosine_model else None
        self.entailment = EntailmentScore(nli_model) if nli_model else None
        self.retain_truth_ratios = retain_truth_ratios
        for role, records in splits.items():
            if not records:
                raise UserError(f"evaluation split '{role}' is empty")
            for record in records:
                validate_record(
                    record, f"{role} record {record.get('id', '?')}", self.required_fields(role, records)
                )

    @staticmethod
    def required_fields(role: str, records: list[dict]) -> tuple[str, ...]:
        """Truth-ratio fields are needed on every record once any record of the split has them."""
        if not any("perturbed_answer" in r for r in records):
            return ()
        return (
            ("perturbed_answer", "paraphrased_answer") if role in PARAPHRASE_ROLES else ("perturbed_answer",)
        )

    # -- model passes -----------------------------------------------------------------------
    def _batches(self, items: list, desc: str, size: int | None = None):
        size = size or self.batch_size
        starts = range(0, len(items), size)
        return (items[i : i + size] for i in tqdm(starts, desc=desc, disable=not self.progress, leave=False))

    def score(
        self, model, records: list[dict], variants: list[list[str]], desc: str = "score", extras: bool = False
    ) -> tuple[list[list[float]], dict[str, list[float]]]:
        """avgNLL of every answer variant of every record, all variants of a batch in one forward;
        with ``extras``, the memorisation and MIA scores of each record's first variant from the
        same forward (``exact_memorization``, ``extraction_strength``, ``mia_*``). Under
        torch.distributed each rank scores a shard and the values are gathered (torchmetrics)."""
        rank, world = _world()
        if world == 1 or not self.distributed:
            return self._score_local(model, records, variants, desc, extras)
        shard = shard_indices(len(records), rank, world)
        nll, extra = self._score_local(
            model, [records[i] for i in shard], [variants[i] for i in shard], desc, extras
        )
        width = max(len(v) for v in variants)
        columns = [row + [math.nan] * (width - len(row)) for row in nll]
        names = sorted(extra)
        table = torch.tensor([c + [extra[n][j] for n in names] for j, c in enumerate(columns)])
        full = gather_rows(shard, table, len(records), next(model.parameters()).device)
        nll_all = [full[i, : len(variants[i])].tolist() for i in range(len(records))]
        return nll_all, {n: full[:, width + k].tolist() for k, n in enumerate(names)}

    def _encode_variants(self, record: dict, answers: list[str]) -> list[dict[str, list[int]]]:
        where = f"record {record.get('id')}"
        return [
            encode(record["question"], a, self.tokenizer, self.prompt_format, self.max_length, where)
            for a in answers
        ]

    @torch.no_grad()
    def _score_local(
        self, model, records: list[dict], variants: list[list[str]], desc: str, extras: bool
    ) -> tuple[list[list[float]], dict[str, list[float]]]:
        encoded = [self._encode_variants(r, a) for r, a in zip(records, variants, strict=True)]
        if self.fast and can_pack(model) and self._packing is not False:
            nll, extra = self._score_packed(model, encoded, desc, extras)
            if self._packing_agrees(model, encoded[0][:2], nll[0][:2]):
                return nll, extra
        return self._score_plain(model, encoded, desc, extras)

    def _packing_agrees(self, model, variants: list[dict[str, list[int]]], packed: list[float]) -> bool:
        """Once per run, a question's first two answers scored in full as well: prefix packing
        relies on the model taking position ids and a 4D mask as given (true of rotary and
        learned-position decoders under sdpa or eager attention). An architecture that does not
        (ALiBi biases built from a 2D mask) scores the packed trees differently (far beyond
        rounding, which the tolerance leaves room for under bf16), and is scored in full."""
        if self._packing is None:
            plain, _ = self._score_plain(model, [variants], "check packing", extras=False)
            agrees = torch.allclose(torch.tensor(packed), torch.tensor(plain[0]), rtol=2e-2, atol=2e-2)
            self._packing = self._everywhere(agrees, next(model.parameters()).device)
            if not self._packing:
                warnings.warn(
                    f"prefix-packed scoring disagrees with plain scoring on this model ({packed} vs "
                    f"{plain[0]}): scoring every answer in full instead",
                    stacklevel=2,
                )
        return self._packing

    def _score_packed(
        self, model, encoded: list[list[dict[str, list[int]]]], desc: str, extras: bool
    ) -> tuple[list[list[float]], dict[str, list[float]]]:
        """Every question's variants as one prefix tree per row, in batches of up to
        ``batch_size`` trees of similar size (padding under a tenth of a batch; fixed batches of 8
        sorted trees padded TOFU's by 17%), results put back in question order. A sharded model
        needs every rank in each forward, so there every rank runs ceil(shard / batch_size)
        batches. A variant's last token predicts nothing and ends its path: the trees leave it out."""
        trees = [build_prefix_tree([v["input_ids"][:-1] for v in q]) for q in encoded]
        batches = similar_length_groups([len(t.tokens) for t in trees], max_size=self.batch_size)
        if is_sharded(model):
            order = [i for batch in batches for i in batch]
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        nll: list[list[float]] = [[] for _ in encoded]
        extra_rows: list[dict[str, float]] = [{} for _ in encoded]
        for chunk in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            values, chunk_extra = self._score_trees(
                model, [trees[i] for i in chunk], [encoded[i] for i in chunk], extras
            )
            for j, i in enumerate(chunk):
                nll[i] = values[j]
                extra_rows[i] = {name: column[j] for name, column in chunk_extra.items()}
        names = list(extra_rows[0]) if extras else []
        return nll, {name: [row[name] for row in extra_rows] for name in names}

    def _score_trees(
        self, model, trees: list[PrefixTree], encoded: list[list[dict[str, list[int]]]], extras: bool
    ) -> tuple[list[list[float]], dict[str, list[float]]]:
        """One forward over a batch of prefix trees: each variant's mean NLL, and with ``extras``
        the memorisation and MIA scores of each question's first variant."""
        pairs = scored_pairs(trees, [[v["labels"] for v in q] for q in encoded])
        batch = tree_batch(trees, self.tokenizer.pad_token_id, model)
        logits = node_logits(model, batch, pairs.nodes)
        flat = variant_nll(logits, pairs, sum(len(q) for q in encoded)).tolist()
        values, start = [], 0
        for q in encoded:
            values.append(flat[start : start + len(q)])
            start += len(q)
        if not extras:
            return values, {}
        return values, self._extras(*first_variant_logits(logits, pairs))

    @torch.no_grad()
    def _score_plain(
        self, model, encoded: list[list[dict[str, list[int]]]], desc: str, extras: bool
    ) -> tuple[list[list[float]], dict[str, list[float]]]:
        """Each variant padded and scored in full, questions in split order."""
        device = next(model.parameters()).device
        out: list[list[float]] = []
        extra: dict[str, list[float]] = {}
        for chunk in self._batches(encoded, desc):
            feats = [variant for question in chunk for variant in question]
            owners = [k for k, question in enumerate(chunk) for _ in question]
            batch = {k: v.to(device) for k, v in pad_batch(feats, self.tokenizer.pad_token_id).items()}
            logits, labels = answer_logits(model, batch)
            nll = mean_token_nll(logits, labels).tolist()
            grouped: list[list[float]] = [[] for _ in chunk]
            for owner, value in zip(owners, nll, strict=True):
                grouped[owner].append(value)
            out.extend(grouped)
            if extras:
                first = [owners.index(k) for k in range(len(chunk))]
                for name, values in self._extras(logits[first], labels[first]).items():
                    extra.setdefault(name, []).extend(values)
        return out, extra

    def _everywhere(self, flag: bool, device: torch.device) -> bool:
        """``flag`` on every rank (when sharding work across ranks), so that ranks take the same
        path: a sharded model needs every rank in each forward."""
        if _world()[1] == 1 or not self.distributed:
            return flag
        value = torch.tensor(float(flag), device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def _extras(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
        texts = [
            self.tokenizer.decode(row[row != IGNORE_INDEX].tolist(), skip_special_tokens=True)
            for row in labels
        ]
        return {
            "exact_memorization": exact_memorization(logits, labels).tolist(),
            "extraction_strength": extraction_strength(logits, labels).tolist(),
            "mia_loss": mia_loss(logits, labels).tolist(),
            "mia_zlib": mia_zlib(logits, labels, texts).tolist(),
            "mia_min_k": mia_min_k(logits, labels).tolist(),
            "mia_min_k_plus_plus": mia_min_k_plus_plus(logits, labels).tolist(),
        }

    def generate(self, model, records: list[dict], desc: str = "generate") -> list[str]:
        """Greedy answers, batched with left padding; each stops at EOS or ``max_new_tokens``.
        Under torch.distributed each rank generates a shard and the texts are gathered."""
        rank, world = _world()
        if world == 1 or not self.distributed:
            return self._generate_local(model, records, desc)
        shard = shard_indices(len(records), rank, world)
        texts = self._generate_local(model, [records[i] for i in shard], desc, synced=True)
        local = list(zip(shard, texts, strict=True))
        everyone: list = [None] * world
        torch.distributed.all_gather_object(everyone, local)
        ordered: list[str] = [""] * len(records)
        for part in everyone:
            for i, text in part:
                ordered[i] = text
        return ordered

    @torch.no_grad()
    def _generate_local(self, model, records: list[dict], desc: str, synced: bool = False) -> list[str]:
        """Greedy answers in record order. Fast: longest prompts first in batches of
        ``generation_batch_size`` (similar lengths pad little), decoded by ``greedy_decode``
        unless the model's generation config adds processors; else ``generate`` per batch of
        ``batch_size`` in record order."""
        prompts = [
            encode_prompt(r["question"], self.tokenizer, self.prompt_format, self.max_length) for r in records
        ]
        if not self.fast:
            return self._decode(model, prompts, desc, self.batch_size, synced, loop=False)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        size = self._generation_rows(model, max(len(p) for p in prompts))
        texts = self._decode(model, [prompts[i] for i in order], desc, size, synced, plain_greedy(model))
        ordered = [""] * len(prompts)
        for i, text in zip(order, texts, strict=True):
            ordered[i] = text
        return ordered

    def _generation_rows(self, model, prompt_length: int) -> int:
        """Prompts per decode: ``generation_batch_size``, or as many as the cache budget holds."""
        if self.generation_batch_size is not None:
            return self.generation_batch_size
        per_row = cache_bytes_per_row(model, prompt_length + self.max_new_tokens)
        return max(self.batch_size, GENERATION_CACHE_BYTES // per_row) if per_row else self.batch_size

    def _decode(
        self, model, prompts: list[list[int]], desc: str, size: int, synced: bool, loop: bool
    ) -> list[str]:
        """Texts of the greedy continuations, ``size`` prompts at a time, through ``greedy_decode``
        (``loop``) or ``generate``; stripped, special tokens skipped."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        texts: list[str] = []
        for chunk in self._batches(prompts, desc, size):
            if loop:
                tokens = greedy_decode(model, chunk, eos, pad, self.max_new_tokens, synced=synced)
            else:
                tokens = self._generate(model, chunk, synced)
            texts += [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        return texts

    def _generate(self, model, prompts: list[list[int]], synced: bool) -> list[list[int]]:
        """Hugging Face ``generate`` on one left-padded batch: the new tokens of each row."""
        device = next(model.parameters()).device
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        features = [{"input_ids": p} for p in prompts]
        batch = {
            k: v.to(device) for k, v in pad_batch(features, self.tokenizer.pad_token_id, side="left").items()
        }
        # synced: ranks step together until all finish (sharded models need every rank).
        generated = model.generate(**batch, generation_config=config, synced_gpus=synced)
        return generated[:, batch["input_ids"].shape[1] :].tolist()

    # -- metrics ----------------------------------------------------------------------------
    def run(self, model) -> Report:
        """Evaluate ``model`` on every configured split."""
        was_training = model.training
        model.eval()
        report = Report(settings={"batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens})
        self._packing = None
        try:
            generated = self._generate_all(model)
            for role, records in self.splits.items():
                if role != "holdout":
                    self._evaluate_role(model, role, records, report, generated.get(role))
            if "holdout" in self.splits and "forget" in self.splits:
                self._against_holdout(model, report)
        finally:
            model.train(was_training)
        utility, components = model_utility(report.metrics)
        if components:
            report.metrics["model_utility"] = utility
            report.settings["model_utility_components"] = components
        # Closer-look's aggregates beside open-unlearning's, over the components measured.
        for name, aggregate in (("closer_look_MU", closer_look_mu), ("closer_look_FE", closer_look_fe)):
            value, used = aggregate(report.metrics)
            if used:
                report.metrics[name] = value
                report.settings[f"{name}_components"] = used
        return report

    def _generate_all(self, model) -> dict[str, list[str]]:
        """Every generating split's greedy answers. Fast: all splits' prompts in one decode, so
        that its large batches are not cut at each split's end; else split by split."""
        roles = [role for role in self.splits if role != "holdout"] if self.max_new_tokens > 0 else []
        if not self.fast:
            return {role: self.generate(model, self.splits[role], desc=f"generate {role}") for role in roles}
        records = [r for role in roles for r in self.splits[role]]
        texts = self.generate(model, records, desc="generate") if records else []
        out, start = {}, 0
        for role in roles:
            out[role] = texts[start : start + len(self.splits[role])]
            start += len(self.splits[role])
        return out

    def _against_holdout(self, model, report: Report) -> None:
        """The same model on forget vs holdout questions (authors never trained on), which needs
        no retain model: each MIA score's AUC (forget = members), ``mia_gap`` = |min-k AUC - 0.5|,
        ``forget_quality_holdout`` (KS p-value of a per-question statistic, see
        ``_holdout_statistic``), and privleak against the retain model's min-k AUC when known."""
        holdout = self.splits["holdout"]
        with_tr = bool(self.required_fields("holdout", holdout)) and "forget_truth_ratio" in report.per_sample
        variants = [
            [r["answer"]] + ([r["paraphrased_answer"], *r["perturbed_answer"]] if with_tr else [])
            for r in holdout
        ]
        nll, extra = self.score(model, holdout, variants, desc="score holdout", extras=True)
        for name in MIA_SCORES:
            report.per_sample[f"holdout_{name}"] = extra[name]
            report.metrics[name] = mia_auc(report.per_sample[f"forget_{name}"], extra[name])
        report.metrics["mia_gap"] = mia_gap(report.metrics[MIA_GAP_SCORE])
        if self.retain_mia_auc is not None:
            report.metrics["privleak"] = privleak(report.metrics[MIA_GAP_SCORE], self.retain_mia_auc)
        prob = answer_probability(torch.tensor([v[0] for v in nll]))
        report.per_sample["holdout_Q_A_Prob"] = prob.tolist()
        report.metrics["holdout_Q_A_Prob"] = prob.mean().item()
        if with_tr:
            if len({len(v) for v in nll}) != 1:
                raise UserError("split 'holdout': every record needs the same number of perturbed answers")
            tr = truth_ratio(torch.tensor([v[1] for v in nll]), torch.tensor([v[2:] for v in nll]))
            report.per_sample["holdout_truth_ratio"] = tr.tolist()
        statistic = self._holdout_statistic(with_tr)
        report.metrics["forget_quality_holdout"] = forget_quality_holdout(
            report.per_sample[f"forget_{statistic}"], report.per_sample[f"holdout_{statistic}"]
        )
        report.settings["forget_quality_holdout_statistic"] = statistic
        report.settings["mia_gap_score"] = MIA_GAP_SCORE

    @staticmethod
    def _holdout_statistic(with_tr: bool) -> str:
        """The per-question statistic ``forget_quality_holdout`` compares: ``truth_ratio`` when the
        holdout records carry paraphrased and perturbed answers (the statistic ``forget_quality``
        tests, so the two agree in kind), else ``Q_A_Prob`` (exp of minus the answer's mean token
        NLL), the one statistic that question-and-answer-only holdout splits (TOFU's holdout01/05/
        10, the synthetic world's) allow. Both are length-normalised, so answers of different
        lengths compare; KS is rank-based, so Q_A_Prob and the mean NLL give the same p-value."""
        return "truth_ratio" if with_tr else "Q_A_Prob"

    def _evaluate_role(
        self, model, role: str, records: list[dict], report: Report, generated: list[str] | None
    ) -> None:
        prefix = ROLES[role]
        has_tr = bool(self.required_fields(role, records))
        variants = []
        for r in records:
            answers = [r["answer"]]
            if has_tr:
                answers += ([r["paraphrased_answer"]] if role in PARAPHRASE_ROLES else []) + list(
                    r["perturbed_answer"]
                )
            variants.append(answers)
        nll, extra = self.score(model, records, variants, desc=f"score {role}", extras=role == "forget")
        for name in ("exact_memorization", "extraction_strength"):
            if name in extra:
                report.per_sample[f"forget_{name}"] = extra[name]
                report.metrics[f"forget_{name}"] = sum(extra[name]) / len(extra[name])
        for name in MIA_SCORES:
            if name in extra:
                report.per_sample[f"forget_{name}"] = extra[name]
        answer_nll = torch.tensor([v[0] for v in nll])
        if role in PARAPHRASE_ROLES:
            prob = answer_probability(answer_nll)
            report.per_sample[f"{prefix}_Q_A_Prob"] = prob.tolist()
            report.metrics[f"{prefix}_Q_A_Prob"] = prob.mean().item()
        if has_tr:
            offset = 2 if role in PARAPHRASE_ROLES else 1
            correct = torch.tensor([v[offset - 1] for v in nll])
            n_perturbed = {len(v) - offset for v in nll}
            if len(n_perturbed) != 1:
                raise UserError(f"split '{role}': every record needs the same number of perturbed answers")
            perturbed = torch.tensor([v[offset:] for v in nll])
            tr = truth_ratio(correct, perturbed)
            if role == "forget":
                report.per_sample["forget_truth_ratio"] = tr.tolist()
                report.metrics["forget_truth_ratio"] = forget_truth_ratio(tr)
                if self.retain_truth_ratios is not None:
                    report.metrics["forget_quality"] = forget_quality(tr.tolist(), self.retain_truth_ratios)
            else:
                report.per_sample[f"{prefix}_Truth_Ratio"] = tr.tolist()
                report.metrics[f"{prefix}_Truth_Ratio"] = truth_ratio_score(tr)
            if role not in PARAPHRASE_ROLES:
                normalised = prob_normalised(answer_nll, perturbed)
                report.per_sample[f"{prefix}_Q_A_Prob_normalised"] = normalised.tolist()
                report.metrics[f"{prefix}_Q_A_Prob_normalised"] = normalised.mean().item()
        if generated is not None:
            references = [r["answer"] for r in records]
            rouge = rouge_l_recall(generated, references)
            per_sample = {
                "Q_A_ROUGE": rouge,
                "token_entropy": [text_token_entropy(self.tokenizer, g) for g in generated],
            }
            if self.cosine is not None:
                per_sample["cosine_similarity"] = self.cosine.per_sample(generated, references)
            if self.entailment is not None:
                premise = CLOSER_LOOK_PREMISE.get(role, "generated")
                per_sample["entailment_score"] = self.entailment.per_sample(
                    generated, references, premise, rouge
                )
            for name, values in per_sample.items():
                report.per_sample[f"{prefix}_{name}"] = values
                report.metrics[f"{prefix}_{name}"] = sum(values) / len(values)
            report.generations[role] = [
                {"question": r["question"], "answer": r["answer"], "generated": g}
                for r, g in zip(records, generated, strict=True)
            ]
