"""lqlr-bench scale: synthetic checkpoints with real shapes, lazy runs, projections, kill/resume."""
import json

import pytest
import torch

from lqlr.bench import scale
from lqlr.bench.synthetic import SHAPES, spiked_weight, write_checkpoint
from lqlr.util.files import sha256_file


def test_spiked_weights_have_a_decaying_spectrum_above_a_bulk():
    W = spiked_weight(512, 384, seed=0)
    S = torch.linalg.svdvals(W)
    G = torch.linalg.svdvals(torch.randn(512, 384, generator=torch.Generator().manual_seed(0)) * 0.02)
    assert S[0] > 8 * G[0]  # spikes well above a pure Gaussian's edge
    assert S[0] > S[16] > S[128] > S[300]  # decaying
    assert S[300] == pytest.approx(float(G[300]), rel=0.5)  # the tail is the bulk
    assert torch.equal(W, spiked_weight(512, 384, seed=0)) and not torch.equal(W, spiked_weight(512, 384, seed=1))


def test_synthetic_checkpoint_is_a_stock_llama_with_the_shapes(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_checkpoint(tmp_path / "a", "tiny", blocks=2, progress=False)
    again = write_checkpoint(tmp_path / "b", "tiny", blocks=2, progress=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # embeddings + one shard per block
    for f in set(index["weight_map"].values()):
        assert sha256_file(folder / f) == sha256_file(again / f)  # seeded: the same bytes
    model = AutoModelForCausalLM.from_pretrained(folder)
    shape = SHAPES["tiny"]
    assert model.model.layers[1].mlp.down_proj.weight.shape == (shape.hidden, shape.intermediate)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (shape.kv_heads * shape.hidden // shape.heads,
                                                                     shape.hidden)
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == shape.block_params() + 2 * shape.hidden


@pytest.mark.slow
def test_scale_bench_runs_lazily_projects_and_resumes_to_the_same_bytes(tmp_path):
    records = scale.run(["tiny"], {"tiny": 2}, ["gptq", "auto"], tmp_path, bits=3.0, device="cpu", n_samples=8,
                        seq_len=128, resume_check=True)
    gptq, auto, resumed = records
    assert resumed["method"] == "gptq-killed-and-resumed" and resumed["resumed_blocks"] == 1
    assert resumed["same_bytes_as_uninterrupted"] is True
    assert auto["bits"] <= 3.0 + 1e-9 and auto["plan_s"] > 0 and gptq["plan_s"] < auto["plan_s"]
    for r in (gptq, auto):
        assert [b["block"] for b in r["blocks"]] == [0, 1]
        assert 0.5 < sum(r["stage_share"].values()) <= 1.0 + 1e-6  # the stages account for the block time
        measured = r["wall_s"] - sum(b["wall_s"] for b in r["blocks"]) - r["plan_s"]
        full = SHAPES["tiny"].full_layers
        assert r["whole_model_s"] == pytest.approx(measured + (r["plan_s"] + sum(b["wall_s"] for b in r["blocks"]))
                                                   * full / 2, rel=1e-6)
        assert r["whole_model_peak_rss_mb"] > r["peak_rss_mb"]


def test_the_allocator_row_runs_lqlr_compress_s_default_allocator_preset():
    from test_cli import _compose

    composed = _compose(["budget=auto_fast", "budget.bits=3.0", "budget.cache=false"]).budget  # as Hydra builds it
    assert scale.allocator_budget(3.0) == composed
    assert scale.method_config("auto", 3.0, "cpu", 8, 64).budget == composed
    assert scale.method_config("lqlr", 3.0, "cpu", 8, 64).budget.mode == "uniform"
