"""Any lm-evaluation-harness task on our models (optional: ``pip install 'lightning-unlearn[lmeval]'``).

A thin wrapper: lm-eval's ``HFLM`` around a loaded model object and its tokenizer, then
``simple_evaluate``. ``local_task`` turns one of lm-eval's own multiple-choice templates (WMDP,
MMLU) into a task over a local file, for machines without hub access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_unlearn.errors import UserError

# lm-eval's task folders holding a template of each kind, and the file with its description.
TEMPLATES = {
    "wmdp": ("wmdp/_default_template_yaml", "wmdp/wmdp_{subject}.yaml"),
    "mmlu": ("mmlu/default/_default_template_yaml", "mmlu/default/mmlu_{subject}.yaml"),
}


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'lightning-unlearn[lmeval]'") from None
    return lm_eval, HFLM


def local_task(kind: str, data_file: str | Path, subject: str, name: str | None = None) -> dict[str, Any]:
    """lm-eval's ``kind`` (``wmdp`` or ``mmlu``) template with the description of ``subject``
    (``bio``, ``cyber``, ``chem`` for WMDP; an MMLU subject such as ``anatomy``), reading the
    questions of ``data_file`` (JSON Lines or a JSON array with question, choices, answer)."""
    import yaml

    if kind not in TEMPLATES:
        raise UserError(f"unknown template {kind!r}: choose from {', '.join(TEMPLATES)}")
    lm_eval, _ = _lm_eval()
    tasks = Path(lm_eval.__file__).parent / "tasks"
    template, described = TEMPLATES[kind]
    config = yaml.safe_load((tasks / template).read_text())
    subject_file = tasks / described.format(subject=subject)
    if not subject_file.is_file():
        raise UserError(f"lm-eval has no {kind} task for subject {subject!r} ({subject_file.name})")
    config.update(
        task=name or f"local_{kind}_{subject}",
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {config["test_split"]: str(data_file)}},
        description=yaml.safe_load(subject_file.read_text())["description"],
    )
    for key in ("fewshot_split", "fewshot_config", "tag"):
        config.pop(key, None)
    return config


def run_lm_eval(
    model, tokenizer, tasks: list[str | dict], batch_size: int = 8, device: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` (names such as ``wmdp_bio``, ``mmlu``, or task
    dicts such as ``local_task``'s) on ``model`` as it is in memory; ``kwargs`` go to
    ``simple_evaluate`` (``limit``, ``num_fewshot``, ``log_samples`` ...). Returns its results."""
    lm_eval, HFLM = _lm_eval()
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, **kwargs)
    if results is None:  # a non-zero rank under torch.distributed
        return {}
    return results
