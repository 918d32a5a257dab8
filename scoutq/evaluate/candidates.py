"""Several quantized candidates judged on the same windows against one reference: one table.

Each candidate gets the single-model report (`build_report`) plus its size on disk and bits per
weight; every pair of candidates gets the difference of their mean KL with a 95% interval
paired by window. Pairing is what makes "A is better than B" a claim: both were scored on
identical windows, so the hard windows that raise both KLs cancel in the difference, and the
interval measures only how consistently one candidate beats the other.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

from scoutq.checkpoint.gguf_file import is_gguf
from scoutq.checkpoint.reader import Checkpoint
from scoutq.evaluate.compare import Comparison
from scoutq.evaluate.metrics import mean_interval
from scoutq.evaluate.report import format_number

NOT_TEXT = ("vision_model.", "multi_modal_projector.")  # towers the text model never reads


def describe_candidate(path: Path) -> tuple[str, int]:
    """(the format, as its reader names it; bytes of the weights the text model reads: every tensor
    but a vision tower's, or the whole GGUF file), from one read of the headers."""
    if is_gguf(path):
        return "GGUF", path.stat().st_size
    checkpoint = Checkpoint.open(path)
    size = sum(info.nbytes for key, info in checkpoint.tensors.items() if not key.startswith(NOT_TEXT))
    if "quantization_config" not in checkpoint.config_json:
        return "unquantized", size
    from scoutq.foreign import weight_source

    return weight_source(checkpoint).format, size


def pairwise_kl(names: list[str], comparisons: list[Comparison]) -> list[dict[str, Any]]:
    """mean KL(A) - mean KL(B) for every pair, with its 95% interval paired by window."""
    pairs = []
    for (a, first), (b, second) in combinations(zip(names, comparisons, strict=True), 2):
        if first.window_kl is None or second.window_kl is None:
            continue
        difference, low, high = mean_interval(first.window_kl - second.window_kl, first.window_tokens)
        better = None
        if high < 0:
            better = a
        elif low > 0:
            better = b
        pairs.append({"a": a, "b": b, "kl_difference": difference, "low": low, "high": high,
                      "lower_kl": better})
    return pairs


def candidates_report(reports: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> dict[str, Any]:
    first = reports[0]
    return {"format": "scoutq-eval-candidates/1", "reference": first["reference"], "dataset": first["dataset"],
            "candidates": reports, "pairwise_kl": pairs, "environment": first["environment"]}


def candidate_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): a column per candidate, a row per measure, routing agreement per layer."""
    candidates = report["candidates"]
    header = ["measure"] + [Path(c["model"]).name for c in candidates]

    def row(label: str, value: Any) -> list[str]:
        return [label] + [value(c) for c in candidates]

    def interval(values: list[float] | None) -> str:
        return "" if not values else f" [{format_number(values[0], 3)}, {format_number(values[1], 3)}]"

    rows = [
        row("format", lambda c: c["quantized_format"]),
        row("size (MB)", lambda c: f"{c['size_bytes'] / 1e6:.2f}"),
        row("bits per weight", lambda c: f"{c['bits_per_weight']:.2f}"),
        row("perplexity", lambda c: format_number(c["perplexity"]["value"])),
        row("perplexity gap % (paired 95%)", lambda c: format_number(c["perplexity_gap_pct"], 3)
            + interval(c["perplexity_gap_interval_pct"])),
        row("KL mean [95%]", lambda c: format_number(c["kl"]["mean"]) + interval([c["kl"]["mean_low"], c["kl"]["mean_high"]])),
        row("KL p99", lambda c: format_number(c["kl"]["p99"])),
        row("top-1 agreement", lambda c: f"{c['top1_agreement']:.4f}"),
    ]
    for index, layer in enumerate(candidates[0]["routing"]):
        rows.append(row(f"routing agreement, layer {layer['layer']}",
                        lambda c, index=index: format_number(c["routing"][index]["agreement"])))
    return header, rows


def pairwise_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for pair in report["pairwise_kl"]:
        a, b = Path(pair["a"]).name, Path(pair["b"]).name
        verdict = "no difference at 95%" if pair["lower_kl"] is None else f"{Path(pair['lower_kl']).name} is closer"
        rows.append([f"{a} - {b}", f"{format_number(pair['kl_difference'])} [{format_number(pair['low'])}, {format_number(pair['high'])}]",
                     verdict])
    return rows


def render_candidates_markdown(report: dict[str, Any]) -> str:
    dataset = report["dataset"]
    header, rows = candidate_table(report)
    lines = [f"# scoutq eval: {len(report['candidates'])} candidates against {report['reference']}", "",
             f"{dataset['name']}: {dataset['windows']} windows of {dataset['seq_len']} tokens, "
             f"{dataset['tokens_scored']} tokens scored, the same windows for every candidate.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Pairwise KL difference (paired by window, 95%)", "",
              "| pair | mean KL difference | verdict |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in pairwise_rows(report)]
    return "\n".join(lines) + "\n"
