"""scoutq's runtime as an lm-evaluation-harness model: `lm_eval --model scoutq`.

    lm_eval --model scoutq --model_args pretrained=out/scout-w4,backend=cpu,dtype=bf16 --tasks arc_easy

The harness asks three things of a model (lm_eval.api.model.LM); each is answered with
`scoutq.load_model`'s module, so a bf16 checkpoint, a scoutq-quantized one (through its
dequant-fused kernels) and a GGUF file are scored by the same code:

* loglikelihood(context, continuation): log p(continuation | context) and whether greedy
  decoding would produce it. Requests are sorted longest first and right-padded into batches
  (causal attention never looks right, and each token routes on its own, so padding changes
  no real token's logits).
* loglikelihood_rolling(text): the whole text's log-likelihood in the harness's own rolling
  windows (lm_eval.utils.get_rolling_token_windows), each document opened by BOS.
* generate_until(context, until): greedy decoding with the KV cache, prompts of one batch
  left-padded (`Llama4ForCausalLM.forward(padding=...)` keeps each row's positions and mask
  its own) until every row has met a stop string, an end-of-sequence token or its budget.

Log-probabilities are scoutq's own (`evaluate.metrics.token_log_probs`, fp64 softmax), so the
harness's numbers and `scoutq eval`'s are the same arithmetic on the same logits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - fills the registry's builtin table before ours is added (see hook.py)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from scoutq.data.tokens import model_tokenizer, special_token_ids
from scoutq.errors import ScoutqError
from scoutq.evaluate.metrics import token_log_probs
from scoutq.model.load import load_model
from scoutq.stream.processes import resolve_device

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
DEFAULT_BATCH = 8
DEFAULT_MAX_LENGTH = 2048  # tokens per forward pass when the checkpoint allows more (Scout: 10M)
DEFAULT_MAX_GEN_TOKS = 256

# A scored request: its index in the caller's list, the tokens fed to the model, and how many of
# the last positions' predictions are scored (the continuation).
Scored = tuple[int, list[int], list[int]]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _positive(name: str, value: object, least: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ScoutqError(f"scoutq model_args {name}={value!r}: expected a whole number") from None
    if number < least:
        raise ScoutqError(f"scoutq model_args {name}={value}: must be at least {least}")
    return number


def _max_positions(path: Path) -> int:
    from scoutq.checkpoint.config import read_config_json
    from scoutq.checkpoint.gguf_file import GgufFile, is_gguf

    raw = GgufFile.open(path).config_json() if is_gguf(path) else read_config_json(path)
    return int((raw.get("text_config") or raw).get("max_position_embeddings") or DEFAULT_MAX_LENGTH)


@register_model("scoutq")
class ScoutqLM(TemplateLM):
    """An lm-evaluation-harness model backed by scoutq's Llama 4 runtime.

    Args (`--model_args key=value,...`):
        pretrained: checkpoint directory (bf16 or scoutq-quantized) or .gguf file.
        backend: kernel backend for quantized weights (reference, cpu, bnb, cuda; default: the
            fastest for the device).
        dtype: bf16 (default, as the runtime is used) or fp32 (exact comparisons).
        device: cpu, cuda or auto.
        batch_size: sequences per forward pass ("auto" takes the default, 8).
        max_length: tokens per forward pass; longer inputs keep their last max_length tokens.
        max_gen_toks: generation budget when a task gives none.
    """

    def __init__(
        self,
        pretrained: str,
        backend: str | None = None,
        dtype: str = "bf16",
        device: str | None = "cpu",
        batch_size: int | str = DEFAULT_BATCH,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            log.warning("scoutq: ignoring model_args %s", ", ".join(sorted(unused)))
        # Every argument is checked before the model loads (minutes, for Scout).
        if str(dtype) not in DTYPES:
            raise ScoutqError(f"scoutq model_args dtype={dtype!r}: choose bf16 or fp32")
        self.batch = DEFAULT_BATCH if str(batch_size).startswith("auto") else _positive("batch_size", batch_size, 1)
        self.path = Path(pretrained)
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks, 1)
        self._max_length = _positive("max_length", max_length, 2) if max_length else \
            min(DEFAULT_MAX_LENGTH, _max_positions(self.path))
        self.tokenizer_ = model_tokenizer(self.path, "the lm-eval adapter")
        bos, ends = special_token_ids(self.path)
        if bos is None:
            raise ScoutqError(f"{self.path}: no bos_token_id in its config; the adapter opens every text with BOS")
        self.bos, self.ends = bos, ends
        self.bos_text = self.tokenizer_.id_to_token(bos)
        self._device = self._pick_device(device)
        self.model = load_model(self.path, device=self._device, dtype=DTYPES[str(dtype)], backend=backend)

    @staticmethod
    def _pick_device(spec: str | None) -> torch.device:
        """The harness's own --device defaults to cuda:0; like its HF model, fall back to the CPU
        (with a warning) when no GPU is visible. Plain cpu / cuda / auto mean what they mean in scoutq."""
        spec = spec or "cpu"
        if spec.startswith("cuda:"):
            if torch.cuda.is_available():
                return torch.device(spec)
            log.warning("scoutq: %s requested but no CUDA device is visible; running on the CPU", spec)
            return torch.device("cpu")
        return resolve_device(spec)

    # --- what the harness reads ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return min(self.ends) if self.ends else self.bos

    @property
    def prefix_token_id(self) -> int:
        return self.bos  # an empty context and every rolling document start from BOS, as in training

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.path)

    def get_model_info(self) -> dict[str, Any]:
        from scoutq import __version__

        return {"pretrained": str(self.path), "scoutq": __version__,
                "dtype": str(self.model.embed_tokens.weight.dtype), "max_length": self.max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        """Token ids; BOS first unless add_special_tokens is False or the text already opens with it."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.bos_text)
        ids = self.tokenizer_.encode(string, add_special_tokens=False).ids
        return [self.bos, *ids] if add_special_tokens else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer_.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # --- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def score_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of each continuation after its context, batched.

        The model sees (context + continuation)[:-1], cut to the last max_length tokens."""
        scored: list[Scored] = []
        for index, (context, continuation) in enumerate(requests):
            if not continuation:
                raise ScoutqError("the harness asked to score an empty continuation")
            whole = (context + continuation)[-(self.max_length + 1):]
            scored.append((index, whole[:-1], whole[-len(continuation):]))
        scored.sort(key=lambda item: -len(item[1]))  # longest first: least padding per batch
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in _batches(scored, self.batch):
            width = len(batch[0][1])
            ids = torch.zeros(len(batch), width, dtype=torch.int64)
            for row, (_, inputs, _) in enumerate(batch):
                ids[row, : len(inputs)] = torch.tensor(inputs)
            logits = self.model(ids.to(self._device))
            for row, (index, inputs, continuation) in enumerate(batch):
                end = len(inputs)
                rows = logits[row, end - len(continuation) : end]
                targets = torch.tensor(continuation, device=rows.device)
                nll = token_log_probs(rows, targets)
                greedy = bool((rows.argmax(dim=-1) == targets).all())
                results[index] = (-float(nll.sum()), greedy)
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        results = self.score_tokens([(context, continuation) for _, context, continuation in requests])
        for (pair, _, _), result in zip(requests, results, strict=True):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """The (context, continuation) windows that together score every token of the text."""
        tokens = self.tok_encode(text, add_special_tokens=False)
        return [make_disjoint_window(window) for window in
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        owners: list[int] = []
        windows: list[tuple[list[int], list[int]]] = []
        for index, request in enumerate(requests):
            for window in self.rolling_windows(request.args[0]):
                owners.append(index)
                windows.append(window)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score_tokens(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # --- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[tuple[int, list[int], list[str], int]]] = {}
        for index, request in enumerate(requests):
            context, kwargs = request.args
            until, budget = self._generation_settings(dict(kwargs))
            prompt = self.tok_encode(context)
            prompt = prompt[-max(1, self.max_length - budget):]
            groups.setdefault(repr((until, budget)), []).append((index, prompt, until, budget))
        for group in groups.values():
            group.sort(key=lambda item: -len(item[1]))
            for batch in _batches(group, self.batch):
                texts = self._generate([prompt for _, prompt, _, _ in batch], batch[0][2], batch[0][3])
                for (index, _, _, _), text in zip(batch, texts, strict=True):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results

    def _generation_settings(self, kwargs: dict[str, Any]) -> tuple[list[str], int]:
        if kwargs.pop("do_sample", False) and float(kwargs.get("temperature", 0.0) or 0.0) > 0:
            raise ScoutqError("scoutq's lm-eval model decodes greedily; this task asks for sampling "
                              "(do_sample with a temperature above 0)")
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos_text and eos_text not in until:
            until.append(eos_text)
        budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        return until, budget

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], until: list[str], budget: int) -> list[str]:
        """Greedy continuations of left-padded prompts, cut at the first stop string."""
        width = max(len(p) for p in prompts)
        padding = torch.tensor([width - len(p) for p in prompts], dtype=torch.int64)
        ids = torch.zeros(len(prompts), width, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
        cache = self.model.new_cache()
        logits = self.model(ids.to(self._device), cache, padding)
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(budget):
            tokens = logits[:, -1].argmax(dim=-1)
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                generated[row].append(token)
                text = self.tok_decode(generated[row])
                done[row] = token in self.ends or any(stop in text for stop in until if stop)
            if all(done):
                break
            logits = self.model(tokens[:, None], cache, padding)
        return [self._cut(self.tok_decode([t for t in tokens if t not in self.ends]), until) for tokens in generated]

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text
