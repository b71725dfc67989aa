"""llama.cpp computes the function lqlr does: its logits for the model.gguf (+ lora.gguf) that ``lqlr-export gguf``
writes, against lqlr's own forward of the same Q (+ L·R), on stories260K and tiny random Llamas, every GGUF grid.

Needs llama.cpp built by ``python -m lqlr.util.llamacpp build`` (docs/gguf.md); skipped, with that command in the
reason, when it is not there.

The blocks first: ggml's own decoding of every compressed linear's tensor in model.gguf is lqlr's Q bit for bit.
Then two comparisons of the logits (docs/gguf.md, "Agreement with llama.cpp"):

* **Exact**: the same files with every tensor decoded to F32 (gguf-py's dequantize of the exported blocks, the
  LoRA written as f32). llama.cpp then computes in float32 throughout, and its logits equal lqlr's float32
  forward to float rounding (max KL ≤ 1e-7, same top-1 everywhere): tensor names, q/k permutation, RoPE, norms and
  their eps, GQA, tied or untied head, LoRA scale and folds all as lqlr computes them.
* **As shipped**: the quantized files. For a quantized weight llama.cpp's CPU matmul rounds the activations to 8
  bits (Q8_0, or Q8_1 for q4_1), for an f16 weight (the LoRA, a fallback, a 16-bit head) to f16: near-ties flip.
  Asked: top-1 agreement ≥ 99% and mean KL(lqlr ‖ llama.cpp) ≤ 1e-3 over a few hundred positions. Where
  llama.cpp's own F32 run and its quantized run of the same weights agree less than 99% (flat next-token
  distributions: the random models), lqlr must agree with the quantized run as well as llama.cpp's F32 run does
  (to one position): the export adds no disagreement of its own.
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
from lqlr.config import BudgetConfig, CompressConfig
from lqlr.budget.plan import make_plan
from lqlr.engine.blocks import compress_model
from lqlr.io.export import qlr_modules, save_compressed
from lqlr.io.gguf import export_gguf
from lqlr.io.load import load, place
from lqlr.util import llamacpp

pytestmark = pytest.mark.slow  # and every test that runs llama.cpp is marked llamacpp

GRIDS = {"q4_0": 4, "q4_1": 4, "q5_0": 5, "q8_0": 8, "iq4_nl": 4}  # grid -> bq
TOP1, KL = 0.99, 1e-3  # issue 19's bounds for the quantized files
EXACT_KL = 1e-7  # the F32 files: float32 rounding gives ≤ 2e-8 (a wrong tensor, eps or scale: ≥ 1e-3)
FIGURES: dict[str, dict] = {}  # every comparison's figures, printed at the end of the module (pytest -s)

# in-distribution text for stories260K (a TinyStories model), written for this test: 576 positions of it
STORY = """Once upon a time, there was a little girl named Lily. She lived in a small house with her mom and dad and a \
big brown dog named Max. Every morning, Lily and Max went to the park to play. One day, Lily saw a red ball under a \
tree. She ran to the ball and picked it up. "Look, Max!" she said. "We have a new ball!" Max wagged his tail and \
barked. They played with the ball all day. When the sun went down, Lily was tired and happy. She went home and ate \
her dinner. Then her mom gave her a big hug and said, "I love you, Lily." Lily smiled and went to sleep.
The next day, Lily wanted to find a friend to play with. She saw a boy named Tom sitting on a bench. Tom looked \
sad. Lily walked to him and asked, "Why are you sad?" Tom said, "I lost my toy car. I can not find it anywhere." \
Lily wanted to help him. They looked under the bench and behind the tree. Max sniffed the grass and found the car \
near the pond. Tom was very happy. He said, "Thank you, Lily and Max! You are my best friends." From that day on, \
Lily, Tom and Max played together in the park every day.
One sunny day, Tom had an idea. "Let's build a big castle in the sand!" he said. Lily clapped her hands. They got a \
bucket and a shovel and went to the sandbox. They worked very hard. The castle was tall and pretty. Then a bird \
flew down and sat on the top of the castle. Lily and Tom laughed. The bird sang a happy song. It was the best day \
ever.
"""


MISSING = llamacpp.missing()  # why llama.cpp is not usable (None: it is), read once at collection


def needs_llama_cpp(test):
    """Mark ``test`` llamacpp; skipped, with the command that builds llama.cpp, before any of its fixtures is built
    when the build is not there."""
    return pytest.mark.llamacpp(pytest.mark.skipif(MISSING is not None, reason=str(MISSING))(test))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if FIGURES:
        width = max(map(len, FIGURES))
        print("\nllama.cpp vs lqlr: top-1 agreement, mean and max KL(lqlr ‖ llama.cpp) per position")
        for name, f in FIGURES.items():
            print(f"  {name:<{width}}  top-1 {f['top1']:.4f}  KL mean {f['kl_mean']:.1e}  max {f['kl_max']:.1e}"
                  f"  ({f['positions']} positions)")


# ----- models, exports, files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from lqlr.engine.models import load_model

    return load_model("stories260k")[1]


@pytest.fixture(scope="module")
def story(tok) -> list[list[int]]:
    """STORY as 9 windows of 64 tokens (BOS + 63): 576 positions."""
    ids = tok.encode(STORY, add_special_tokens=False)
    return [[1, *ids[i * 63:(i + 1) * 63]] for i in range(9)]


def _random_sequences(vocab: int = 512, n: int = 6, length: int = 64, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, vocab, (length - 1,), generator=gen).tolist()] for _ in range(n)]


def _stories(ffn: int | None = None):
    """stories260K; ``ffn=192`` zero-pads its FFN from 172 (rows of 172 hold no 32-blocks) to 192 neurons:
    gate/up rows and down columns of zeros, the same function with every linear on 32-blocks."""
    from transformers import LlamaForCausalLM

    from lqlr.engine.models import load_model

    model, _ = load_model("stories260k")
    if ffn is None:
        return model
    padded = LlamaForCausalLM(model.config.__class__.from_dict({**model.config.to_dict(), "intermediate_size": ffn}))
    state = {}
    for k, v in padded.state_dict().items():
        w, z = model.state_dict()[k], torch.zeros_like(v)
        z[tuple(slice(0, s) for s in w.shape)] = w
        state[k] = z
    padded.load_state_dict(state)
    return padded.eval()


def _stories_256():
    """stories260K zero-padded to hidden 256 and FFN 256, the same function (head_dim stays 8, so q/k/v keep their
    64/32 output rows; norm weights halved and eps/4: RMS over 256 of 64 non-zero entries is half the RMS over 64):
    every linear but o_proj (rows of 64, 8 heads of 8) on the k-quants' 256-weight super-blocks."""
    from transformers import LlamaForCausalLM

    from lqlr.engine.models import load_model

    model, _ = load_model("stories260k")
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    padded = LlamaForCausalLM(c.__class__.from_dict({**c.to_dict(), "hidden_size": 256, "intermediate_size": 256,
                                                     "head_dim": head_dim, "rms_norm_eps": c.rms_norm_eps / 4}))
    state = {}
    for k, v in padded.state_dict().items():
        w, z = model.state_dict()[k], torch.zeros_like(v)
        z[tuple(slice(0, s) for s in w.shape)] = w * (0.5 if "norm" in k else 1)
        state[k] = z
    padded.load_state_dict(state)
    return padded.eval()


def _random_llama(hidden=64, ffn=192, layers=5, heads=8, kv_heads=4, ctx=512, eps=1e-5, theta=10000.0, tie=True):
    """A random Llama (linears N(0, 0.1²), norms 1 + N(0, 0.3²) so that a wrong norm or eps shows); the default
    has stories260K's shape with FFN 192."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=512, max_position_embeddings=ctx, rms_norm_eps=eps,
                      rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie,
                      initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def _export(model, out: Path, tokenizer, untouched: str = "float16", overrides=(), **qlr) -> Path:
    """``model`` compressed in place (Q on a GGUF grid, no rotation; one outer iteration: the test is about
    the files, not the fit; ``overrides``: budget.overrides rules) and exported to ``out``."""
    calib = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(qlr=lqlr.QLRConfig(iters=1, lr_iters=1, incoherence=False, **{"group_size": 32, **qlr}),
                         budget=BudgetConfig(overrides=list(overrides)))
    plan = make_plan(model, cfg.qlr, cfg.budget, progress=False)
    reports = compress_model(model, calib, cfg, plan=plan, progress=False)
    return save_compressed(model, out, source={"model": out.name}, reports=reports, tokenizer=tokenizer,
                           untouched_dtype=untouched)


def _rewrite(src: Path, dst: Path, key=None, tensor=None) -> Path:
    """A copy of the GGUF file ``src`` with each metadata value v replaced by key(name, v) and each tensor by
    tensor(name, float32 array) (both: unchanged when None); every tensor is written decoded to F32."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, vtype = field.contents(), field.types[0]
        writer.add_key_value(name, key(name, value) if key else value, vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(tensor(t.name, data) if tensor else data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _files(export: Path, out: Path, **kw) -> dict[str, Path | None]:
    """model.gguf and lora.gguf as shipped (``q``, ``q_lora``) and their F32 twins (``f32``, ``f32_lora``: every
    tensor of model.gguf decoded to F32, the LoRA and fallbacks written as f32)."""
    record = export_gguf(export, out / "q", **kw)
    export_gguf(export, out / "f32", lora_type="f32", fallback_type="f32", **kw)
    _rewrite(out / "f32" / "model.gguf", out / "f32" / "model.f32.gguf")
    has_lora = record["lora"] is not None
    return {"q": out / "q" / "model.gguf", "q_lora": out / "q" / "lora.gguf" if has_lora else None,
            "f32": out / "f32" / "model.f32.gguf", "f32_lora": out / "f32" / "lora.gguf" if has_lora else None,
            "record": record}


# ----- lqlr's side and the figures ----------------------------------------------------------------
@torch.no_grad()
def _lqlr_logits(model, sequences: list[list[int]]) -> np.ndarray:
    """lqlr's float32 logits of every position, (Σ len, vocab); sequences of one length go as one batch."""
    if len({len(s) for s in sequences}) == 1:
        return model(torch.tensor(sequences)).logits.float().reshape(-1, model.config.vocab_size).numpy()
    return np.concatenate([model(torch.tensor([s])).logits[0].float().numpy() for s in sequences])


def _q_only(model):
    """``model`` with every QLRLinear replaced by its Q-only twin (the base llama.cpp runs without lora.gguf)."""
    for name, layer in qlr_modules(model).items():
        place(model, name, layer.without_factors())
    return model


def _agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement and KL(ref ‖ got) per position, in float64."""
    assert ref.shape == got.shape and np.isfinite(got).all()
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"top1": float((ref.argmax(-1) == got.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "positions": int(ref.shape[0])}


def _compare(name: str, model, files: dict, sequences, lora: bool) -> dict:
    """lqlr's logits against llama.cpp's: the F32 files exactly; the shipped files within issue 19's bounds, or,
    where llama.cpp's own F32 and quantized runs of the same weights agree less than that, as well as they do
    (top-1 to one position, KL to 5%)."""
    ref = _lqlr_logits(model, sequences)
    f32 = llamacpp.logits(files["f32"], sequences, lora=files["f32_lora"] if lora else None)
    q = llamacpp.logits(files["q"], sequences, lora=files["q_lora"] if lora else None)
    exact = FIGURES[f"{name} F32"] = _agreement(ref, f32)
    shipped = FIGURES[name] = _agreement(ref, q)
    itself = FIGURES[f"{name}, llama.cpp F32 vs quantized"] = _agreement(f32, q)
    assert exact["kl_max"] <= EXACT_KL and exact["top1"] == 1.0, (name, "F32", exact)
    assert shipped["kl_mean"] <= max(KL, 1.05 * itself["kl_mean"]), (name, shipped, itself)
    assert shipped["top1"] >= min(TOP1, itself["top1"] - 1 / itself["positions"]), (name, shipped, itself)
    return shipped


def _check_blocks(model, files: dict) -> None:
    """ggml's own decoding (to_float) of each compressed linear's tensor in model.gguf is lqlr's Q bit for bit
    (rows permuted for q/k; f16 for a fallback), and of lora.gguf's lora_a, lora_b the f16 of R and fold·L."""
    from lqlr.io.gguf.convert import llama_arch, permute_rows, qk_heads

    base = llamacpp.dequantize(files["q"])
    lora = llamacpp.dequantize(files["q_lora"]) if files["q_lora"] else {}
    arch = llama_arch(model.config.to_dict())
    plan = {e["source"]: e for e in files["record"]["model"]["tensors"]}
    folds = (files["record"]["lora"] or {}).get("fold", {})
    for name, layer in qlr_modules(model).items():
        entry = plan[f"{name}.weight"]
        heads = qk_heads(arch, f"{name}.weight")
        Q = layer.q_weight().numpy()
        want = Q.astype(np.float16).astype(np.float32) if entry["type"] == "f16" else Q
        np.testing.assert_array_equal(base[entry["name"]].view(np.int32), permute_rows(want, heads).view(np.int32))
        if layer.rank:
            L, R = (x.numpy() for x in layer.factors())
            for suffix, x in (("lora_a", R), ("lora_b", permute_rows(folds[name] * L, heads))):
                got = lora[f"{entry['name']}.{suffix}"]
                np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))


# ----- the logits ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padded_exports(tmp_path_factory, tok):
    """The 32-block stories260K (FFN 192) on each GGUF grid with rank-8 L, R: grid -> (export, files), built on
    first use."""
    tmp = tmp_path_factory.mktemp("padded")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(grid: str) -> tuple[Path, dict]:
        if grid not in cache:
            export = _export(_stories(ffn=192), tmp / grid, tok, grid=grid, bq=GRIDS[grid], rank=8)
            cache[grid] = export, _files(export, tmp / f"{grid}-gguf")
        return cache[grid]

    return get


@needs_llama_cpp
@pytest.mark.parametrize("grid", list(GRIDS))
def test_stories260k_sized_logits_match(grid, padded_exports, story):
    """stories260K with FFN 192 (32-blocks everywhere, no fallback): with lora.gguf against lqlr's Q + L·R,
    without it against lqlr's Q alone."""
    export, files = padded_exports(grid)
    assert not files["record"]["fallbacks"] and files["record"]["model"]["file_type"] == f"MOSTLY_{grid.upper()}"
    _check_blocks(load(export), files)
    _compare(f"stories260K-sized {grid} Q+LR", load(export), files, story, lora=True)
    _compare(f"stories260K-sized {grid} Q", _q_only(load(export)), files, story, lora=False)


@needs_llama_cpp
def test_decode_speed_generates_lqlrs_greedy_tokens(padded_exports, story):
    """``llamacpp.decode_speed`` (the prompt, then one llama_decode per generated token, as ``lqlr-bench gguf-speed``
    times it) generates, on the F32 files with lora.gguf, the tokens of lqlr's own greedy decoding of Q + L·R (a
    wrong position, cache or adapter would change them), and reports positive speeds."""
    export, files = padded_exports("q4_0")
    model = load(export)
    prompt, n = story[0][:16], 24
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):  # argmax chain of lqlr's forward, the whole sequence each step
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    got = llamacpp.decode_speed(files["f32"], prompt, n, lora=files["f32_lora"], kv="f32", repeats=2)
    assert got["generated"] == ids[16:] and got["new_tokens"] == n and got["prompt_tokens"] == 16
    assert got["decode_tok_s"] > 0 and got["prompt_tok_s"] > 0
    q = llamacpp.decode_speed(files["q"], prompt, n, lora=files["q_lora"], repeats=1)  # the shipped files run too
    assert len(q["generated"]) == n
    with pytest.raises(llamacpp.LlamaCppError, match="--decode takes one prompt"):
        llamacpp._call(["-m", str(files["q"]), "--decode", "4"], "1 2\n3 4\n", None)


@pytest.fixture(scope="module")
def stories(tmp_path_factory, tok):
    """The real stories260K on q4_0 with rank-8 L, R: its five down_proj (rows of 172) fall back to f16."""
    tmp = tmp_path_factory.mktemp("stories")
    export = _export(_stories(), tmp / "stories260k", tok, grid="q4_0", bq=4, rank=8)
    return export, _files(export, tmp / "gguf")


@needs_llama_cpp
def test_stories260k_with_fallback_logits_match(stories, story):
    export, files = stories
    assert len(files["record"]["fallbacks"]) == 5
    model = load(export)
    _check_blocks(model, files)
    shipped = _compare("stories260K q4_0 (f16 fallback) Q+LR", model, files, story, lora=True)
    _compare("stories260K q4_0 (f16 fallback) Q", _q_only(load(export)), files, story, lora=False)
    # llama-cli's --no-repack, and llama.cpp's default f16 K/V cache, change little: within issue 19's bounds, or
    # (where the shipped files are below them) as well as the shipped files, top-1 to two positions
    ref = _lqlr_logits(model, story)
    for name, kw in (("no-repack", {"repack": False}), ("K/V f16", {"kv": "f16"})):
        f = FIGURES[f"stories260K q4_0 (f16 fallback) Q+LR {name}"] = _agreement(
            ref, llamacpp.logits(files["q"], story, lora=files["q_lora"], **kw))
        assert f["kl_mean"] <= KL and f["top1"] >= min(TOP1, shipped["top1"] - 2 / f["positions"]), (name, f)


K_MODEL = dict(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, ctx=128)
K_GRIDS = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6, "iq4_xs": 4, "iq3_xxs": 3, "iq2_xs": 2,
           "iq2_s": 2}  # super-blocks


def test_stories_256_is_stories260k(story):
    """The padded model is stories260K's function (the k-quant comparisons below stand for the real model)."""
    ids = torch.tensor(story[:2])
    with torch.no_grad():
        ref, got = _stories()(ids).logits, _stories_256()(ids).logits
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@needs_llama_cpp
@pytest.mark.parametrize("grid", list(K_GRIDS))
def test_stories260k_k_quant_logits_match(grid, story, tok, tmp_path):
    """stories260K padded to 256 wide on Q2_K … Q6_K and IQ4_XS with rank-8 L, R: 30 linears in super-blocks, the five
    o_proj (rows of 64) compressed on llama.cpp's fallback type for them (Q4_K → Q5_0, ...); with lora.gguf against
    Q + L·R, without it against Q alone."""
    from lqlr.config import GGUF_FALLBACK

    export = _export(_stories_256(), tmp_path / grid, tok, grid=grid, bq=K_GRIDS[grid], group_size=256, rank=8)
    files = _files(export, tmp_path / "gguf")
    record = files["record"]
    assert not record["fallbacks"]  # every linear is in ggml blocks
    types = {e["source"].rsplit(".", 1)[0]: e["type"] for e in record["model"]["tensors"]
             if e["source"].startswith("model.layers.") and e["source"].endswith("_proj.weight")}
    assert len(types) == 35 and {n for n, t in types.items() if t != grid} == {f"model.layers.{i}.self_attn.o_proj" for i in range(5)}
    assert {types[f"model.layers.{i}.self_attn.o_proj"] for i in range(5)} == {GGUF_FALLBACK[grid]}
    want = {"q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S",
            "q6_k": "MOSTLY_Q6_K", "iq4_xs": "MOSTLY_IQ4_XS", "iq3_xxs": "MOSTLY_IQ3_XXS",
            "iq2_xs": "MOSTLY_IQ2_XS", "iq2_s": "MOSTLY_IQ2_S"}[grid]
    assert record["model"]["file_type"] == want
    _check_blocks(load(export), files)
    _compare(f"stories260K-256 {grid} Q+LR", load(export), files, story, lora=True)
    _compare(f"stories260K-256 {grid} Q", _q_only(load(export)), files, story, lora=False)


@needs_llama_cpp
def test_q4_k_m_mix_logits_match(story, tok, tmp_path):
    """llama.cpp's Q4_K_M mix: Q4_K, with v_proj and down_proj on Q6_K (budget.overrides): one model.gguf with
    both types (MOSTLY_Q4_K_M), each tensor decoded by ggml as lqlr's Q."""
    q6 = {"grid": "q6_k", "bq": 6, "group_size": 256}
    export = _export(_stories_256(), tmp_path / "q4_k_m", tok, grid="q4_k", bq=4, group_size=256, rank=8,
                     overrides=[{"match": ["v_proj", "down_proj"], **q6}])
    files = _files(export, tmp_path / "gguf")
    types = {e["source"].rsplit(".", 2)[-2]: e["type"] for e in files["record"]["model"]["tensors"]
             if e["source"].startswith("model.layers.0.")}
    assert types["v_proj"] == types["down_proj"] == "q6_k" and types["q_proj"] == types["gate_proj"] == "q4_k"
    assert files["record"]["model"]["file_type"] == "MOSTLY_Q4_K_M"
    _check_blocks(load(export), files)
    _compare("stories260K-256 Q4_K_M mix Q+LR", load(export), files, story, lora=True)


RANDOM = {  # name -> (model kwargs, export kwargs)
    "tiny untied f32 q4_1": (dict(ffn=128, layers=2, heads=4, kv_heads=2, ctx=128, eps=1e-6, theta=50000.0, tie=False),
                             dict(untouched="float32", grid="q4_1", bq=4, rank=8)),
    "random stories260K-sized q5_0": ({}, dict(grid="q5_0", bq=5, rank=8)),
    "tiny iq4_nl rank 0": (dict(ffn=128, layers=2, heads=4, kv_heads=2, ctx=128), dict(grid="iq4_nl", bq=4, rank=0)),
    # the k-quants' super-blocks need rows of 256: hidden 256, 4 heads of 64, GQA 2, FFN 512
    **{f"256-wide {grid}": (K_MODEL, dict(grid=grid, bq=bq, group_size=256, rank=rank))
       for grid, bq, rank in (("q4_k", 4, 8), ("q5_k", 5, 8), ("q6_k", 6, 0))},
}


@needs_llama_cpp
@pytest.mark.parametrize("name", list(RANDOM))
def test_random_llama_logits_match(name, tok, tmp_path):
    """Random Llamas: untied head, float32 untouched tensors, 4 heads of 16 with GQA 2, θ = 5e4, eps 1e-6; the
    stories260K shape; a Q-only export (no lora.gguf at all)."""
    model_kw, export_kw = RANDOM[name]
    export = _export(_random_llama(**model_kw), tmp_path / "export", tok, **export_kw)
    files = _files(export, tmp_path / "gguf")
    seqs = _random_sequences()
    _check_blocks(load(export), files)
    if files["q_lora"] is None:
        assert export_kw["rank"] == 0 and "ADAPTER" not in (tmp_path / "gguf" / "q" / "Modelfile").read_text()
        _compare(f"{name} Q", load(export), files, seqs, lora=False)
        return
    _compare(f"{name} Q+LR", load(export), files, seqs, lora=True)
    _compare(f"{name} Q", _q_only(load(export)), files, seqs, lora=False)


@needs_llama_cpp
def test_fine_tuned_adapter_logits_match(padded_exports, story, tmp_path):
    """A PEFT adapter with its own scales (lora_alpha = 2r; one module at rank 2 and alpha 2 by rank_pattern and
    alpha_pattern), written with
    --adapter: llama.cpp with that lora.gguf computes lqlr's PEFT forward with the adapter."""
    export, _ = padded_exports("q4_0")
    ft = tmp_path / "ft"
    shutil.copytree(export / "adapter", ft)
    cfg = json.loads((ft / "adapter_config.json").read_text())
    tensors = load_file(str(ft / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    odd = "model.layers.2.self_attn.q_proj"  # a permuted module at another rank: its fold differs
    for k in list(tensors):  # B halved under scale 2: about the export's L·R again, so the model stays a model
        tensors[k] = (0.5 if "lora_B" in k else 1) * tensors[k] + 0.02 * tensors[k].std() * torch.randn(
            tensors[k].shape, generator=gen)
        if odd in k:
            tensors[k] = tensors[k][:2] if "lora_A" in k else tensors[k][:, :2]
    cfg.update(lora_alpha=2 * cfg["r"], alpha_pattern={odd: 2}, rank_pattern={odd: 2})
    (ft / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ft / "adapter_model.safetensors"))
    files = _files(export, tmp_path / "gguf", adapter=ft)
    folds = files["record"]["lora"]["fold"]
    # alpha = 8 (the common rank); fold = s·k/alpha with PEFT's s = alpha/r: (16/8)·8/8 = 2, and (2/2)·2/8 for odd
    assert folds[odd] == 0.25 and folds["model.layers.0.self_attn.q_proj"] == 2.0
    model = load(export, peft=True, adapter=ft)
    _compare("stories260K-sized q4_0 fine-tuned adapter", model, files, story, lora=True)
    # the adapter's scale matters: llama.cpp at lora scale 1/2 is far from it
    half = _agreement(_lqlr_logits(model, story), llamacpp.logits(files["f32"], story, lora=files["f32_lora"],
                                                                   lora_scale=0.5))
    assert half["kl_mean"] >= KL, half


@needs_llama_cpp
def test_the_comparison_sees_a_wrong_export(padded_exports, story, tmp_path):
    """The exact comparison can fail: q/k rows left in transformers' order, another norm eps, another RoPE base,
    or lora.gguf's alpha doubled is far off (KL ≥ 1e-3 where the files as written give ≤ 1e-7)."""
    export, files = padded_exports("q4_0")
    seqs = story[:3]
    ref = _lqlr_logits(load(export), seqs)
    f32, lora = files["f32"], files["f32_lora"]
    from lqlr.io.gguf.convert import permute_rows

    def hf_order(name: str, a: np.ndarray) -> np.ndarray:
        if m := re.fullmatch(r"blk\.\d+\.attn_([qk])\.weight(\.lora_b)?", name):
            heads = 8 if m.group(1) == "q" else 4
            hf = a.reshape(heads, a.shape[0] // heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
            assert np.array_equal(permute_rows(hf, heads), a)
            return hf
        return a

    def value(target: str, new):
        return lambda name, v: new(v) if name == target else v

    bad = {
        "q/k rows not permuted": (_rewrite(f32, tmp_path / "a.gguf", tensor=hf_order),
                                  _rewrite(lora, tmp_path / "a-lora.gguf", tensor=hf_order)),
        "norm eps 1e-2": (_rewrite(f32, tmp_path / "b.gguf", key=value("llama.attention.layer_norm_rms_epsilon",
                                                                       lambda v: 1e-2)), lora),
        "RoPE base 1e5": (_rewrite(f32, tmp_path / "c.gguf", key=value("llama.rope.freq_base", lambda v: 1e5)), lora),
        "LoRA alpha doubled": (f32, _rewrite(lora, tmp_path / "d-lora.gguf",
                                             key=value("adapter.lora.alpha", lambda v: 2 * v))),
    }
    good = _agreement(ref, llamacpp.logits(f32, seqs, lora=lora))
    assert good["kl_max"] <= EXACT_KL
    for what, (model_file, lora_file) in bad.items():
        f = _agreement(ref, llamacpp.logits(model_file, seqs, lora=lora_file))
        assert f["kl_mean"] >= KL, (what, f)


# ----- the tokenizer ------------------------------------------------------------------------------
TEXTS = ["Once upon a time, there was a little girl named Lily.", "She saw a big, red ball!",
         "Tom said, \"Let's go!\" and they went home happily.", "Ünïcödé and 🙂 fall back to bytes",
         "The quick brown fox jumps over the lazy dog 12345.", "\nNew lines\tand tabs\n", STORY]


@needs_llama_cpp
def test_stories_tokenizer_in_llama_cpp(stories, tok):
    """llama.cpp's SentencePiece tokenizer with the exported vocabulary (scores from the merge order) tokenizes like
    transformers, BOS included (add_bos_token)."""
    _, files = stories
    for text in TEXTS:
        assert llamacpp.tokenize(files["q"], text) == tok.encode(text), text[:40]


# SmolLM2-135M-Instruct's config.json (as in test_gguf_export.py)
SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                  "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "vocab_size": 49152, "tie_word_embeddings": True}


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    try:
        from lqlr.engine.models import smollm2_gguf

        directory, gguf_file = smollm2_gguf()
    except ImportError as err:
        pytest.skip(str(err))
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


@needs_llama_cpp
def test_smollm2_tokenizer_in_llama_cpp(tmp_path):
    """A vocabulary-only GGUF with SmolLM2's tokenizer as lqlr writes it: llama.cpp's gpt2 tokenizer (pre-tokenizer
    smollm) tokenizes like transformers, special tokens included."""
    from lqlr.io.gguf.convert import add_hparams, llama_arch
    from lqlr.io.gguf.vocab import add_tokenizer

    tokenizer = _smollm2_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    add_hparams(writer, llama_arch(SMOLLM2_CONFIG), gguf.LlamaFileType.MOSTLY_Q4_1)
    add_tokenizer(writer, tmp_path / "tok", SMOLLM2_CONFIG["vocab_size"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for text in [*TEXTS, "<|im_start|>user\nHi there<|im_end|>\n", "  leading spaces,   runs   of them", "x = 3.14159"]:
        want = tokenizer.encode(text, add_special_tokens=False)
        assert llamacpp.tokenize(tmp_path / "vocab.gguf", text, special=False) == want, text[:40]


# ----- Ollama's Modelfile -------------------------------------------------------------------------
def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's parser (parser/parser.go, ``ParseFile``) reads a Modelfile: '#'
    comments, a command word, a value to the end of the line unless quoted ("..." or \"\"\"...\"\"\" over lines),
    ``PARAMETER name value``; ValueError where Ollama reports an error (unknown command, open quote, no FROM)."""
    commands = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
                "message", "requires"}
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
            continue
        word = re.match(r"[A-Za-z]*", text[i:]).group(0)
        i += len(word)
        if not word or i >= n or text[i] not in " \t" or word.lower() not in commands:
            raise ValueError(f"invalid command {word!r}")
        name = "model" if word.lower() == "from" else word.lower()
        if name in ("parameter", "message"):
            m = re.match(r"[ \t]+([A-Za-z0-9_]+)[ \t]", text[i:])
            if not m:
                raise ValueError(f"{word} without a name")
            name, i = m.group(1), i + m.end() - 1
        start = i
        while True:  # the value ends at the first line end where its quotes are closed
            j = min([k for k in (text.find("\n", i), text.find("\r", i)) if k >= 0], default=n)
            value = text[start:j].strip()
            if value.startswith('"""'):
                closed = len(value) >= 6 and value.endswith('"""')
            else:
                closed = not value.startswith('"') or (len(value) >= 2 and value.endswith('"'))
            if closed:
                break
            if j >= n:
                raise ValueError(f"{word}: unterminated quote")
            i = j + 1
        i = j
        value = value[3:-3] if value.startswith('"""') else value[1:-1] if value.startswith('"') else value
        out.append((name, value))
    if not any(name == "model" for name, _ in out):
        raise ValueError("no FROM line")
    return out


def _render_go_template(tmpl: str, messages: list[dict]) -> str:
    """A Go text/template as Ollama renders it, for the subset its ChatML template uses: text, {{ .Role }},
    {{ .Content }}, {{ range .Messages }}…{{ end }} and the {{- / -}} whitespace trims; ValueError otherwise."""
    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", tmpl)
    for k, t in enumerate(parts):
        if t.startswith("{{-") and k > 0:
            parts[k - 1] = parts[k - 1].rstrip()
        if t.endswith("-}}") and k + 1 < len(parts):
            parts[k + 1] = parts[k + 1].lstrip()
    actions = [re.fullmatch(r"\{\{-?\s*(.*?)\s*-?\}\}", t) for t in parts]

    def run(lo: int, hi: int, scope: dict) -> str:
        out, k = "", lo
        while k < hi:
            a = actions[k]
            if a is None:
                out += parts[k]
            elif a.group(1) == "range .Messages":
                depth, end = 1, k + 1
                while depth:
                    b = actions[end]
                    word = b.group(1) if b else ""
                    depth += word.startswith("range") - (word == "end")
                    end += 1
                out += "".join(run(k + 1, end - 1, msg) for msg in messages)
                k = end - 1
            elif a.group(1) in (".Role", ".Content"):
                out += scope[a.group(1)[1:].lower()]
            else:
                raise ValueError(f"template action {a.group(1)!r} is outside the subset")
            k += 1
        return out

    return run(0, len(parts), {})


def test_modelfile_parses_as_ollama_reads_it(stories):
    _, files = stories
    folder = files["q"].parent
    commands = parse_modelfile((folder / "Modelfile").read_text())
    assert commands == [("model", "./model.gguf"), ("adapter", "./lora.gguf")]
    for _, path in commands:  # Ollama resolves them against the Modelfile's folder
        assert (folder / path).resolve().is_file()
    for bad in ("ADAPTER ./lora.gguf\n", "FROM x\nBOGUS y\n", 'FROM x\nTEMPLATE """open\n'):  # what Ollama refuses
        with pytest.raises(ValueError):
            parse_modelfile(bad)


def test_chatml_modelfile_renders_like_the_chat_template():
    """SmolLM2-Instruct's Modelfile: the TEMPLATE (Ollama's ChatML) and the stops parse, and the template renders a
    conversation to the same text as the tokenizer's Jinja chat template."""
    from lqlr.io.gguf.export import modelfile
    from lqlr.io.gguf.vocab import VocabRecord

    tokenizer = _smollm2_tokenizer()
    vocab = VocabRecord(model="gpt2", pre="smollm", n_tokens=len(tokenizer), n_merges=0,
                        chat_template=tokenizer.chat_template, special_ids={})
    text, template, _ = modelfile(True, vocab)
    assert template == "chatml"
    commands = parse_modelfile(text)
    assert [c for c, _ in commands] == ["model", "adapter", "template", "stop", "stop"]
    assert [v for c, v in commands if c == "stop"] == ["<|im_start|>", "<|im_end|>"]
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    rendered = _render_go_template(dict(commands)["template"], messages)
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----- the build folder ---------------------------------------------------------------------------
def test_build_folder_is_checked(tmp_path, monkeypatch):
    """$LQLR_LLAMA_CPP names the folder; an empty one is 'not built', one whose build.json was made from another
    program source, version or cmake options is 'stale'; both say how to build, in one line."""
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path / "ll"))
    assert llamacpp.cache_dir() == tmp_path / "ll"
    reason = llamacpp.missing()
    assert reason.startswith(f"llama.cpp is not built in {tmp_path / 'll'}") and "\n" not in reason
    assert reason.endswith("run `python -m lqlr.util.llamacpp build`")
    with pytest.raises(llamacpp.LlamaCppError, match="not built"):
        llamacpp.logits(tmp_path / "model.gguf", [[1]])
    (tmp_path / "ll" / "bin").mkdir(parents=True)
    (tmp_path / "ll" / "bin" / llamacpp.PROGRAM).write_text("")
    stamp = {**llamacpp._wanted(), "build_seconds": 1.0}
    (tmp_path / "ll" / llamacpp.STAMP).write_text(json.dumps(stamp))
    assert llamacpp.missing() is None and llamacpp.find() == tmp_path / "ll" / "bin" / llamacpp.PROGRAM
    for key, value in (("program_sha256", "0" * 64), ("version", "0.0.1"), ("cmake_options", ["-DGGML_NATIVE=ON"])):
        (tmp_path / "ll" / llamacpp.STAMP).write_text(json.dumps({**stamp, key: value}))
        assert re.fullmatch(rf"the llama\.cpp build in \S+ is stale \({key} changed\): run .*", llamacpp.missing())
