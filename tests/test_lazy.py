"""Shard-by-shard loading gives exactly the eager result, with later blocks still unloaded."""
from dataclasses import replace

import pytest
import torch

import lqlr
from lqlr.config import CompressConfig
from lqlr.core.arch import find_blocks
from lqlr.engine.blocks import compress_model
from lqlr.engine.lazy import lazy_model
from lqlr.nn.layer import QLRLinear


def _tiny_llama(tmp_path, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards + an index
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_lazy_equals_eager_and_loads_one_block_at_a_time(tmp_path, tied):
    eager = _tiny_llama(tmp_path, tied)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    calib = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=2, rank=4, group_size=32, iters=2, incoherence=True))
    compress_model(eager, calib, cfg, progress=False)

    lazy, _, loader = lazy_model(tmp_path)
    _, blocks = find_blocks(lazy)
    assert all(p.device.type == "meta" for p in blocks.parameters())
    seen = []

    def spy(block, prefix):
        later = [b for b in blocks[len(seen) + 1:]]
        assert all(p.device.type == "meta" for b in later for p in b.parameters())  # not read yet
        seen.append(prefix)
        loader(block, prefix)

    compress_model(lazy, calib, cfg, progress=False, load_block=spy)
    assert seen == ["model.layers.0.", "model.layers.1.", "model.layers.2."]
    assert not any(p.device.type == "meta" for p in lazy.parameters())
    for (n, a), (_, b) in zip(eager.named_modules(), lazy.named_modules()):
        if isinstance(a, QLRLinear):
            for (k, x), (_, y) in zip(a.packed_tensors().items(), b.packed_tensors().items()):
                assert torch.equal(x, y), f"{n}.{k} differs"
    probe = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(lazy(probe).logits, eager(probe).logits)


def test_lazy_needs_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        lazy_model(tmp_path)


def test_cli_lazy_run_matches_eager(tmp_path):
    from test_cli import SMALL, _compose

    from lqlr.assets import assets_dir
    from lqlr.cli.compress import run

    folder = assets_dir() / "stories260K"  # a plain safetensors checkpoint folder
    common = [o for o in SMALL if not o.startswith("model=")] + ["model=hub", f"model.name={folder}", "method=gptq",
                                                                  "eval.max_windows=1"]
    eager = run(_compose(common + [f"output_dir={tmp_path / 'e'}"]), tmp_path)
    lazy = run(_compose(common + ["model.lazy=true", f"output_dir={tmp_path / 'l'}"]), tmp_path)
    assert lazy["bits_per_param"] == eager["bits_per_param"]
    assert lazy["ppl"] == pytest.approx(eager["ppl"], rel=1e-6) and "kl" not in lazy
    # the self-generated calibration (the embedded default) works lazily and samples the same text
    self_gen = [o for o in common if not o.startswith("data=")] + ["data=self"]
    eager = run(_compose(self_gen + [f"output_dir={tmp_path / 'es'}"]), tmp_path)
    lazy = run(_compose(self_gen + ["model.lazy=true", f"output_dir={tmp_path / 'ls'}"]), tmp_path)
    assert lazy["bits_per_param"] == eager["bits_per_param"]
    assert lazy["ppl"] == pytest.approx(eager["ppl"], rel=1e-6)


def test_lazy_generation_samples_the_eager_ids_with_one_block_loaded(tmp_path):
    from lqlr.calibrate.text import generated_ids
    from lqlr.util.meta import release_parameters

    class Tok:  # generated_ids reads only these two fields
        all_special_ids = [0, 1, 2]
        eos_token_id = 2

    eager = _tiny_llama(tmp_path)
    want = generated_ids(eager, Tok(), n_samples=5, seq_len=24, seed=3, batch_size=2, progress=False)
    lazy, _, loader = lazy_model(tmp_path)
    _, blocks = find_blocks(lazy)
    loaded, reads = [], []

    def load(block, prefix):
        loaded.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))
        reads.append(prefix)
        loader(block, prefix)

    got = generated_ids(lazy, Tok(), n_samples=5, seq_len=24, seed=3, batch_size=2, progress=False,
                        load_block=load, release_block=release_parameters)
    assert torch.equal(got, want)
    assert max(loaded) == 0  # each block is read while every other one is on meta
    assert len(reads) == 3 * 3 * 23  # 3 blocks, 3 batches, 23 decoding steps
    assert all(p.device.type == "meta" for p in blocks.parameters())  # dropped again afterwards


def test_blockwise_sensitivity_equals_the_whole_model_backward(tmp_path):
    from lqlr.calibrate.sensitivity import blockwise_sensitivity, output_sensitivity
    from lqlr.core.arch import target_linears
    from lqlr.util.meta import release_parameters

    eager = _tiny_llama(tmp_path)
    ids = torch.randint(3, 300, (3, 24), generator=torch.Generator().manual_seed(3))
    names = list(target_linears(eager))
    want = output_sensitivity(eager, ids, names, progress=False)
    got = blockwise_sensitivity(eager, ids, names, progress=False)  # same model, no lazy loading
    lazy, _, loader = lazy_model(tmp_path)
    loaded = []
    got_lazy = blockwise_sensitivity(lazy, ids, names, lambda b, p: loaded.append(p) or loader(b, p),
                                     release_parameters, progress=False)
    assert loaded == [f"model.layers.{i}." for i in (0, 1, 2, 2, 1, 0)]  # forward, then backward
    _, blocks = find_blocks(lazy)
    assert all(p.device.type == "meta" for p in blocks.parameters())  # every block released again
    assert all(p.requires_grad for p in eager.parameters())  # the caller's flags are restored
    for n in names:
        assert got[n] == pytest.approx(want[n], rel=1e-4, abs=1e-12), n
        assert got_lazy[n] == pytest.approx(want[n], rel=1e-4, abs=1e-12), n


def test_lazy_allocator_plans_and_compresses_like_the_eager_one(tmp_path):
    from lqlr.config import BudgetConfig, CalibrationConfig, Menu

    model = _tiny_llama(tmp_path)
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=4, group_size=32, iters=2, incoherence=True),
                         budget=BudgetConfig(mode="auto", bits=3.0, cache=False,
                                             menu=Menu(bq=[2, 3, 4], rank=[0, 8], group_size=[32])))
    eager = lqlr.compress(model, cfg, calibration=calib, progress=False)
    lazy_cfg = replace(cfg, lazy=True, calibration=CalibrationConfig(source="wikitext2"))  # (ids given: unused)
    lazy = lqlr.compress(str(tmp_path), lazy_cfg, calibration=calib, progress=False)
    assert lazy.plan.configs == eager.plan.configs
    for a, b in zip(eager.plan.table.costs, lazy.plan.table.costs):
        assert a == pytest.approx(b, rel=1e-4)
    for (n, a), (_, b) in zip(eager.model.named_modules(), lazy.model.named_modules()):
        if isinstance(a, QLRLinear):
            for (k, x), (_, y) in zip(a.packed_tensors().items(), b.packed_tensors().items()):
                assert torch.equal(x, y), f"{n}.{k} differs"
    assert [s.block for s in lazy.block_stats] == [0, 1, 2]
    assert all(s.load_s > 0 and s.decompose_s > 0 and s.hessian_s > 0 and s.peak_rss_mb > 0 for s in lazy.block_stats)
