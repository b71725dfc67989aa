"""A tokenizer folder as GGUF ``tokenizer.ggml.*`` keys, the way llama.cpp's convert_hf_to_gguf.py writes them.

Two BPE tokenizers of Llama-family models are supported, both read from ``tokenizer.json`` (+
``tokenizer_config.json``, ``chat_template.jinja``):

* **gpt2** (byte-level BPE, no byte fallback; SmolLM/SmolLM2): the tokens with their types
  (NORMAL, CONTROL for special added tokens, USER_DEFINED for other added tokens, UNUSED
  ``[PADi]`` up to the model's vocab size), the merges, and the pre-tokenizer name that llama.cpp
  finds by hashing the tokenization of its probe text (``PRE_TOKENIZERS``; an unknown hash is refused).
* **llama** (SentencePiece-style BPE with byte fallback, a ``Metaspace`` pre-tokenizer; stories260K,
  Llama 1/2): tokens and types as gguf-py's ``LlamaHfVocab`` reads them (BYTE for ``<0xXX>``,
  CONTROL for special tokens), pre-tokenizer ``default``, no merges. llama.cpp's SentencePiece
  tokenizer merges the adjacent pair whose joined token has the highest *score*; convert_hf_to_gguf
  writes -1000 for every token of such a folder (it has no ``tokenizer.model`` to read scores from),
  which makes llama.cpp merge left to right instead of in merge order. Here a token made by a merge
  scores minus the rank of its first merge in ``tokenizer.json`` (earlier merges win, as in the BPE
  the folder describes) and every other token scores below all merges.

Special token ids, ``add_bos_token``/``add_eos_token``, merges and the chat template come from
gguf-py's ``SpecialVocab``, as in llama.cpp.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf

# llama.cpp's probe text for BPE pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre): the sha256 of
# str(tokenizer.encode(CHKTXT)) names the pre-tokenizer
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо "
    "на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
# the hashes of the gpt2-style tokenizers lqlr writes, with llama.cpp's name for each (LLAMA_VOCAB_PRE_TYPE_*)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
}
UNMERGED_SCORE_OFFSET = 1.0  # tokens no merge makes score -(number of merges) - 1: below every merge


@dataclass(frozen=True)
class VocabRecord:
    """What :func:`add_tokenizer` wrote: tokenizer model, pre-tokenizer, token count, chat template."""

    model: str
    pre: str
    n_tokens: int
    n_merges: int
    chat_template: str | None
    special_ids: dict[str, int]

    def to_dict(self) -> dict:
        return {"model": self.model, "pre": self.pre, "n_tokens": self.n_tokens, "n_merges": self.n_merges,
                "chat_template": self.chat_template is not None, "special_ids": dict(self.special_ids)}


def tokenizer_kind(folder: Path) -> str:
    """``"gpt2"`` or ``"llama"`` for the BPE tokenizer in ``folder/tokenizer.json``; one-line ValueError otherwise."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json: GGUF needs the tokenizer; pass --tokenizer DIR "
                         "(a folder with tokenizer.json and tokenizer_config.json, e.g. the source model's)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path} holds a {model.get('type')!r} tokenizer: lqlr-export gguf writes BPE tokenizers "
                         "only (gpt2-style as SmolLM2's, SentencePiece-style as Llama's)")
    if model.get("byte_fallback"):
        if (spec.get("decoder") or {}).get("type") != "Sequence":
            raise ValueError(f"{path}: a byte-fallback BPE without a SentencePiece-style decoder is not a Llama "
                             "tokenizer lqlr-export gguf knows")
        return "llama"
    return "gpt2"


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> VocabRecord:
    """Write the ``tokenizer.ggml.*`` keys (and ``tokenizer.chat_template``) of the tokenizer in ``folder``
    for a model with ``vocab_size`` embedding rows.

    ``add_bos_token``/``add_eos_token`` are those SpecialVocab reads from the folder, else what the tokenizer
    does (whether encoding a text starts with BOS / ends with EOS), so llama.cpp never falls back to its own
    default for them."""
    kind = tokenizer_kind(folder)
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if (prefix := tok_config.get("add_prefix_space")) is not None:  # as LlamaModel.set_vocab
        writer.add_add_space_prefix(bool(prefix))
    if kind == "gpt2":
        tok = _auto_tokenizer(folder)
        tokens, toktypes, pre = _gpt2_vocab(tok, folder, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(toktypes)
        special = gguf.SpecialVocab(folder, load_merges=True)
    else:
        hf = gguf.LlamaHfVocab(folder)
        tok = hf.tokenizer
        tokens, scores, toktypes = _llama_vocab(hf, folder, vocab_size)
        pre = "default"
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(toktypes)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    probe = tok.encode("a")
    for typ, tid, at in (("bos", tok.bos_token_id, 0), ("eos", tok.eos_token_id, -1)):
        if typ not in special.add_special_token:
            special.add_special_token[typ] = bool(tid is not None and probe and probe[at] == tid)
    special.add_to_gguf(writer, quiet=True)
    template = special.chat_template if isinstance(special.chat_template, str) else None
    return VocabRecord(model=kind, pre=pre, n_tokens=len(tokens), n_merges=len(special.merges),
                       chat_template=template, special_ids=dict(special.special_token_ids))


def _auto_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens to mark CONTROL although not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _gpt2_vocab(tok, folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name of the transformers tokenizer ``tok`` (read from ``folder``),
    as llama.cpp's get_vocab_base / get_vocab_base_pre."""
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{folder}: the tokenizer has ids up to {max(vocab.values())}, the model only "
                         f"{vocab_size} embedding rows: the tokenizer is not this model's")
    chkhsh = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh not in PRE_TOKENIZERS:
        raise ValueError(f"{folder}: unrecognised BPE pre-tokenizer (llama.cpp chkhsh {chkhsh}); lqlr-export gguf "
                         f"knows {', '.join(sorted(PRE_TOKENIZERS.values()))}: convert dense/ with llama.cpp's "
                         "convert_hf_to_gguf.py for other tokenizers")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp assumes CONTROL/USER_DEFINED tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, toktypes, PRE_TOKENIZERS[chkhsh]


def merge_scores(folder: Path, n_tokens: int) -> list[float]:
    """SentencePiece scores of the tokens ``0 .. n_tokens-1`` from the merge order of ``tokenizer.json``:
    a token made by a merge scores −(rank of its first merge), every other token −(number of merges) − 1."""
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    scores = [-(len(merges) + UNMERGED_SCORE_OFFSET)] * n_tokens
    for rank in range(len(merges) - 1, -1, -1):  # backwards: the first merge making a token wins
        tid = vocab.get("".join(merges[rank]))
        if tid is not None and tid < n_tokens:
            scores[tid] = -float(rank)
    return scores


def _llama_vocab(hf: gguf.LlamaHfVocab, folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens and types as gguf-py's LlamaHfVocab ``hf`` of ``folder`` reads them (what convert_hf_to_gguf's
    _set_vocab_llama_hf writes), scores from the merge order (:func:`merge_scores`), ``[PADi]`` up to ``vocab_size``."""
    tokens, toktypes = [], []
    for text, _score, toktype in hf.all_tokens():
        tokens.append(text)
        toktypes.append(int(toktype))
    if len(tokens) > vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tokens)} tokens, the model only {vocab_size} embedding "
                         "rows: the tokenizer is not this model's")
    scores = merge_scores(folder, len(tokens))
    for i in range(len(tokens), vocab_size):  # llama.cpp pads a SentencePiece vocab the same way
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        toktypes.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, toktypes
