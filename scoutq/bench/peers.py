"""The neutral judge (issue 22): tiny-trained quantized by several tools, judged in one `scoutq eval`.

    python -m scoutq.bench.peers [--dir DIR] [--llmc-python PYTHON]

Candidates, each made by its own tool from the same bf16 tiny-trained checkpoint:

* scoutq: w4a16-g128 (round-to-nearest), w4a16-g128-gptq, w4a16-g128-gptaq;
* llm-compressor (its own venv, `--llmc-python`; scoutq/bench/llmc_quantize.py runs there):
  W4A16 round-to-nearest (QuantizationModifier) and GPTQ (GPTQModifier, its default actorder
  static) calibrated on the builtin corpus's calibration split, the text scoutq's own builtin
  calibration set is drawn from; each as its Llama 4 example does (attention quantized too) and
  coverage-matched to scoutq's recipes (`-experts`: routed and shared experts only); skipped with
  one line when that venv is absent;
* bitsandbytes nf4, written by transformers (`BitsAndBytesConfig`, `save_pretrained`): attention
  and the shared expert in nf4, the fused routed experts left in bf16 as transformers leaves them.

All are then judged by one `scoutq eval CAND... --reference tiny-trained` run on the held-out
builtin split; its Markdown table and the pairwise KL differences are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from scoutq.bench._fixtures import fixture, scoutq_command
from scoutq.data.corpus import builtin_corpus

SCOUTQ_RECIPES = ("w4a16-g128", "w4a16-g128-gptq", "w4a16-g128-gptaq")


def bitsandbytes_nf4(source: Path, out: Path) -> Path | None:
    """transformers' own bnb nf4 checkpoint of `source` (None, with a line, when it cannot run)."""
    try:
        import torch
        import transformers
    except ImportError as missing:
        print(f"skipped bitsandbytes nf4: {missing} (install scoutq[dev])")
        return None
    if not (out / "config.json").is_file():
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config,
                                                                  dtype=torch.bfloat16, device_map="cpu")
        model.save_pretrained(out)
        for extra in source.iterdir():
            if extra.name.startswith("tokenizer"):
                shutil.copy(extra, out / extra.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(".cache/scoutq/tiny-trained"))
    parser.add_argument("--dir", type=Path, default=Path(".cache/scoutq/bench-peers"))
    parser.add_argument("--llmc-python", type=Path, default=Path(".cache/llmc-venv/bin/python"),
                        help="the interpreter of a venv with llm-compressor installed")
    args = parser.parse_args(argv)
    scoutq = scoutq_command()
    fixture(scoutq, args.source, "tiny-trained")
    args.dir.mkdir(parents=True, exist_ok=True)

    candidates = []
    for recipe in SCOUTQ_RECIPES:
        out = args.dir / f"scoutq-{recipe}"
        subprocess.run([scoutq, "quantize", str(args.source), "--recipe", recipe, "--out", str(out), "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
        candidates.append(out)
    installed = args.llmc_python.parent.parent / ".llmc-installed"  # make install-llmc's stamp
    if args.llmc_python.is_file() and installed.is_file():
        texts = args.dir / "calibration.json"  # the calibration split scoutq's own builtin set draws from
        texts.write_text(json.dumps(builtin_corpus().calibration))
        for scheme in ("rtn", "gptq", "rtn-experts", "gptq-experts"):
            out = args.dir / f"llmc-{scheme}"
            # -P: the script's folder (scoutq/bench, which has a kernels.py) stays off sys.path, where
            # transformers' probe for the `kernels` package would import it.
            made = subprocess.run([str(args.llmc_python), "-P", str(Path(__file__).with_name("llmc_quantize.py")),
                                   str(args.source), str(out), scheme, str(texts)])
            if made.returncode == 0:
                candidates.append(out)
            else:
                print(f"skipped llm-compressor {scheme}: it exited with code {made.returncode}")
    else:
        print(f"skipped llm-compressor: not installed at {args.llmc_python} (make install-llmc)")
    nf4 = bitsandbytes_nf4(args.source, args.dir / "transformers-bnb-nf4")
    if nf4 is not None:
        candidates.append(nf4)

    markdown = args.dir / "judged.md"
    subprocess.run([scoutq, "eval", *map(str, candidates), "--reference", str(args.source), "--markdown", str(markdown),
                    "--json", str(args.dir / "judged.json")], check=True, stdout=subprocess.DEVNULL)
    print(markdown.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
