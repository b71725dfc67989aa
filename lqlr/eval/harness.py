"""lm-evaluation-harness on an lqlr model: zero/few-shot task metrics through ``lm_eval.simple_evaluate``.

The export is loaded the transformers way (``AutoModelForCausalLM.from_pretrained`` with lqlr's
quantizer registered, so the linears stay packed QLRLinear modules), wrapped by lm-eval's own HF
wrapper ``HFLM(pretrained=model, tokenizer=tokenizer)``, and evaluated by ``simple_evaluate``; the
numbers are lm-eval's, unchanged. Tasks are lm-eval's task names (``hellaswag``, ``arc_easy``, glob
patterns such as ``"arc_*"``; their data come from the hub) or tasks of your own: a folder of task
YAML files passed as ``include_path``.

lm-eval is an optional dependency: ``pip install "lqlr[eval]"``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger("lqlr")

NEEDS_LM_EVAL = "lm-eval is not installed: pip install 'lqlr[eval]' (or pip install 'lm-eval>=0.4')"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(NEEDS_LM_EVAL) from err
    return lm_eval, HFLM, TaskManager


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if not names:
        raise ValueError("no lm-eval task given: pass task names, e.g. tasks=['hellaswag', 'arc_easy']")
    return [str(t) for t in names]


def _resolve_tasks(names: list[str], manager) -> list[str]:
    """Task names as lm-eval's own CLI resolves them: known names and glob patterns, or YAML files."""
    out, unknown = [], []
    for name in names:
        if name in manager.all_tasks or Path(name).is_file():
            out.append(name)
        elif matched := manager.match_tasks([name]):
            out.extend(m for m in matched if m not in out)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: check the names (lm-eval ls tasks) or pass "
                         "include_path= the folder of your own task YAML files")
    return out


def _metrics(task_result: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``"acc,none": 0.3, "acc_stderr,none": "N/A"`` as ``"acc": 0.3, "acc_stderr": None``
    (a filter other than ``none`` stays in the name: ``"exact_match,strict-match"``)."""
    out = {}
    for key, value in task_result.items():
        if key in ("name", "alias", "sample_len"):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = None if value == "N/A" else value
    return out


def lm_eval_model(model: nn.Module, tokenizer, tasks: str | Sequence[str], num_fewshot: int | None = None,
                  limit: float | None = None, batch_size: int | str = 1,
                  include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (any causal LM, e.g. a packed lqlr model) and return
    ``{"results": {task: {metric: value, "n_samples": n, "num_fewshot": k}}, "config": {...}}``.

    ``tasks``: lm-eval task/group names or glob patterns (a list, or one comma-separated string).
    ``num_fewshot``: examples in each prompt (None: each task's default). ``limit``: only the first
    ``limit`` documents of each task (a fraction when < 1; for quick checks, not for reporting).
    ``batch_size``: requests per forward (or ``"auto"``). ``include_path``: folder(s) of your own task
    YAML files, found by name like lm-eval's own. ``seed``: lm-eval's sampling seeds (few-shot choice).
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}: give a positive number of documents (or a fraction below 1), or None for all")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot}: give 0 or more examples, or None for each task's default")
    paths = None
    if include_path is not None:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike)) else include_path)]
        missing = [p for p in paths if not Path(p).is_dir()]
        if missing:
            raise FileNotFoundError(f"include_path {missing[0]} is not a folder: pass the folder that holds your task YAML files")
    requested = _task_names(tasks)
    manager = None
    if paths:  # the user's own tasks alone index in milliseconds, lm-eval's ~10,000 YAML files in seconds
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks or local.match_tasks([n]) or Path(n).is_file() for n in requested):
            manager = local
    manager = manager or TaskManager(include_path=paths)
    names = _resolve_tasks(requested, manager)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    results = {}
    for task, values in out["results"].items():
        results[task] = _metrics(values)
        n = out.get("n-samples", {}).get(task)
        if n:
            results[task]["n_samples"] = n.get("effective")
        if task in out.get("n-shot", {}):
            results[task]["num_fewshot"] = out["n-shot"][task]
    config = {"tasks": names, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
              "include_path": paths, "seed": seed, "lm_eval_version": getattr(lm_eval, "__version__", None)}
    return {"results": results, "config": config}


def lm_eval_export(path: str | os.PathLike, tasks: str | Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """:func:`lm_eval_model` on an lqlr export, loaded packed by transformers' ``from_pretrained``
    (checksums verified) with its own tokenizer; keywords as :func:`lm_eval_model`."""
    _lm_eval()  # fail before loading anything when lm-eval is missing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lqlr.io.hf import register

    register()  # what `import lqlr` does: quant_method "lqlr" loads the export packed
    model = AutoModelForCausalLM.from_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path} has no tokenizer files: export with a tokenizer "
                                "(lqlr.compress(..., tokenizer=tok)) or copy them into the folder") from err
    return lm_eval_model(model, tokenizer, tasks, **kwargs)
