"""Run inside llm-compressor's own venv (scoutq is not installed there): quantize a checkpoint.

    PYTHON llmc_quantize.py SOURCE OUT rtn|gptq|rtn-experts|gptq-experts TEXTS.json

W4A16 (int4, groups of 128, symmetric) on every Linear but the router, lm_head and the vision
tower, as llm-compressor's Llama 4 example does; the -experts variants also keep attention in
bf16, so they quantize exactly what scoutq's w4a16-g128 recipes quantize (routed and shared experts); GPTQ calibrates on up to 64 of the documents in
TEXTS.json (a JSON list of strings), 512 tokens each at most. Used by scoutq.bench.peers; kept
free of scoutq imports on purpose (scoutq is not installed in that venv).
"""

import json
import sys

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForImageTextToText, AutoTokenizer

IGNORE = ["re:.*lm_head", "re:.*router", "re:.*vision_model.*", "re:.*multi_modal_projector.*"]


def main() -> int:
    source, out, scheme, texts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ignore = IGNORE + (["re:.*self_attn.*"] if scheme.endswith("-experts") else [])
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if scheme.startswith("rtn"):
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=ignore))
    else:
        from datasets import Dataset

        documents = json.loads(open(texts, encoding="utf-8").read())[:64]
        data = Dataset.from_dict({"text": documents}).map(
            lambda row: tokenizer(row["text"], truncation=True, max_length=512), remove_columns=["text"])
        oneshot(model=model, dataset=data, processor=tokenizer,
                recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore),
                max_seq_length=512, num_calibration_samples=len(documents))
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
