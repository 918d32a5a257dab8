"""The layer stream computes the resident model's math, shows its clients every module in order,
and computes on with the weights a client hands back.

* With the default client the stream's hidden states after every layer, its routing and its
  logits equal the resident model's (fp32, same checkpoint; tolerance 1e-5, the difference
  being only the order of fp32 sums), on a random checkpoint with several experts per layer.
* A recording client sees q/k/v, then o, then the shared expert, then every routed expert in
  order (also those no token reaches), each once per layer.
* Weights a client returns are what the stream computes with; the paired reference stream
  still runs the source weights.
* ExpertGroups is the grouping the resident runtime's dispatch uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import resident_trace

from scoutq.checkpoint.reader import Checkpoint
from scoutq.model.load import load_model
from scoutq.model.moe import ExpertGroups, dispatch, route
from scoutq.stream.hooks import ExpertInput, ModuleInput, StreamClient, Weights, Windows
from scoutq.stream.walk import Hidden, LayerStream


def _windows(checkpoint: Checkpoint, count: int = 3, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, checkpoint.config.vocab_size, (count, length), generator=generator)


class Recorder(StreamClient):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.chosen: dict[int, torch.Tensor] = {}

    def linears(self, names: tuple[str, ...], weights: Weights, inputs: ModuleInput) -> Weights:
        self.calls.append("+".join(name.rsplit(".", 1)[-1] for name in names))
        return weights

    def mlp(self, names: tuple[str, str, str], weights: Weights, inputs: ModuleInput) -> Weights:
        self.calls.append("shared" if ".shared_expert." in names[0] else "mlp")
        return weights

    def expert(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> Weights:
        assert names[0].endswith(f"experts.{inputs.expert}.gate_proj")
        self.calls.append(f"expert {inputs.expert} ({inputs.x.shape[0]} tokens)")
        return weights

    def routing(self, layer: int, experts: torch.Tensor) -> None:
        self.chosen[layer] = experts


def test_stream_equals_the_resident_model(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint)
    config = checkpoint.config
    windows = _windows(checkpoint)
    outputs, routers, logits = resident_trace(tiny_checkpoint, windows)

    recorder = Recorder()
    stream = LayerStream(checkpoint, recorder)
    hidden = stream.start(windows)
    for layer in range(config.num_hidden_layers):
        hidden = stream.layer(layer, hidden)
        torch.testing.assert_close(hidden.main, outputs[layer], rtol=1e-5, atol=1e-5)
    assert sorted(recorder.chosen) == list(config.moe_layers)
    for chosen, router_logits in zip(recorder.chosen.values(), routers, strict=True):
        assert torch.equal(chosen, torch.topk(router_logits, config.num_experts_per_tok, dim=-1).indices)

    flat = hidden.main.reshape(-1, config.hidden_size)
    streamed = torch.cat([block for _, block in stream.logit_blocks(flat)], dim=1)
    torch.testing.assert_close(streamed, logits.reshape(streamed.shape), rtol=1e-5, atol=1e-5)
    blocks = list(stream.head_rows(block=7))  # row blocks cover the vocabulary once, in order
    assert [start for start, _ in blocks] == list(range(0, config.vocab_size, 7))
    assert sum(rows.shape[0] for _, rows in blocks) == config.vocab_size


def test_clients_see_every_module_in_order(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint)
    config = checkpoint.config
    recorder = Recorder()
    stream = LayerStream(checkpoint, recorder)
    stream.layer(0, stream.start(_windows(checkpoint, count=1, length=4)))  # 4 tokens: some experts get none
    experts = recorder.calls[3:]
    assert recorder.calls[:3] == ["q_proj+k_proj+v_proj", "o_proj", "shared"]
    assert [call.split(" (")[0] for call in experts] == [f"expert {e}" for e in range(config.num_local_experts)]
    assert any(call.endswith("(0 tokens)") for call in experts)
    routed = sum(int(call.split("(")[1].split()[0]) for call in experts)
    assert routed == 4 * config.num_experts_per_tok


class ZeroLayerZeroExperts(StreamClient):
    """Computes with zeroed routed experts in layer 0; optionally paired."""

    def __init__(self, paired: bool) -> None:
        self.paired = paired

    def expert(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> Weights:
        return tuple(torch.zeros_like(w) for w in weights) if inputs.layer == 0 else weights


@pytest.mark.parametrize("paired", [False, True], ids=["single", "paired"])
def test_the_stream_computes_with_the_clients_weights(tiny_checkpoint: Path, paired: bool) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint)
    windows = _windows(checkpoint)
    outputs, _, _ = resident_trace(tiny_checkpoint, windows)
    stream = LayerStream(checkpoint, ZeroLayerZeroExperts(paired))
    start = stream.start(windows)
    assert (start.reference is not None) == paired
    after = stream.layer(0, start)

    # Without the routed experts, layer 0's output is the residual, attention and shared expert alone.
    plain = LayerStream(checkpoint)
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    moe = model.layers[0].feed_forward
    moe.experts.gate_up.data.zero_()
    moe.experts.down.data.zero_()
    with torch.inference_mode():
        expected = model.layers[0](start.main, torch.arange(windows.shape[1]),
                                   _rope(model, windows.shape[1]))
    torch.testing.assert_close(after.main, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after.main, outputs[0], atol=1e-4)
    if paired:  # the reference stream is the source model, whatever the client computes with
        assert after.reference is not None
        torch.testing.assert_close(after.reference, outputs[0], rtol=1e-5, atol=1e-5)
    assert plain.client.paired is False


def _rope(model: torch.nn.Module, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from scoutq.model.llama4 import rope_angles

    return rope_angles(torch.arange(length), model.config.head_dim, model.config.rope)


def test_a_paired_client_needs_the_reference_stream(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint)
    stream = LayerStream(checkpoint, ZeroLayerZeroExperts(paired=True))
    hidden = stream.start(_windows(checkpoint))
    with pytest.raises(ValueError, match="reference stream"):
        stream.layer(0, Hidden(hidden.main))


def test_hidden_states_with_nan_are_refused_naming_the_layer(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint)
    stream = LayerStream(checkpoint)
    hidden = stream.start(_windows(checkpoint))
    hidden.main[0, 0, 0] = float("nan")
    with pytest.raises(Exception, match="entering layer 2 contain NaN"):
        stream.layer(2, hidden)


def test_expert_groups_are_dispatchs_grouping() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(37, 8, generator=generator)
    scores, experts = route(torch.randn(37, 5, generator=generator), top_k=2)
    groups = ExpertGroups.of(scores, experts, 5)
    assert groups.bounds[0] == 0 and groups.bounds[-1] == 37 * 2
    seen = []
    for expert in range(5):
        tokens, gates = groups.expert(expert)
        token_ids, slots = torch.nonzero(experts == expert, as_tuple=True)
        assert torch.equal(tokens, token_ids)  # stable: in token order within an expert
        assert torch.equal(gates, scores[token_ids, slots])
        seen.append(tokens)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(37).repeat_interleave(2))

    weights = torch.randn(5, 8, 8, generator=generator)
    out = dispatch(x, scores, experts, 5, lambda e, rows: rows @ weights[e].t())
    expected = torch.zeros_like(x)
    for expert in range(5):
        tokens, gates = groups.expert(expert)
        expected.index_add_(0, tokens, (x[tokens] * gates[:, None]) @ weights[expert].t())
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("paired", [False, True])
def test_a_windows_hidden_states_do_not_depend_on_the_windows_beside_it(tiny_checkpoint: Path,
                                                                         paired: bool) -> None:
    """The property multi-process calibration rests on: windows 2..4 walked alone give the same
    bits as walked among 0..7 (every rank carries a different slice of the windows)."""
    checkpoint = Checkpoint.open(tiny_checkpoint)
    tokens = _windows(checkpoint, count=8, length=24, seed=3)
    client = StreamClient()
    client.paired = paired
    results = []
    for part in (tokens, tokens[2:5]):
        stream = LayerStream(checkpoint, client)
        hidden = stream.start(part)
        for layer in range(checkpoint.config.num_hidden_layers):
            hidden = stream.layer(layer, hidden)
        results.append(hidden)
    whole, alone = results
    assert torch.equal(whole.main[2:5], alone.main)
    if paired:
        assert whole.reference is not None and alone.reference is not None
        assert torch.equal(whole.reference[2:5], alone.reference)


def test_windows_split_map_and_select() -> None:
    windows = Windows((3, 0, 2))
    x = torch.arange(10.0).view(5, 2)
    assert [part.shape[0] for part in windows.split(x)] == [3, 0, 2]
    assert torch.equal(windows.map(lambda rows: rows * 2, x), x * 2)
    assert windows.select(torch.tensor([0, 2, 4])) == Windows((2, 0, 1))
    assert Windows.joined([Windows((1,)), Windows((2, 3))]) == Windows((1, 2, 3))
    assert Windows(()).map(lambda rows: rows + 1, torch.zeros(0, 2)).shape == (0, 2)
