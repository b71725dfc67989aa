"""lqlr-bench gguf's pieces on stories260K: reading GGUF files back into the model (lqlr's exports and llama.cpp's
own quants), the bits, the records and table, the commands recorded, and the message when llama.cpp's tools are
missing. The tests that run llama-quantize / llama-imatrix are marked llamacpp and skip without the build."""
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

import lqlr
from lqlr.bench import gguf as G
from lqlr.config import CompressConfig
from lqlr.engine.blocks import compress_model
from lqlr.engine.models import load_model
from lqlr.io.export import save_compressed
from lqlr.io.gguf import export_gguf
from lqlr.io.load import load
from lqlr.nn.layer import QLRLinear
from lqlr.util import llamacpp

TOOLS_MISSING = G.tools_missing()
PROGRAM_MISSING = llamacpp.missing()


def _export(tmp: Path, name: str, **qlr) -> Path:
    model, tokenizer = load_model("stories260k")
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = compress_model(model, calib, CompressConfig(qlr=lqlr.QLRConfig(iters=2, incoherence=False, **qlr)),
                             progress=False)
    return save_compressed(model, tmp / name, source={"model": "stories260k"}, reports=reports, tokenizer=tokenizer)


def _unpermute(a: np.ndarray, n_head: int | None) -> np.ndarray:
    """convert_hf_to_gguf's permute undone, written out here: GGUF rows (n_head, d/2, 2) → HF's (n_head, 2, d/2)."""
    if n_head is None:
        return a
    return a.reshape(n_head, a.shape[0] // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _heads(module: str) -> int | None:
    return 8 if module.endswith("q_proj") else 4 if module.endswith("k_proj") else None  # stories260K: 8 heads, 4 KV


@pytest.fixture(scope="module")
def reference():
    return load_model("stories260k")[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """stories260K on q4_0 with rank-4 L, R (down_proj's rows of 172: f16 fallback), as model.gguf + lora.gguf."""
    tmp = tmp_path_factory.mktemp("bench-gguf")
    export = _export(tmp, "s", grid="q4_0", bq=4, group_size=32, rank=4)
    record = export_gguf(export, tmp / "gguf")
    return export, tmp / "gguf", record


@pytest.mark.slow
def test_read_linears_is_lqlrs_q_and_lora_is_l_times_r(exported, reference):
    export, gdir, record = exported
    loaded = load(export)
    lin = G.read_linears(gdir / "model.gguf", reference)
    deltas, lora_bytes = G.read_lora(gdir / "lora.gguf", reference)
    assert len(lin.weights) == len(deltas) == 35
    for name, w in lin.weights.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QLRLinear)
        Q = layer.q_weight()
        if lin.types[name] == "q4_0":
            assert torch.equal(w, Q), name  # the blocks decode to lqlr's Q bit for bit, rows back in HF order
        else:
            assert lin.types[name] == "f16" and name.endswith("down_proj")
            assert torch.equal(w, Q.half().float()), name
        L, R = layer.factors()
        want = L.half().float() @ R.half().float()  # lora.gguf holds L (folded, fold 1) and R in f16
        torch.testing.assert_close(deltas[name], want, rtol=1e-5, atol=1e-6)
    b = G.bits(lin, lora_bytes, reference)
    assert b["bits_per_param"] == pytest.approx(record["summary"]["bits_per_param"], rel=1e-12)
    assert b["q_bits_per_param"] == pytest.approx(record["summary"]["q_bits_per_param"], rel=1e-12)


@pytest.mark.slow
def test_with_weights_replaces_only_the_linears(exported, reference):
    _, gdir, _ = exported
    lin = G.read_linears(gdir / "model.gguf", reference)
    deltas, _ = G.read_lora(gdir / "lora.gguf", reference)
    model = G.with_weights(reference, lin.weights, deltas)
    ref_state, state = reference.state_dict(), model.state_dict()
    for k, v in state.items():
        module = k.removesuffix(".weight")
        if module in lin.weights:
            assert torch.equal(v, lin.weights[module] + deltas[module]), k
        else:
            assert torch.equal(v, ref_state[k]), k
    assert not torch.equal(reference.get_submodule("model.layers.0.mlp.up_proj").weight,
                           model.get_submodule("model.layers.0.mlp.up_proj").weight)  # the reference is untouched


def test_reading_a_file_of_another_model_is_refused(exported):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, gdir, _ = exported
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=6,
                                         num_attention_heads=8, num_key_value_heads=4, vocab_size=512))
    with pytest.raises(ValueError, match="no tensor blk.5.attn_q.weight"):
        G.read_linears(gdir / "model.gguf", other)
    with pytest.raises(ValueError, match="not a llama.cpp LoRA adapter"):
        G.read_lora(gdir / "model.gguf", other)


def _rec(kind: str, method: str, bits: float, ppl: float, kl: float) -> dict:
    return {"model": "m", "type": kind, "method": method, "label": G.label(method, 8), "bits_per_param": bits,
            "q_bits_per_param": G.TYPE_BITS[kind], "ppl": ppl, "kl": kl, "ppl_reference": 10.0, "eval_tokens": 8192,
            "eval_seq_len": 2048, "linear_types": {kind: 210}}


def test_verdicts_and_table():
    records = [_rec("q4_0", "lqlr-k0", 4.5, 11.0, 0.05), _rec("q4_0", "lqlr-q", 4.5, 13.0, 0.2),
               _rec("q4_0", "lqlr-qlr", 4.87, 10.5, 0.02), _rec("q4_0", "llamacpp-imatrix", 4.5, 12.0, 0.1),
               _rec("q4_0", "llamacpp", 4.5, 13.5, 0.2), _rec("q5_0", "lqlr-qlr", 5.87, 10.4, 0.03),
               _rec("q5_0", "llamacpp-imatrix", 5.5, 10.6, 0.01)]
    v = {x["type"]: x for x in G.verdicts(records)}
    assert v["q4_0"]["lqlr-k0"] is True and v["q4_0"]["lqlr-q"] is False  # KL 0.2 > 0.1
    assert v["q4_0"]["next"] == "q5_0" and v["q4_0"]["lqlr-qlr"] is False  # ppl lower, but KL 0.02 > 0.01
    assert v["q5_0"]["next"] is None and "lqlr-k0" not in v["q5_0"]
    md = G.markdown(records, {"linears": 210, "command": "lqlr-bench gguf --types q4_0 q5_0"})
    assert "| q4_0 | lqlr-GGUF, LDLQ (k = 0) | q4_0 × 210 | 4.500 | 4.500 | 11.000 | 0.0500 |" in md
    assert "| q4_0 | yes | **no** | **no** (vs q5_0) |" in md
    assert "| q5_0 | – | – | – (no larger type measured) |" in md
    assert md.index("lqlr-GGUF, LDLQ") < md.index("llama.cpp, imatrix") < md.index("| q5_0 | lqlr-GGUF rank 8")
    assert "Produced by `lqlr-bench gguf --types q4_0 q5_0`" in md
    assert G.next_larger("iq4_nl", ["q4_0", "iq4_nl", "q4_1", "q8_0"]) == "q4_1"


def test_commands_are_recorded_without_machine_paths(tmp_path):
    cmd = ["lqlr-compress", *G.compress_command("smollm2-135m", "iq4_nl", "lqlr", 8, tmp_path / "exports" / "x", 2)]
    shown = G._shown(cmd, tmp_path)
    assert str(tmp_path) not in shown
    assert "method.grid=iq4_nl method.bq=4 method.group_size=32 method.incoherence=false" in shown
    assert "method.rank=8 method.bl=16 method.br=16 output_dir=WORK/exports/x" in shown
    assert "method.rank" not in G._shown(G.compress_command("m", "q4_0", "gptq", 8, tmp_path, 2), tmp_path)
    assert "act_order" not in shown
    ao = G._shown(G.compress_command("m", "q4_0", "gptq", 8, tmp_path, 2, act_order=True), tmp_path)
    assert "method.act_order=true" in ao and G.label("lqlr-k0", 8, True) == "lqlr-GGUF, LDLQ (k = 0), act-order"
    assert G.label("llamacpp", 8, True) == "llama.cpp, no imatrix"  # act-order is lqlr's
    assert G._scrub(f"{tmp_path}out", tmp_path) == f"{tmp_path}out"  # only the folder itself, not a name it begins


def test_missing_tools_skip_the_llamacpp_rows(tmp_path, monkeypatch, capsys):
    from lqlr.bench import main

    monkeypatch.setenv(llamacpp.ENV, str(tmp_path / "no-build"))
    why = G.tools_missing()
    assert why and "python -m lqlr.util.llamacpp build --tools quantize,imatrix,bench" in why
    with pytest.raises(llamacpp.LlamaCppError, match="llama-quantize is not built"):
        llamacpp.tool("quantize")
    main(["gguf", "--model", "stories260k", "--skip-lqlr", "--types", "q4_0", "--max-windows", "1", "--seq-len", "64",
          "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "results")])
    assert "lqlr-bench gguf: the llama.cpp rows: llama.cpp's llama-quantize and llama-imatrix are not built" \
        in capsys.readouterr().err
    data = json.loads((tmp_path / "results" / "gguf.json").read_text())
    assert data["records"] == [] and "are not built" in data["meta"]["skipped"]
    assert "--work-dir WORK" in data["meta"]["command"]
    with pytest.raises(SystemExit):
        main(["gguf", "--types", "q4_k", "--skip-llamacpp", "--work-dir", str(tmp_path / "w")])
    assert "choose from q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl" in capsys.readouterr().err


def test_llamacpp_rows_are_reused_from_an_earlier_results_file(tmp_path, monkeypatch, capsys):
    """--llamacpp-rows takes llama.cpp's rows of the --types from an earlier gguf.json (no tools needed), marks them
    and says so under the table; rows of another model or window length, a type without rows, or rows that disagree
    on the reference's ppl are refused in one line."""
    from lqlr.bench import main

    monkeypatch.setenv(llamacpp.ENV, str(tmp_path / "no-build"))
    rows = [{**_rec("q4_0", m, 4.5, 12.0, 0.1), "model": "stories260k", "eval_tokens": 64, "eval_seq_len": 64}
            for m in ("llamacpp-imatrix", "llamacpp")] + [_rec("q5_0", "llamacpp", 5.5, 11.0, 0.05)]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"records": rows, "meta": {"command": "lqlr-bench gguf --types q4_0",
                                                         "start_max_abs_diff": 0.0}}))
    args = ["gguf", "--model", "stories260k", "--skip-lqlr", "--max-windows", "1", "--seq-len", "64",
            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "results"), "--llamacpp-rows", str(old)]
    main([*args, "--types", "q4_0"])
    data = json.loads((tmp_path / "results" / "gguf.json").read_text())
    assert [r["method"] for r in data["records"]] == ["llamacpp-imatrix", "llamacpp"]
    assert all(r["reused_from"] == "old.json" for r in data["records"]) and data["meta"]["skipped"] is None
    assert data["meta"]["llamacpp_rows_from"] == {"file": "old.json", "command": "lqlr-bench gguf --types q4_0"}
    md = (tmp_path / "results" / "gguf.md").read_text()
    assert "| q4_0 | llama.cpp, imatrix | q4_0 × 210 | 4.500 | 4.500 | 12.000 | 0.1000 |" in md
    assert "kept from old.json as measured there" in md
    for types, message in ((["q5_0"], "row was measured on (model, tokens, window) = ('m', 8192, 2048)"),
                           (["q4_0", "q8_0"], "has no llama.cpp rows for q8_0")):
        with pytest.raises(SystemExit):  # lqlr-bench reports a ValueError in one line
            main([*args, "--types", *types])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="disagree on the reference"):
        G.check_reference([rows[0], {**rows[1], "ppl_reference": 10.01}])
    G.check_reference([rows[0], {**rows[1], "ppl_reference": 10.0001}])  # another thread count's float sums


# ----- with llama.cpp's tools ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A stories260K model.gguf on q8_0 (rank 0), f32 where rows are not 32-blocks: a source for llama-quantize."""
    tmp = tmp_path_factory.mktemp("bench-gguf-src")
    export = _export(tmp, "s8", grid="q8_0", bq=8, group_size=32, rank=0)
    export_gguf(export, tmp / "gguf", fallback_type="f32")
    return tmp / "gguf" / "model.gguf"


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.skipif(TOOLS_MISSING is not None or PROGRAM_MISSING is not None,
                    reason=str(TOOLS_MISSING or PROGRAM_MISSING))
def test_llama_quantize_and_imatrix_read_back_like_gguf_py_and_ggml(source, reference, tmp_path):
    out = tmp_path / "q4_0.gguf"
    cmd = G.quantize(source, out, "q4_0", threads=2)
    assert cmd == ["llama-quantize", "--allow-requantize", "model.gguf", "q4_0.gguf", "Q4_0", "2"]
    lin = G.read_linears(out, reference)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    ggml = llamacpp.dequantize(out)  # ggml's own to_float of every tensor
    names = G._names(reference)
    assert lin.types["model.layers.0.self_attn.q_proj"] == "q4_0"
    for name, (gname, _) in names.items():
        t = tensors[gname]
        want = _unpermute(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32), _heads(name))
        assert np.array_equal(lin.weights[name].numpy(), want), name  # gguf-py's decoding, rows in HF order
        assert np.array_equal(lin.weights[name].numpy(), _unpermute(ggml[gname], _heads(name))), name  # = ggml's
        assert lin.nbytes[name] == t.n_bytes
    # an importance matrix from a text, then the same type with it: another quantization of the same weights
    from lqlr.calibrate.text import wikitext2_text

    text = wikitext2_text("validation")[:20_000]
    imat = tmp_path / "imatrix.gguf"
    G.imatrix(source, text, imat, chunks=2, ctx=64)
    assert imat.is_file()
    G.quantize(source, tmp_path / "iq4_nl-imatrix.gguf", "iq4_nl", imat)
    with_imat = G.read_linears(tmp_path / "iq4_nl-imatrix.gguf", reference)
    G.quantize(source, tmp_path / "iq4_nl.gguf", "iq4_nl")
    plain = G.read_linears(tmp_path / "iq4_nl.gguf", reference)
    name = "model.layers.0.mlp.up_proj"
    assert with_imat.types[name] == plain.types[name] == "iq4_nl"
    assert not torch.equal(with_imat.weights[name], plain.weights[name])
    w = reference.get_submodule(name).weight.detach()
    assert float((plain.weights[name] - w).norm() / w.norm()) < 0.15  # a 4.5-bit copy of the same weights
