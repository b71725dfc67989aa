"""lm-evaluation-harness on a packed export (lqlr.eval.harness, lqlr-eval --tasks), checked against metrics
computed by hand from the model's own log-likelihoods, on local tasks the test writes (no hub data)."""
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import lqlr
from lqlr.cli.eval import main as lqlr_eval
from lqlr.eval.harness import lm_eval_export

NAMES = ["girl", "boy", "cat", "dog", "bird", "fish", "tree", "king", "ball", "sun", "frog", "cake"]
CHOICES = [["She was happy.", "The dog ran away very fast.", "It liked to play in the park."],
           ["He went to sleep.", "They ate the red apple.", "One day it saw a big tree."]]
MC = [{"q": f"Once upon a time there was a little {n}.", "choices": CHOICES[i % 2], "label": (i * 7) % 3}
      for i, n in enumerate(NAMES)]
LL = [{"context": f"Lily saw a {n}.", "continuation": " She smiled and said hello."} for n in NAMES]


@pytest.fixture(scope="module")
def export(stories_export):
    """The session's shared stories260K export (tests/conftest.py): read only."""
    return stories_export


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of two lm-eval tasks over local JSONL files: 12-row multiple choice, 12-row loglikelihood."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, rows in (("mc", MC), ("ll", LL)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / "lqlr_tiny_mc.yaml").write_text(
        "task: lqlr_tiny_mc\n" + common.format(path=json.dumps(str(folder / "mc.jsonl"))) +
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "lqlr_tiny_ll.yaml").write_text(
        "task: lqlr_tiny_ll\n" + common.format(path=json.dumps(str(folder / "ll.jsonl"))) +
        "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{continuation}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
        "    higher_is_better: false\n")
    return folder


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context): the context as the tokenizer encodes it (with its BOS), the
    continuation as the tokens that encoding context + continuation adds; the sum of their log-probs."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    assert whole[: len(ctx)] == ctx
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)  # (T-1, vocab)
    cont = torch.arange(len(ctx), len(whole))
    return float(logp[cont - 1, ids[0, cont]].sum())


@pytest.fixture(scope="module")
def reference(export):
    """The tasks' metrics by hand, on lqlr.load(export) (not the from_pretrained model lm-eval gets)."""
    model, tok = lqlr.load(export).eval(), AutoTokenizer.from_pretrained(export)
    acc = acc_norm = 0
    for row in MC:
        lls = [loglikelihood(model, tok, row["q"], " " + c) for c in row["choices"]]  # lm-eval's target_delimiter " "
        acc += max(range(3), key=lambda i: lls[i]) == row["label"]
        normed = [ll / len((" " + c).encode()) for ll, c in zip(lls, row["choices"])]
        acc_norm += max(range(3), key=lambda i: normed[i]) == row["label"]
    lls = [loglikelihood(model, tok, r["context"], r["continuation"]) for r in LL]
    return {"acc": acc / len(MC), "acc_norm": acc_norm / len(MC), "perplexity": math.exp(-sum(lls) / len(lls))}


def test_lm_eval_metrics_equal_the_hand_computed_ones(export, tasks, reference):
    out = lm_eval_export(export, ["lqlr_tiny_mc", "lqlr_tiny_ll"], include_path=tasks, batch_size=4)
    mc, ll = out["results"]["lqlr_tiny_mc"], out["results"]["lqlr_tiny_ll"]
    assert mc["n_samples"] == len(MC) and ll["n_samples"] == len(LL)
    assert 0 < reference["acc"] < 1  # the labels separate a right model from a wrong one
    assert mc["acc"] == reference["acc"]  # k/12 exactly
    assert mc["acc_norm"] == reference["acc_norm"]
    assert mc["acc_stderr"] == pytest.approx(math.sqrt(reference["acc"] * (1 - reference["acc"]) / (len(MC) - 1)))
    # a continuous check: the mean log-likelihood of a continuation, to 1e-4 nats
    assert math.log(ll["perplexity"]) == pytest.approx(math.log(reference["perplexity"]), abs=1e-4)
    assert out["config"]["tasks"] == ["lqlr_tiny_mc", "lqlr_tiny_ll"] and out["config"]["lm_eval_version"]


def test_limit_and_glob_patterns(export, tasks, reference):
    out = lm_eval_export(export, "lqlr_tiny_*", include_path=tasks, limit=4)
    assert sorted(out["results"]) == ["lqlr_tiny_ll", "lqlr_tiny_mc"]
    assert out["results"]["lqlr_tiny_mc"]["n_samples"] == 4 and out["config"]["limit"] == 4


def test_lqlr_eval_cli_writes_lm_eval_next_to_ppl_and_kl(stories_export_copy, tasks, reference, tmp_path, capsys):
    export = stories_export_copy  # --card rewrites the export's README.md
    path = tmp_path / "eval.json"
    lqlr_eval([str(export), "--seq-len", "64", "--max-windows", "1", "--tasks", "lqlr_tiny_mc",
               "--include-path", str(tasks), "--num-fewshot", "0", "--batch-size", "2", "--out", str(path), "--card"])
    result = json.loads(path.read_text())
    assert result["ppl"] > 1 and result["kl"] > 0 and result["bits_per_param"] > 3  # the existing record
    assert result["lm_eval"]["lqlr_tiny_mc"]["acc"] == reference["acc"]
    assert result["lm_eval"]["lqlr_tiny_mc"]["num_fewshot"] == 0
    assert result["lm_eval_config"] == {**result["lm_eval_config"], "num_fewshot": 0, "batch_size": 2}
    card = (export / "README.md").read_text()
    assert "| lqlr_tiny_mc | acc |" in card and f"{result['ppl']:.4g}" in card
    lqlr.load(export)  # the rewritten card leaves the checksums valid


def test_tasks_only_skips_the_reference(export, tasks, reference, tmp_path, monkeypatch):
    import lqlr.cli.eval as cli

    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: pytest.fail("--tasks-only ran the ppl/KL pass"))
    path = tmp_path / "eval.json"
    lqlr_eval([str(export), "--tasks", "lqlr_tiny_mc", "--include-path", str(tasks), "--tasks-only", "--out", str(path)])
    result = json.loads(path.read_text())
    assert "ppl" not in result and result["lm_eval"]["lqlr_tiny_mc"]["acc"] == reference["acc"]


def test_clear_errors(export, tasks, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\].*include_path"):
        lm_eval_export(export, ["no_such_task_xyz"], include_path=tasks)
    with pytest.raises(FileNotFoundError, match="include_path .* is not a folder"):
        lm_eval_export(export, ["lqlr_tiny_mc"], include_path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="limit=0"):
        lm_eval_export(export, ["lqlr_tiny_mc"], include_path=tasks, limit=0)
    with pytest.raises(SystemExit):
        lqlr_eval([str(export), "--limit", "5"])  # an lm-eval option without --tasks
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError, match=r"pip install 'lqlr\[eval\]'"):
        lm_eval_export(export, ["lqlr_tiny_mc"], include_path=tasks)
