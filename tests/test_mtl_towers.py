"""Multi-task towers: shapes and gradients, shared blocks, the Switch task prior, the TaskExpert memory reduction."""

import math

import pytest
import torch

from mtl.esmm import ESMMTower, product_logit
from mtl.layers import GroupedLinear, GroupedMLP, mix, normal_init_
from mtl.mmoe import MixtureOfExperts, MMoETower
from mtl.ple import PLETower
from mtl.shared_bottom import SharedBottomTower
from mtl.single import SingleTower
from mtl.spec import TaskSpec
from mtl.switch import SwitchBlock, SwitchTower, js_divergence, match_prior, prior_loss, window_prior
from mtl.taskexpert import TaskExpertTower

IN = 12
TASKS = [TaskSpec("click"), TaskSpec("like"), TaskSpec("watch", label="watch", loss="regression")]
TOWERS = {
    "single": (SingleTower, dict(hidden=(8,))),
    "shared_bottom": (SharedBottomTower, dict(bottom_hidden=(16,), tower_hidden=(8,), norm="batch")),
    "mmoe": (MMoETower, dict(num_experts=3, expert_hidden=(16,), tower_hidden=(8,))),
    "cgc": (PLETower, dict(num_levels=1, expert_hidden=(16,))),
    "ple": (PLETower, dict(num_levels=3, specific_experts=1, shared_experts=2, expert_hidden=(16, 8), norm="layer")),
    "switch": (SwitchTower, dict(dim=8, num_blocks=2, block_hidden=16, task_dim=4)),
    "taskexpert": (TaskExpertTower, dict(num_layers=3, num_experts=2, expert_dim=8, trunk_dim=8)),
    "taskexpert_replace": (
        TaskExpertTower,
        dict(num_experts=2, expert_dim=8, memory_update="replace", memory_init="project"),
    ),
    "esmm": (ESMMTower, dict(tower_hidden=(8,))),
}


@pytest.mark.parametrize("name", TOWERS)
def test_tower_shapes_and_gradients(name):
    torch.manual_seed(0)
    cls, kwargs = TOWERS[name]
    tasks = TASKS[:2] if name == "esmm" else TASKS
    tower = cls(IN, tasks, **kwargs)
    x = torch.randn(6, IN, requires_grad=True)
    out = tower(x)
    assert set(out.logits) == {t.name for t in tasks}
    for logit in out.logits.values():
        assert logit.shape == (6,) and torch.isfinite(logit).all()
    for key, value in out.extras.items():
        if key.startswith("gate/"):
            assert value.shape[0] == 6
            torch.testing.assert_close(value.sum(-1), torch.ones(6))
    loss = sum(v.pow(2).mean() for v in out.logits.values()) + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in tower.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_gate_extras_name_every_task_and_group():
    out = TOWERS["ple"][0](IN, TASKS, **TOWERS["ple"][1])(torch.randn(4, IN))
    assert {f"gate/{t.name}/level{j}" for t in TASKS for j in (1, 2, 3)} == set(out.extras)
    assert out.extras["gate/click/level1"].shape == (4, 1 + 2)  # own experts, then the shared ones
    out = TOWERS["switch"][0](IN, TASKS, **TOWERS["switch"][1])(torch.randn(4, IN))
    assert set(out.aux_losses) == {"switch_prior"} and out.extras["gate/like/block2"].shape == (4, 3)


# ---------------------------------------------------------------------------------------------- blocks


def test_grouped_layers_equal_separate_layers():
    torch.manual_seed(0)
    layer = GroupedLinear(3, 5, 4)
    x = torch.randn(7, 5)
    y = layer(x)
    xs = torch.randn(3, 7, 5)
    ys = layer(xs)
    for g in range(3):
        torch.testing.assert_close(y[g], x @ layer.weight[g] + layer.bias[g])
        torch.testing.assert_close(ys[g], xs[g] @ layer.weight[g] + layer.bias[g])
    mlp = GroupedMLP(2, 5, (6,), out_dim=1, norm="batch")
    out = mlp(x)
    for g in range(2):  # per-group BatchNorm = BatchNorm of that group's channels only
        h = x @ mlp.net[0].weight[g] + mlp.net[0].bias[g]
        h = torch.relu(torch.nn.functional.batch_norm(h, None, None, training=True, eps=1e-5))
        torch.testing.assert_close(out[g], h @ mlp.net[3].weight[g] + mlp.net[3].bias[g])
    w = torch.softmax(torch.randn(2, 7, 3), -1)
    e = torch.randn(3, 7, 4)
    torch.testing.assert_close(
        mix(w, e), torch.stack([sum(w[g, :, i : i + 1] * e[i] for i in range(3)) for g in range(2)])
    )


def test_mmoe_gate_rows_are_softmax_of_the_input():
    torch.manual_seed(0)
    moe = MixtureOfExperts(IN, 4, 2, (8,))
    x = torch.randn(5, IN)
    mixed, weights = moe(x)
    assert mixed.shape == (2, 5, 8) and weights.shape == (2, 5, 4)
    logits = x @ moe.gates.logits.weight[1] + moe.gates.logits.bias[1]
    torch.testing.assert_close(weights[1], torch.softmax(logits, -1))


# ---------------------------------------------------------------------------------------------- ESMM


def test_esmm_ctcvr_is_the_product_and_task_errors():
    a, b = torch.tensor([-30.0, -2.0, 0.0, 3.0, 40.0]), torch.tensor([1.0, -1.0, 0.5, 30.0, 40.0])
    torch.testing.assert_close(
        torch.sigmoid(product_logit(a, b)), torch.sigmoid(a) * torch.sigmoid(b), atol=1e-6, rtol=1e-4
    )
    tower = ESMMTower(IN, TASKS[:2], tower_hidden=(8,))
    out = tower(torch.randn(3, IN))
    torch.testing.assert_close(
        torch.sigmoid(out.logits["like"]),
        torch.sigmoid(out.logits["click"]) * out.extras["esmm/cvr"],
        atol=1e-6,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="exactly two binary tasks.*CTR task.*CTCVR"):
        ESMMTower(IN, TASKS)
    with pytest.raises(ValueError, match="watch"):
        ESMMTower(IN, [TASKS[0], TASKS[2]])


# ---------------------------------------------------------------------------------------------- Switch


def test_window_prior_construction():
    # U = N*M = 9 units, window n = k*N = 6; starts round((t/(T-1))^alpha * (U - n))
    prior = window_prior(num_tasks=2, num_blocks=3, num_experts=3, top_k=2, alpha=4.0)
    assert prior.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1]]
    prior = window_prior(num_tasks=3, num_blocks=2, num_experts=4, top_k=1, alpha=1.0)  # U 8, n 2, starts 0,3,6
    assert [row.nonzero().flatten().tolist() for row in prior] == [[0, 1], [3, 4], [6, 7]]
    prior = window_prior(num_tasks=5, num_blocks=3, num_experts=3, top_k=2, alpha=4.0)  # starts 0,0,0,1,3
    assert [int(row.nonzero()[0]) for row in prior] == [0, 0, 0, 1, 3]
    assert (prior.sum(1) == 6).all()
    assert window_prior(1, 2, 3, 2).tolist() == [[1, 1, 1, 1, 0, 0]]


def test_hungarian_matching_finds_the_permutation():
    prior = window_prior(num_tasks=2, num_blocks=3, num_experts=3, top_k=2)
    perm = torch.tensor([4, 7, 0, 2, 8, 1, 6, 3, 5])
    indicator = prior[:, perm]  # gate unit a behaves like prior unit perm[a]
    gen = torch.Generator().manual_seed(0)
    matched = match_prior(indicator, prior, gen)
    assert sorted(matched.tolist()) == list(range(9))  # a permutation
    torch.testing.assert_close(prior[:, matched], indicator)  # zero cost
    # columns of different types on each side, in a different order: matched by type
    indicator = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0]])
    prior = torch.tensor([[0.0, 1, 1, 0], [0, 0, 1, 1]])
    matched = match_prior(indicator, prior, gen)
    assert float((indicator - prior[:, matched]).abs().sum()) == 0.0


def test_js_divergence_hand_values():
    ln2 = math.log(2.0)
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(js_divergence(p, q)) == pytest.approx(ln2, abs=1e-5)
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    # m = [.25, .5, .25]: ½(.5 ln 2 + 0) + ½(0 + .5 ln 2) = ½ ln 2
    assert float(js_divergence(p, q)) == pytest.approx(0.5 * ln2, abs=1e-5)
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.25, 0.75])
    m = torch.tensor([0.5, 0.5])
    expected = 0.5 * float((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert float(js_divergence(p, q)) == pytest.approx(expected, abs=1e-5)


def test_prior_loss_is_zero_when_gates_follow_the_prior():
    prior = window_prior(2, 3, 3, 2)
    probs = prior / 2.0  # each block: probability 1/2 on its two window units
    loss = prior_loss(probs, prior, prior, num_blocks=3, top_k=2, generator=torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((2, 9), 1.0 / 3)
    assert float(prior_loss(uniform, prior, prior, 3, 2)) > 0.05


def test_switch_block_zero_experts_is_plain_residual_and_mask_skip_identity():
    torch.manual_seed(0)
    block = SwitchBlock(dim=6, task_dim=4, num_experts=3, top_k=2, hidden=10)
    z, e = torch.randn(2, 5, 6), torch.randn(2, 4)
    _, gates, indicator = block.gating(e)
    assert (indicator.sum(-1) == 2).all() and ((gates > 0) == (indicator > 0)).all()
    torch.testing.assert_close(block(z, gates), z + block.delta(z))  # zero-init experts: mask = 1
    with torch.no_grad():
        block.expert_weight.normal_()
        block.expert_bias.normal_()
    mask = 1 + sum(gates[:, j, None, None] * (z @ block.expert_weight[j] + block.expert_bias[j]) for j in range(3))
    torch.testing.assert_close(block.mask(z, gates), mask)
    torch.testing.assert_close(block(z, gates), z + block.delta(z * mask))  # skip (1 - mask) z as in the spec


def test_switch_task_copies_are_batched_not_looped():
    torch.manual_seed(0)
    tower = SwitchTower(IN, TASKS, dim=8, num_blocks=2, block_hidden=16, task_dim=4)
    with torch.no_grad():
        for block in tower.blocks:
            block.expert_weight.normal_(std=0.3)
    x = torch.randn(5, IN)
    out = tower(x)
    for t, task in enumerate(TASKS):  # reference: one task at a time
        z = tower.input(x)
        for block in tower.blocks:
            _, gates, _ = block.gating(tower.task_embedding[t : t + 1])
            z = block(z.unsqueeze(0), gates)[0]
        head = tower.heads.mlp(z.unsqueeze(0).expand(len(TASKS), -1, -1))[t, :, 0]
        torch.testing.assert_close(out.logits[task.name], head)


def test_zero_initialised_experts_survive_the_model_init():
    tower = SwitchTower(IN, TASKS, dim=8, num_blocks=2)
    embedding = tower.task_embedding.detach().clone()
    normal_init_(tower, 0.01)
    assert all(float(b.expert_weight.detach().abs().sum()) == 0.0 for b in tower.blocks)
    torch.testing.assert_close(tower.task_embedding.detach(), embedding)
    assert float(tower.input.weight.detach().std()) < 0.02  # the rest is re-initialised


def test_switch_config_errors():
    with pytest.raises(ValueError, match="top_k"):
        SwitchTower(IN, TASKS, num_experts=2, top_k=3)


# ---------------------------------------------------------------------------------------------- TaskExpert


def test_taskexpert_with_memory_gate_zero_is_an_mmoe_layer():
    torch.manual_seed(0)
    tower = TaskExpertTower(
        IN,
        TASKS,
        num_layers=2,
        num_experts=3,
        expert_dim=8,
        trunk_dim=8,
        memory_update="replace",
        memory_init="project",
    )
    layer = tower.layers[1]
    mmoe = MixtureOfExperts(8, 3, len(TASKS), (8,), norm="layer")
    with torch.no_grad():
        mmoe.experts.load_state_dict(layer.experts.state_dict())
        mmoe.gates.logits.weight.copy_(layer.gates.logits.weight[..., :3])
        mmoe.gates.logits.bias.copy_(layer.gates.logits.bias[..., :3])
        layer.gates.logits.weight[..., 3] = 0.0  # force the memory slot's gate to zero
        layer.gates.logits.bias[..., 3] = -1e9
    x, memory = torch.randn(5, 8), torch.randn(len(TASKS), 5, 8)
    read, weights = layer(x, extra=memory)
    expected, expected_w = mmoe(x)
    assert float(weights[..., 3].abs().max()) == 0.0
    torch.testing.assert_close(read, expected)
    torch.testing.assert_close(weights[..., :3], expected_w)
    # with the gate open the memory is read: the output moves with it
    with torch.no_grad():
        layer.gates.logits.bias[..., 3] = 0.0
    assert not torch.allclose(layer(x, extra=memory)[0], layer(x, extra=memory + 1)[0])


def test_taskexpert_memory_updates():
    torch.manual_seed(0)
    x = torch.randn(4, IN)
    for update in ("replace", "residual"):
        tower = TaskExpertTower(IN, TASKS, num_layers=2, num_experts=2, expert_dim=8, memory_update=update)
        memory = tower.initial_memory(x)
        assert memory.shape == (3, 4, 8) and float(memory.abs().sum()) == 0.0
        read, _ = tower.layers[0](x, extra=memory)
        written = read if update == "replace" else tower.memory_norms[0](memory + read)
        read2, _ = tower.layers[1](tower.trunk[0](x)[0], extra=written)
        final = read2 if update == "replace" else tower.memory_norms[1](written + read2)
        heads = tower.heads(final)
        out = tower(x)
        for name in out.logits:
            torch.testing.assert_close(out.logits[name], heads[name])
    with pytest.raises(ValueError, match="memory_update"):
        TaskExpertTower(IN, TASKS, memory_update="average")
