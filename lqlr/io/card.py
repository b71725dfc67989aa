"""The export's README.md: a Hugging Face model card, so that the export folder is a hub repository as it is.

YAML front matter (``library_name``, ``base_model`` when the manifest's source is a hub model,
``tags: [lqlr, quantized]``) and a body with the method, the all-in bits and the measured quality
(WikiText-2 perplexity and KL when they were measured, lm-eval task metrics when given, else "not
measured"). Everything comes from the manifest plus an optional ``quality`` record, so the card is
deterministic: the same export writes the same bytes.

README.md is **not** in the manifest's checksums (``lqlr.io.export.UNCHECKED``): it is
documentation, and editing it (as one does on the hub) must not make the model unloadable.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lqlr.util.files import atomic_write

CARD = "README.md"
# lqlr's short model names (lqlr.engine.models.KNOWN_MODELS) and the hub repositories they come from
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "stories260k": "karpathy/tinyllamas"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model(name: str | None) -> str | None:
    """The hub id of the source model, when it is one: a known short name's repository, or an
    ``org/name`` that is not a local folder (a local path is never named as ``base_model``)."""
    if not name:
        return None
    if name in HUB_IDS:
        return HUB_IDS[name]
    if _HUB_ID.match(name) and not Path(name).exists() and ".." not in name:
        return name
    return None


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def _fmt(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _quality_lines(quality: dict[str, Any] | None) -> list[str]:
    quality = quality or {}
    lines = ["## Measured quality", ""]
    if quality.get("ppl") is not None or quality.get("kl") is not None:
        where = (f"WikiText-2 test, {quality['eval_tokens']:,} tokens in windows of {quality.get('eval_seq_len')}"
                 if quality.get("eval_tokens") else quality.get("kl_on", "WikiText-2 test"))
        lines += ["| metric | value |", "|---|---:|"]
        for key, label in (("ppl", "perplexity"), ("ppl_reference", "perplexity of the uncompressed model"),
                           ("kl", "KL(uncompressed ‖ compressed), nats/token")):
            if quality.get(key) is not None:
                lines.append(f"| {label} | {_fmt(quality[key])} |")
        lines += ["", f"Measured by lqlr on {where}.", ""]
    else:
        lines += ["Perplexity and KL: not measured (run `lqlr-eval PATH --card` to measure them and fill this in).", ""]
    tasks = quality.get("lm_eval") or {}
    if tasks:
        config = quality.get("lm_eval_config") or {}
        lines += ["| lm-eval task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
        for task, metrics in sorted(tasks.items()):
            for metric, value in metrics.items():
                if metric.endswith("_stderr") or "_stderr," in metric or metric in ("n_samples", "num_fewshot"):
                    continue
                err = metrics.get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
                lines.append(f"| {task} | {metric} | {_fmt(value)} | {'' if err is None else _fmt(err)} | "
                             f"{metrics.get('n_samples', '')} |")
        setup = (f"lm-evaluation-harness {config.get('lm_eval_version') or ''}, "
                 f"num_fewshot={config.get('num_fewshot')}, limit={config.get('limit')}.")
        lines += ["", setup, ""]
    return lines


def model_card(manifest: dict[str, Any], quality: dict[str, Any] | None = None) -> str:
    """The README.md of an export: front matter for the hub, then what was done and how well it does.

    ``quality``: lqlr-compress's or lqlr-eval's result record (``ppl``, ``ppl_reference``, ``kl``,
    ``eval_tokens``, ``eval_seq_len``, ``lm_eval``); None: "not measured".
    """
    source = manifest.get("source", {})
    name = str(source.get("model", "") or "")
    method = source.get("method")
    summary = manifest.get("summary", {})
    bits = summary.get("bits_per_param")
    modules = manifest.get("modules", {})
    specs = [m.get("spec", {}) for m in modules.values()]
    q_grids = Counter(f"{s['q'].get('bits')}-bit {s['q'].get('kind', '')}".strip() for s in specs if "q" in s)
    ranks = [int(s.get("rank", 0) or 0) for s in specs]
    factor_grids = Counter(f"{s['l'].get('bits')}-bit" for s in specs if int(s.get("rank", 0) or 0) and "l" in s)
    rotated = sum(1 for s in specs if s.get("rotation"))
    hub = base_model(name)
    front = ["---", "library_name: transformers"]
    if hub:
        front += [f"base_model: {_yaml_str(hub)}", "base_model_relation: quantized"]
    front += ["tags:", "- lqlr", "- quantized", "---", ""]
    title = (f"{name or 'model'} · lqlr" + (f" {method}" if method else "")
             + (f", {bits:.3f} bits per weight" if bits is not None else ""))

    def counts(c: Counter) -> str:
        return ", ".join(f"{k} ({n})" for k, n in sorted(c.items())) or "none"

    intro = ("Compressed with [lqlr](https://pypi.org/project/lqlr/) as W ≈ Q + L·R: a packed low-bit Q and "
             "low-rank factors L, R, which are also shipped as a stock PEFT LoRA adapter in `adapter/`.")
    body = [f"# {title}", "", intro, "",
            "| | |", "|---|---|",
            f"| source model | {f'[{hub}](https://huggingface.co/{hub})' if hub else (name or 'unknown')} |",
            f"| method | {method or 'lqlr (Q + L·R)'} |",
            f"| all-in bits per weight (compressed linears) | {_fmt(bits, '.3f') if bits is not None else 'unknown'} |",
            f"| compressed linears | {summary.get('n_modules', len(modules))} ({_fmt(summary.get('compressed_params'), ',')} weights) |",
            f"| Q grid (linears) | {counts(q_grids)} |",
            f"| L·R rank | {f'{min(ranks)}–{max(ranks)}' if ranks and min(ranks) != max(ranks) else (ranks[0] if ranks else 0)} |",
            f"| L·R factors (linears) | {counts(factor_grids)} |",
            f"| incoherence rotation | {rotated} of {len(specs)} linears |",
            f"| other tensors | {manifest.get('untouched_dtype', 'float16')} |"]
    tuned = manifest.get("finetune")
    if tuned:
        steps = f"{tuned['steps']} steps" if tuned.get("steps") else "fine-tuned"
        body.append(f"| L·R fine-tuned | {steps}{', quantization-aware' if tuned.get('qat') else ''}, put back on "
                    f"their grids by `{tuned.get('method', 'frobenius')}` requantization |")
    body.append("")
    body += _quality_lines(quality)
    adapter = any(ranks)
    body += ["## Use", "", "```python",
             "import lqlr  # registers the packed format with transformers (pip install lqlr)",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(PATH)  # a local copy of this repository",
             "tokenizer = AutoTokenizer.from_pretrained(PATH)"]
    if adapter:
        body += ["", "from peft import PeftModel  # fine-tune L·R as a LoRA on the packed Q",
                 "peft_model = PeftModel.from_pretrained(model, PATH + \"/adapter\", is_trainable=True)"]
    where = ("`PATH` is a folder holding all of this repository (e.g. `huggingface_hub.snapshot_download(repo_id)`): "
             "lqlr checks every file against the sha256 in `manifest.json` (this README excepted) before loading.")
    body += ["```", "", where, ""]
    return "\n".join(front + body)


def write_model_card(path: str | os.PathLike, manifest: dict[str, Any] | None = None,
                     quality: dict[str, Any] | None = None) -> Path:
    """Write (or rewrite) ``path/README.md`` from the export's manifest (read from ``path`` when not
    given) and ``quality``; returns its path. The checksums are unaffected (README.md is not in them)."""
    root = Path(path)
    if manifest is None:
        from lqlr.io.export import read_manifest

        manifest = read_manifest(root, verify=False)
    out = root / CARD
    text = model_card(manifest, quality)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out
