"""Gates read together (GateSet), the batched distillation loss and masked consumers agree with
their one-gate-at-a-time definitions."""

import pytest
import torch
from torch import nn

from dagprune_algorithms.pruning.gates import ChannelGate, GateSet, MaskApply, MaskedConsumer
from dagprune_algorithms.pruning.losses import removed_energy_share


def _gates(seed: int) -> list[ChannelGate]:
    generator = torch.Generator().manual_seed(seed)
    gates = [ChannelGate(size, block_size=block) for size, block in
             [(5, 1), (8, 4), (3, 1), (6, 2), (1, 1), (7, 3)]]
    for index, gate in enumerate(gates):
        gate.logits.data = torch.randn(gate.logits.numel(), generator=generator)
        if index == 2:
            gate.logits.data = -gate.logits.data.abs() - 0.1  # keeps nothing: best channel stays
    return gates


def test_joint_samples_are_the_gates_own_relaxed_samples_drawn_together():
    gates = _gates(1)
    gates[4].temperature = 0.25  # another temperature inside the same draw
    GateSet(gates, joint_sampling=True)
    torch.manual_seed(3)
    joint = [gate.train()() for gate in gates]
    torch.manual_seed(3)
    noise = torch.empty(sum(g.logits.numel() for g in gates)).uniform_(1e-6, 1 - 1e-6).logit_()
    inverse = torch.cat([torch.full((g.logits.numel(),), 1 / g.temperature) for g in gates])
    leaves = [g.logits.detach().clone().requires_grad_() for g in gates]
    expected = torch.sigmoid((torch.cat(leaves) + noise) * inverse)
    assert torch.allclose(torch.cat(joint), expected, atol=1e-6)
    weights = torch.randn(expected.numel())
    (torch.cat(joint) * weights).sum().backward()
    (expected * weights).sum().backward()
    for gate, leaf in zip(gates, leaves):
        assert gate.logits.grad is not None and torch.allclose(gate.logits.grad, leaf.grad, atol=1e-6)


def test_every_joint_call_is_a_fresh_sample_of_the_current_logits():
    gates = _gates(2)
    gate_set = GateSet(gates, joint_sampling=True)
    first, second = gates[0](), gates[0]()  # called again: a new draw
    assert not torch.equal(first, second)
    partner = gates[1]()  # from the second draw
    gate_set.new_draw()
    assert not torch.equal(partner, gates[1]())
    with torch.no_grad():
        gates[5].logits.fill_(30.0)  # in place, as an optimizer step: the version changes
    assert torch.all(gates[5]() > 0.99)
    with torch.no_grad():
        untracked = gates[2]()
    assert untracked.grad_fn is None and gates[2]().grad_fn is not None  # grad mode changed


def test_the_gated_model_draws_once_per_forward_pass():
    from dagprune_algorithms.pruning import ChannelPruning
    import dagprune

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    config = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 8, 8), 0.5, 10)
    gated = config.prepare_for_pruning().train()
    draws = []
    original = config._gate_set._draw
    config._gate_set._draw = lambda: (draws.append(1), original())
    x = torch.randn(2, 3, 8, 8)
    first, second = gated(x), gated(x)
    assert len(draws) == 2 and not torch.equal(first, second)
    second.sum().backward()
    assert all(gate.logits.grad is not None for gate in config.gates)


@pytest.mark.parametrize("seed", range(5))
def test_gate_set_hard_masks_follow_each_gates_rule(seed):
    gates = _gates(seed)
    gates[3].freeze()
    gates[3].logits.data = -gates[3].logits.data  # a frozen gate keeps its frozen decision
    joined = GateSet(gates).hard_masks()
    assert torch.equal(joined, torch.cat([gate.hard_mask() for gate in gates]))
    for gate in gates:
        gate.freeze()
    assert torch.equal(GateSet(gates).hard_masks(), torch.cat([gate.hard_mask() for gate in gates]))


def test_gate_set_probabilities_and_group_means():
    gates = _gates(0)
    gates[1].freeze()
    gate_set = GateSet(gates)
    probabilities = gate_set.keep_probabilities()
    expected = torch.cat([gate.keep_probabilities() for gate in gates])
    assert torch.allclose(probabilities, expected)
    means = gate_set.group_means(probabilities)
    assert torch.allclose(means, torch.stack([gate.keep_probabilities().mean() for gate in gates]))
    means.sum().backward()
    assert gates[1].logits.grad is None  # frozen: no gradient
    assert gates[0].logits.grad is not None


def test_frozen_state_survives_a_state_dict_round_trip():
    gate = ChannelGate(4)
    gate.logits.data = torch.tensor([1.0, -1.0, 2.0, -2.0])
    gate.freeze()
    fresh = ChannelGate(4)
    fresh.load_state_dict(gate.state_dict())
    assert fresh.frozen and torch.equal(fresh.hard_mask(), torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_removed_energy_share_matches_the_per_site_definition():
    torch.manual_seed(0)
    sites, expected = [], []
    for shape, axis in [((6, 5, 4, 4), 1), ((6, 7, 3), 2), ((9,), 0)]:
        site = MaskApply(axis, torch.arange(1, shape[axis] + 1)).train()
        x = torch.randn(shape)
        mask = torch.rand(shape[axis], requires_grad=True)
        site(x, mask)
        sample = x[:4] if x.ndim > 1 else x
        energy = sample.pow(2).sum([a for a in range(x.ndim) if a != axis]) if x.ndim > 1 else x.pow(2)
        expected.append((energy * (1 - mask) ** 2).sum() / energy.sum())
        sites.append(site)
    share = removed_energy_share(sites)
    assert torch.allclose(share, torch.stack(expected).mean())
    share.backward()
    assert all(site.energy_mask.grad is not None and site.energy_mask.grad.abs().sum() > 0
               for site in sites)  # the loss trains the masks
    sites[0].eval()(torch.randn(6, 5, 4, 4), torch.rand(5))
    assert sites[0].channel_energy is None


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(6, 64), (2, 3, 6)),        # small activation: the activation is scaled
    (nn.Linear(6, 4), (8, 9, 6)),         # large activation: the weight is scaled
    (nn.Conv2d(6, 32, 3), (1, 6, 5, 5)),
    (nn.Conv2d(6, 4, 1), (4, 6, 9, 9)),
    (nn.Conv2d(6, 6, 3, groups=6), (4, 6, 9, 9)),    # depthwise
    (nn.Conv2d(6, 12, 3, groups=3), (4, 6, 9, 9)),   # grouped, two outputs per input slot
    (nn.Conv1d(6, 6, 3, groups=2), (4, 6, 30)),
])
def test_masked_consumer_equals_the_layer_on_the_masked_input(layer, shape):
    torch.manual_seed(0)
    axis = len(shape) - 1 if isinstance(layer, nn.Linear) else 1
    x = torch.randn(shape, requires_grad=True)
    mask = torch.rand(6, requires_grad=True)
    consumer = MaskedConsumer(layer, torch.arange(1, 7), axis).train()
    out = consumer(x, mask)
    view = [1] * len(shape)
    view[axis] = 6
    reference = layer(x * mask.view(view))
    assert torch.allclose(out, reference, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, mask, layer.weight])
    reference_grads = torch.autograd.grad(reference.square().sum(), [x, mask, layer.weight])
    for got, want in zip(grads, reference_grads):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("block_size, tolerance", [(1, 0.002), (8, 0.006)])
def test_calibration_lands_near_the_target_with_rounded_counts(block_size, tolerance):
    import dagprune
    from dagprune_algorithms.pruning import ChannelPruning

    model = nn.Sequential(nn.Conv2d(3, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 384, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))
    dag = dagprune.build_from_unstructured_module(model.eval())
    for seed in range(4):
        pruning = ChannelPruning(dag, (3, 8, 8), 0.4, 10, block_size=block_size)
        pruning.prepare_for_pruning()
        generator = torch.Generator().manual_seed(seed)
        for gate in pruning.gates:
            gate.logits.data = torch.randn(gate.logits.numel(), generator=generator)
        reached = pruning.calibrate_to_target()
        # the shares compared are those of the counts after rounding to blocks
        assert reached == pytest.approx(pruning.current_hard_proportion())
        assert abs(reached - 0.4) <= tolerance, seed
        for gate in pruning.gates:
            kept = int(gate.hard_mask().sum())
            assert kept >= 1 and kept % block_size == 0


@pytest.mark.parametrize("shape", [(4, 8), (3, 5, 8), (2, 3, 4, 8)])
def test_masked_rms_norm_gradient_is_the_composed_ops_gradient(shape):
    from dagprune.ops.specs.rms_norm import masked_rms_norm

    torch.manual_seed(0)
    x, weight = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in (shape, shape[-1:]))
    mask = torch.rand(shape[-1], dtype=torch.float64, requires_grad=True)
    norm = lambda *args: masked_rms_norm(*args, 1e-6)  # noqa: E731
    assert torch.autograd.gradcheck(norm, (x, mask, weight))

    weights = mask / mask.sum()  # the definition, composed of differentiable torch ops
    composed = x * torch.rsqrt((x * x) @ weights + 1e-6).unsqueeze(-1) * weight
    fused = norm(x, mask, weight)
    grad_out = torch.randn_like(fused)
    assert torch.allclose(fused, composed, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (x, mask, weight), grad_out),
                    torch.autograd.grad(composed, (x, mask, weight), grad_out)):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("shape", [(4, 8), (3, 5, 8), (2, 3, 4, 8)])
def test_masked_layer_norm_gradient_is_the_composed_ops_gradient(shape):
    from dagprune.ops.specs.normalization import masked_layer_norm

    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
                       for s in (shape, shape[-1:], shape[-1:]))
    mask = torch.rand(shape[-1], dtype=torch.float64, requires_grad=True)
    norm = lambda *args: masked_layer_norm(*args, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(norm, (x, mask, weight, bias))

    weights = mask / mask.sum()  # the definition, composed of differentiable torch ops
    centered = x - (x @ weights).unsqueeze(-1)
    composed = centered * torch.rsqrt((centered * centered) @ weights + 1e-5).unsqueeze(-1) * weight + bias
    fused = norm(x, mask, weight, bias)
    grad_out = torch.randn_like(fused)
    assert torch.allclose(fused, composed, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (x, mask, weight, bias), grad_out),
                    torch.autograd.grad(composed, (x, mask, weight, bias), grad_out)):
        assert torch.allclose(a, b, atol=1e-10)


class _NormThenProjections(nn.Module):
    """A pre-norm block: the norm feeds three projections (and a shape read); with
    ``residual_reads_norm`` the residual also adds the norm's output, unmasked."""

    def __init__(self, residual_reads_norm: bool = False):
        super().__init__()
        self.stem, self.norm = nn.Linear(6, 16), nn.LayerNorm(16)
        self.q, self.k, self.v, self.out = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.residual_reads_norm = residual_reads_norm

    def forward(self, x):
        h = self.stem(x)
        n = self.norm(h)
        mixed = (self.q(n).relu() * self.k(n) + self.v(n)).reshape(n.shape[0], n.shape[1], -1)
        return self.head(h + self.out(mixed) + (n if self.residual_reads_norm else 0))


@pytest.mark.parametrize("residual_reads_norm", [False, True])
def test_a_norms_mask_moves_into_its_weight_when_every_reader_masks_it(monkeypatch, residual_reads_norm):
    import dagprune
    from dagprune_algorithms.pruning import ChannelPruning
    from dagprune_algorithms.pruning import gated_model

    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(_NormThenProjections(residual_reads_norm))

    def gated(fold: bool):
        if not fold:
            monkeypatch.setattr(gated_model, "_folded_sites", lambda dag, sites: (set(), set()))
        pruning = ChannelPruning(dag, (5, 6), 0.5, 100)
        model = pruning.prepare_for_pruning()
        monkeypatch.undo()
        generator = torch.Generator().manual_seed(2)  # the same logits in both models
        for gate in pruning.gates:
            gate.logits.data = torch.randn(gate.logits.numel(), generator=generator)
        return model

    folded, reference = gated(True), gated(False)
    norms = [m for m in folded.modules() if isinstance(m, MaskedConsumer) and isinstance(m.layer, nn.LayerNorm)]
    assert len(norms) == 1 and norms[0].scales_output is not residual_reads_norm
    readers = [m for m in folded.modules() if isinstance(m, MaskedConsumer) and m.layer in (
        dag.vertex("q").module, dag.vertex("k").module, dag.vertex("v").module)]
    assert len(readers) == (3 if residual_reads_norm else 0)  # q, k, v mask their input themselves
    x = torch.randn(3, 5, 6)
    for train in (True, False):
        folded.train(train), reference.train(train)
        torch.manual_seed(1)
        out = folded(x)
        torch.manual_seed(1)  # the same gate noise
        assert torch.allclose(out, reference(x), atol=1e-6)


def test_eval_mode_masks_follow_every_change_of_the_logits():
    gate = ChannelGate(4).eval()
    gate.logits.data = torch.tensor([1.0, -1.0, 2.0, -2.0])
    assert torch.equal(gate(), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    with torch.no_grad():
        gate.logits[1] = 3.0  # in place, as an optimizer step
    assert torch.equal(gate(), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    gate.load_state_dict({**gate.state_dict(), "logits": torch.tensor([-1.0, -1.0, -1.0, 5.0])})
    assert torch.equal(gate(), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    gate.block_size = 2
    assert torch.equal(gate(), torch.tensor([1.0, 0.0, 0.0, 1.0]))  # ties: the lower position first
    with torch.inference_mode():
        gate.logits.data = torch.tensor([1.0, 1.0, -1.0, -1.0])
        assert torch.equal(gate(), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    x = torch.ones(4, requires_grad=True)
    (x * gate()).sum().backward()  # the mask made in inference mode is not reused for autograd
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_a_deep_copy_of_a_pruning_run_samples_its_own_gates():
    import copy

    from dagprune_algorithms.pruning import ChannelPruning
    import dagprune

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    config = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 6, 6), 0.5, 10)
    config.prepare_for_pruning()
    copied = copy.deepcopy(config)  # as the sharded (FSDP) run trains a copy
    gated = copied.pruning_model.train()
    gated(torch.randn(2, 3, 6, 6)).sum().backward()
    assert all(gate.joint is copied._gate_set for gate in copied.gates)
    assert all(gate.logits.grad is not None for gate in copied.gates)
    assert all(gate.logits.grad is None for gate in config.gates)
