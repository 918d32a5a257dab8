"""The eval report: one JSON document (schema `scoutq-eval/1`, below) and its Markdown rendering.

    {
      "format": "scoutq-eval/1",
      "model": str, "reference": str | null,
      "dataset": {"name": str, "seq_len": int, "windows": int, "tokens_scored": int,
                  "windowing": "stream" | "documents"},
      "perplexity": {"value": float, "low": float, "high": float},        # 95% interval over windows
      "reference_perplexity": {...same...} | null,
      "perplexity_gap_pct": float | null,                                  # 100 * (ppl / ref_ppl - 1)
      "perplexity_gap_interval_pct": [float, float] | null,                # 95%, paired by window
      "kl": {"mean", "mean_low", "mean_high", "median", "p99", "max"} | null,   # KL(ref || model), nats
      "top1_agreement": float | null,                                      # share of tokens, 0..1
      "routing": [{"layer": int, "agreement": float | null,                # same top-k expert set
                   "expert_share": [float], "reference_expert_share": [float] | null}],
      "quantization_error": {"layers": [int], "weight_sqnr_db": [[float]], "output_sqnr_db": [[float]],
                             "tokens": [[int]], "shared_weight_sqnr_db": [float],
                             "shared_output_sqnr_db": [float]} | null,     # NaN written as null
      "latency": {...LatencyReport.to_json()...} | null,
      "tasks": {"harness": str, "tasks": [str], "limit": int | null,      # `--tasks`, through lm-eval
                "rows": [{"task", "metric", "filter", "n_shot", "higher_is_better", "samples", "value",
                          "stderr", "reference", "reference_stderr", "recovery", "recovery_low",
                          "recovery_high"}],                               # recovery: 1.0 = nothing lost
                "rolling": {task: {"token_perplexity", "tokens", "documents"}},
                "reference_rolling": {...same...} | null} | null,
      "environment": {"scoutq": str, "torch": str, "threads": int, "device": str, "dtype": str, "backend": str},
      "seconds": float
    }

Every number a person reads in the terminal or the Markdown comes from this document.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch

from scoutq.evaluate.compare import Comparison
from scoutq.evaluate.metrics import Perplexity, mean_interval
from scoutq.evaluate.quant_error import ErrorTables

FORMAT = "scoutq-eval/1"


def _clean(value: Any) -> Any:
    """JSON has no NaN or Infinity: write null for NaN, a large number for +inf."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return 1e308 if value > 0 else -1e308
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _perplexity(value: Perplexity | None) -> dict[str, float] | None:
    return None if value is None else {"value": value.value, "low": value.low, "high": value.high}


def perplexity_gap_interval(window_nll: torch.Tensor, reference_window_nll: torch.Tensor) -> list[float] | None:
    """95% interval of the perplexity gap in percent, paired by window.

    Both models score the same windows, so the gap's uncertainty is that of the mean per-window
    NLL difference, far narrower than the two perplexities' own intervals (which mostly measure
    how hard the text is). Every window scores the same number of tokens, so the mean of the
    window differences is the difference of the means: exp of its bounds, minus 1, in percent.
    None for fewer than two windows."""
    _, low, high = mean_interval(window_nll.double() - reference_window_nll.double())
    if math.isnan(low):
        return None
    return [100.0 * math.expm1(low), 100.0 * math.expm1(high)]


def build_report(model: str, reference: str | None, dataset: str, seq_len: int, comparison: Comparison,
                 errors: ErrorTables | None, latency: dict[str, Any] | None, environment: dict[str, Any],
                 seconds: float, windowing: str = "stream", tasks: dict[str, Any] | None = None) -> dict[str, Any]:
    gap = gap_interval = None
    if comparison.reference_perplexity is not None:
        gap = 100.0 * (comparison.perplexity.value / comparison.reference_perplexity.value - 1.0)
    if comparison.reference_window_nll is not None:
        gap_interval = perplexity_gap_interval(comparison.window_nll, comparison.reference_window_nll)
    routing = []
    for row, layer in enumerate(comparison.moe_layers):
        counts = comparison.expert_counts[row].double()
        entry: dict[str, Any] = {"layer": layer, "agreement": None,
                                 "expert_share": (counts / counts.sum().clamp_min(1)).tolist(),
                                 "reference_expert_share": None}
        if comparison.routing_agreement is not None:
            entry["agreement"] = comparison.routing_agreement[layer]
        if comparison.reference_expert_counts is not None:
            ref = comparison.reference_expert_counts[row].double()
            entry["reference_expert_share"] = (ref / ref.sum().clamp_min(1)).tolist()
        routing.append(entry)
    return _clean({
        "format": FORMAT,
        "model": model,
        "reference": reference,
        "dataset": {"name": dataset, "seq_len": seq_len, "windows": comparison.windows,
                    "tokens_scored": comparison.tokens_scored, "windowing": windowing},
        "perplexity": _perplexity(comparison.perplexity),
        "reference_perplexity": _perplexity(comparison.reference_perplexity),
        "perplexity_gap_pct": gap,
        "perplexity_gap_interval_pct": gap_interval,
        "kl": comparison.kl,
        "top1_agreement": comparison.top1_agreement,
        "routing": routing,
        "quantization_error": asdict(errors) if errors is not None else None,
        "latency": latency,
        "tasks": tasks,
        "environment": environment,
        "seconds": seconds,
    })


def format_number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) pairs shared by the terminal table and the Markdown."""
    ppl = report["perplexity"]
    rows = [("perplexity", f"{ppl['value']:.4f} [{format_number(ppl['low'])}, {format_number(ppl['high'])}]")]
    if report["reference_perplexity"] is not None:
        ref = report["reference_perplexity"]
        rows.append(("reference perplexity", f"{ref['value']:.4f} [{format_number(ref['low'])}, {format_number(ref['high'])}]"))
        gap = f"{report['perplexity_gap_pct']:+.3f}%"
        if report.get("perplexity_gap_interval_pct") is not None:
            low, high = report["perplexity_gap_interval_pct"]
            gap += f" [{low:+.3f}%, {high:+.3f}%]"
        rows.append(("perplexity gap", gap))
    if report["kl"] is not None:
        kl = report["kl"]
        rows.append(("KL divergence mean", f"{format_number(kl['mean'], 5)} [{format_number(kl['mean_low'], 5)}, {format_number(kl['mean_high'], 5)}]"))
        rows.append(("KL divergence p99 / max", f"{format_number(kl['p99'], 5)} / {format_number(kl['max'], 5)}"))
        rows.append(("top-1 agreement", f"{100 * report['top1_agreement']:.2f}%"))
        agreements = [r["agreement"] for r in report["routing"] if r["agreement"] is not None]
        if agreements:
            rows.append(("routing agreement (min over layers)", f"{100 * min(agreements):.2f}%"))
    errors = report["quantization_error"]
    if errors is not None and errors["weight_sqnr_db"]:
        flat = [v for row in errors["output_sqnr_db"] for v in row if v is not None]
        weights = [v for row in errors["weight_sqnr_db"] for v in row if v is not None]
        if weights:
            rows.append(("expert weight SQNR (min / mean)", f"{min(weights):.2f} / {sum(weights) / len(weights):.2f} dB"))
        if flat:
            rows.append(("expert output SQNR (min / mean)", f"{min(flat):.2f} / {sum(flat) / len(flat):.2f} dB"))
    latency = report["latency"]
    if latency is not None:
        rows.append(("prefill", f"{latency['prefill_tokens_per_s']:.1f} tok/s ({latency['prompt_len']} tokens)"))
        rows.append(("time to first token", f"{1000 * latency['time_to_first_token_s']:.1f} ms"))
        for batch, figures in latency["decode"].items():
            rows.append((f"decode, batch {batch}", f"{figures['tokens_per_s']:.1f} tok/s ({figures['ms_per_step']:.2f} ms/step)"))
        if latency.get("kernels"):
            rows.append(("kernels (calls)", kernel_line(latency["kernels"])))
        rows.append(("weights", f"{latency['weight_bytes'] / 1e6:.2f} MB"))
        rows.append(("peak RSS", f"{latency['peak_rss_bytes'] / 1e9:.3f} GB"))
        if latency.get("gpu_peak_bytes"):
            rows.append(("peak GPU memory", f"{latency['gpu_peak_bytes'] / 1e9:.3f} GB"))
    return rows


TASK_COLUMNS = ["task", "metric", "value ± stderr", "reference ± stderr", "recovery [95%]"]


def task_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the `--tasks` table: score with its standard error, the reference's, recovery."""

    def scored(value: float | None, stderr: float | None) -> str:
        if value is None:
            return "–"
        return f"{format_number(value)} ± {format_number(stderr)}" if stderr is not None else format_number(value)

    rows = []
    for row in (report.get("tasks") or {}).get("rows", []):
        name = row["metric"] if row["filter"] == "none" else f"{row['metric']} ({row['filter']})"
        recovered = "–"
        if row["recovery"] is not None:
            recovered = f"{100 * row['recovery']:.2f}%"
            if row["recovery_low"] is not None:
                recovered += f" [{100 * row['recovery_low']:.2f}%, {100 * row['recovery_high']:.2f}%]"
        rows.append([row["task"], name, scored(row["value"], row["stderr"]),
                     scored(row["reference"], row["reference_stderr"]), recovered])
    return rows


def rolling_rows(report: dict[str, Any]) -> list[list[str]]:
    """Token perplexity of each rolling task, from the harness's own windows."""
    tasks = report.get("tasks") or {}
    rows = []
    for task, figures in (tasks.get("rolling") or {}).items():
        reference = (tasks.get("reference_rolling") or {}).get(task)
        rows.append([task, f"{figures['token_perplexity']:.4f}",
                     "–" if reference is None else f"{reference['token_perplexity']:.4f}", str(figures["tokens"])])
    return rows


def routing_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for entry in report["routing"]:
        share = entry["expert_share"]
        agreement = "–" if entry["agreement"] is None else f"{100 * entry['agreement']:.2f}%"
        rows.append([str(entry["layer"]), agreement, f"{100 * min(share):.1f}%", f"{100 * max(share):.1f}%"])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """A release-note section: the summary, routing per layer, and the expert error table."""
    dataset = report["dataset"]
    lines = [f"## Evaluation of `{report['model']}`", ""]
    if report["reference"]:
        lines += [f"Reference: `{report['reference']}`.", ""]
    documents = " (each document alone, every token scored once, as lm-eval's rolling tasks)" \
        if dataset.get("windowing") == "documents" else ""
    lines += [(f"{dataset['windows']} windows of {dataset['seq_len']} tokens from `{dataset['name']}`{documents} "
              f"({dataset['tokens_scored']} scored tokens); intervals are 95% over windows."), "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary_rows(report)]
    if report["routing"]:
        lines += ["", "### Routing per MoE layer", "", "| layer | same expert as reference | least-used expert | most-used expert |",
                  "|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in routing_rows(report)]
    errors = report["quantization_error"]
    if errors is not None and errors["layers"]:
        experts = len(errors["weight_sqnr_db"][0])
        lines += ["", "### Expert output SQNR (dB) on evaluation tokens", "",
                  "| layer | shared | " + " | ".join(f"e{e}" for e in range(experts)) + " |",
                  "|---|---|" + "---|" * experts]
        for layer, row, shared in zip(errors["layers"], errors["output_sqnr_db"], errors["shared_output_sqnr_db"],
                                      strict=True):
            cells = ["–" if v is None else f"{v:.1f}" for v in row]
            lines.append(f"| {layer} | {'–' if shared is None else f'{shared:.1f}'} | " + " | ".join(cells) + " |")
    tasks = report.get("tasks")
    if tasks:
        limit = f", first {tasks['limit']} documents per task" if tasks["limit"] else ""
        lines += ["", f"### Tasks ({tasks['harness']}{limit})", "",
                  "Recovery is the model's score over the reference's (the reference's over the model's for "
                  "lower-is-better metrics); its interval pairs the two runs document by document.", "",
                  "| " + " | ".join(TASK_COLUMNS) + " |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in task_table(report)]
        if tasks.get("rolling"):
            lines += ["", "| rolling task | token perplexity | reference | tokens |", "|---|---|---|---|"]
            lines += ["| " + " | ".join(row) + " |" for row in rolling_rows(report)]
    environment = report["environment"]
    lines += ["", (f"scoutq {environment['scoutq']}, torch {environment['torch']}, {environment['device']}, "
              f"{environment['threads']} threads, {environment['dtype']}, backend {environment['backend']}."), ""]
    return "\n".join(lines)


def kernel_line(calls: dict[str, int]) -> str:
    """'tiles 120, Int4CpuMatmul 3,400': the kernels that ran and how often."""
    return ", ".join(f"{name} {count:,}" for name, count in calls.items())
