"""Per-matrix plans: explicit override rules, and the table a user reads before the slow work starts.

A rule is a dict with ``match`` (a module-name pattern, the same language as ``targets``: see
:func:`lqlr.core.arch.matches`, e.g. the glob ``"model.layers.*.mlp.down_proj"`` or ``"re:..."``) and any QLRConfig fields (``bq``, ``rank``, ``bl``,
``br``, ``group_size``…). Rules are tried in order and the first match wins; a rule that matches
no target is an error (a typo would otherwise be silently ignored).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import fields, replace
from typing import Any, Iterable, Mapping

from lqlr.config import QLRConfig
from lqlr.core.arch import check_pattern, matches
from lqlr.core.bits import bits_per_param

_FIELDS = {f.name for f in fields(QLRConfig)} - {"seed"}


def resolve_overrides(names: Iterable[str], rules: list[Mapping[str, Any]] | None,
                      base: QLRConfig) -> dict[str, tuple[int, QLRConfig]]:
    """``{name: (rule index, config)}`` for every target some rule matches (first match wins)."""
    rules = list(rules or [])
    names = list(names)
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping) or "match" not in rule:
            raise ValueError(f"budget.overrides[{i}] = {rule!r}: each rule needs a 'match' pattern plus config fields, "
                             "e.g. {match: 'model.layers.*.mlp.down_proj', bq: 3, rank: 64}")
        unknown = set(rule) - _FIELDS - {"match"}
        if unknown:
            raise ValueError(f"budget.overrides[{i}] has unknown field(s) {sorted(unknown)}: use QLRConfig fields "
                             f"such as bq, rank, bl, br, group_size")
        check_pattern(rule["match"], f"budget.overrides[{i}].match")
    out: dict[str, tuple[int, QLRConfig]] = {}
    used = set()
    for name in names:
        for i, rule in enumerate(rules):
            if matches(name, rule["match"]):
                out[name] = (i, replace(base, **{k: v for k, v in rule.items() if k != "match"}))
                used.add(i)
                break
    unused = [rules[i]["match"] for i in range(len(rules)) if i not in used]
    if unused:
        raise ValueError(f"budget.overrides pattern(s) {unused} match no target module (first match wins, so an earlier "
                         f"rule may have taken them): check the names, e.g. {names[0] if names else '(no targets)'}")
    return out


def plan_table(plan: Mapping[str, QLRConfig], shapes: Mapping[str, tuple[int, int]],
               source: Mapping[str, str] | None = None) -> str:
    """A short table of the distinct settings in a plan: how many matrices and parameters take each."""
    count: Counter = Counter()
    params: Counter = Counter()
    bits: Counter = Counter()
    for name, cfg in plan.items():
        key = (cfg.bq, cfg.group_size, cfg.rank, cfg.bl if cfg.rank else "-", (source or {}).get(name, ""))
        n = shapes[name][0] * shapes[name][1]
        count[key] += 1
        params[key] += n
        bits[key] += bits_per_param(*shapes[name], cfg) * n
    total = sum(params.values())
    lines = ["| BQ | group | rank | BL=BR | from | matrices | params | all-in bits |", "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for key in sorted(count, key=lambda k: (-params[k], str(k))):
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {count[key]} | {params[key]:,} | "
                     f"{bits[key] / params[key]:.3f} |")
    lines.append(f"| | | | | total | {sum(count.values())} | {total:,} | {sum(bits.values()) / total:.3f} |")
    return "\n".join(lines)
