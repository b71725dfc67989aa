"""`lqlr-bench gguf-speed`: its table, its target's verdict and its refusals (the timing itself is llama.cpp's; that it
generates lqlr's greedy tokens is tests/test_llamacpp.py's test_decode_speed_generates_lqlrs_greedy_tokens)."""
import pytest

from lqlr.bench import gguf_speed as S


def _rec(kind, method, tok_s, bits=4.5):  # noqa: D103
    return {"model": "m", "type": kind, "method": method, "label": S.label(method, kind, 16), "bits_per_param": bits,
            "decode_tok_s": tok_s, "prompt_tok_s": 10 * tok_s}


def test_verdict_and_table():
    records = [_rec(None, "llamacpp-f32", 40.0, 32.0), _rec("q4_0", "llamacpp", 80.0), _rec("q4_0", "lqlr-k0", 80.0),
               _rec("q4_0", "lqlr-q", 79.0), _rec("q4_0", "lqlr-qlr", 70.0, 5.24), _rec("iq4_nl", "llamacpp", 60.0),
               _rec("iq4_nl", "lqlr-qlr", 50.0, 5.24), _rec(None, "transformers-fp32", 20.0, 32.0)]
    v = {x["type"]: x for x in S.verdicts(records)}
    assert v["q4_0"]["ratio"] == pytest.approx(70 / 80) and v["q4_0"]["met"] is False  # 0.875 < 0.9
    assert v["q4_0"]["method"] == "lqlr-qlr"  # no Q8_0-embedding row given
    assert v["iq4_nl"]["ratio"] == pytest.approx(50 / 60) and not v["iq4_nl"]["met"]
    assert S.verdicts([_rec("q4_0", "llamacpp", 80.0), _rec("q4_0", "lqlr-qlr", 72.0)])[0]["met"] is True
    both = S.verdicts([_rec("q4_0", "llamacpp", 80.0), _rec("q4_0", "lqlr-qlr", 60.0), _rec("q4_0", "lqlr-qlr-q8e", 75.0)])
    assert [(x["method"], x["met"]) for x in both] == [("lqlr-qlr", False), ("lqlr-qlr-q8e", True)]
    md = S.markdown(records, {"model": "m", "threads": 2, "prompt_len": 16, "new_tokens": 64, "repeats": 3,
                              "command": "lqlr-bench gguf-speed --types q4_0 iq4_nl"})
    assert "| q4_0 | lqlr-GGUF q4_0 rank 16: model.gguf + lora.gguf | 5.240 | 70.0 | 0.88 | 700.0 |" in md
    assert "| – | transformers, fp32 | 32.000 | 20.0 |  | 200.0 |" in md  # no same-type quant to compare with
    assert "| q4_0 | lqlr-GGUF q4_0 rank 16: model.gguf + lora.gguf | 0.88 | **no** |" in md and "Produced by `lqlr-bench gguf-speed --types q4_0 iq4_nl`" in md


def test_prompt_is_seeded_and_in_the_vocabulary():
    p = S.prompt_ids(100, 16)
    assert p == S.prompt_ids(100, 16) and len(p) == 16 and all(0 <= t < 100 for t in p)
    assert p != S.prompt_ids(100, 16, seed=1)


def test_missing_lqlr_files_name_the_command_that_makes_them(tmp_path, capsys):
    from lqlr.bench import main

    with pytest.raises(ValueError, match=r"model.gguf is missing: run `lqlr-bench gguf --types q4_0 --lora-types q4_0 "
                                         r"--rank 16 --work-dir"):
        S.lqlr_files(tmp_path, "q4_0", 16)
    with pytest.raises(SystemExit):
        main(["gguf-speed", "--types", "q4_k", "--work-dir", str(tmp_path)])
    assert "--types q4_k: choose from q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gguf-speed", "--work-dir", str(tmp_path)])
    assert "q4_0-k0-ao/model.gguf is missing" in capsys.readouterr().err
    for d in ("q4_0-k0-ao", "q4_0-r16-ao"):
        for sub, f in (("gguf", "model.gguf"), ("exports", "manifest.json")):
            (tmp_path / sub / d).mkdir(parents=True)
            (tmp_path / sub / d / f).write_bytes(b"")
    (tmp_path / "gguf" / "q4_0-r16-ao" / "lora.gguf").write_bytes(b"")
    assert set(S.lqlr_files(tmp_path, "q4_0", 16)) == {"lqlr-k0", "lqlr-q", "lqlr-qlr"}
    with pytest.raises(SystemExit):
        main(["gguf-speed", "--new-tokens", "0", "--work-dir", str(tmp_path)])
    assert "--new-tokens, --prompt-len and --repeats must be at least 1" in capsys.readouterr().err
