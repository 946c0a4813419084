"""The capturable training path: ``loss_from_inputs(prepare_train_inputs(b))`` is ``compute_loss(b)``; on a GPU the
CUDA-graphed step (:class:`GraphedTrainStep`) matches eager steps. CI has no GPU: the CUDA tests run on the benchmark
machine (``pytest tests/test_graphed_step.py``)."""

import copy

import pytest
import torch

from chunkpolicy.training.graphed_step import GraphedTrainStep, capturable_adamw
from helpers import toy_batch, toy_policy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_split_loss_equals_compute_loss(dropout):
    policy = toy_policy(modality_dropout=dropout).train()
    b = toy_batch()
    ref = policy.compute_loss(b, generator=torch.Generator().manual_seed(3))["loss"]
    inputs = policy.prepare_train_inputs(b)
    assert set(inputs) >= {"actions", "action_mask", "action_is_pad", "images", "input_ids"}
    out = policy.loss_from_inputs(inputs, generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(ref, out)


def test_modality_dropout_keeps_every_modality_of_a_sample_that_would_lose_all():
    policy = toy_policy(modality_dropout=1.0).train()  # p = 1: every sample would lose everything
    im = torch.tensor([[True, False], [True, True]])
    am = torch.tensor([[True, True, False], [False, False, False]])
    kept_im, kept_am = policy._modality_dropout(im, am, torch.Generator().manual_seed(0))
    assert torch.equal(kept_im, im) and torch.equal(kept_am, am)


def test_graphed_step_rejects_a_cpu_policy():
    policy = toy_policy()
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(policy, torch.optim.AdamW(policy.parameters()), toy_batch())


@cuda
def test_graphed_step_rejects_a_non_capturable_optimizer():
    policy = toy_policy().cuda()
    with pytest.raises(ValueError, match="not capturable"):
        GraphedTrainStep(policy, torch.optim.AdamW(policy.parameters(), fused=True), toy_batch())
    with pytest.raises(ValueError, match="float lr"):
        GraphedTrainStep(policy, torch.optim.AdamW(policy.parameters(), fused=True, capturable=True), toy_batch())


@cuda
def test_graphed_steps_match_eager_steps_and_follow_the_learning_rate():
    eager = toy_policy().cuda().train()
    graphed = copy.deepcopy(eager)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opt_e, opt_g = capturable_adamw(params(eager), 1e-3), capturable_adamw(params(graphed), 1e-3)
    batches = [toy_batch(seed=s) for s in range(4)]
    step = GraphedTrainStep(graphed, opt_g, batches[0], max_grad_norm=1.0)
    # building the step (warm-up at lr 0, state reset) left the weights as they were
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()))
    for i, b in enumerate(batches):
        if i == 2:  # a schedule writes the tensor lr in place: the graph must see it
            for g in opt_e.param_groups + opt_g.param_groups:
                g["lr"].fill_(3e-4)
        torch.cuda.manual_seed(100 + i)
        loss_e = eager.compute_loss(b)["loss"]
        loss_e.backward()
        norm_e = torch.nn.utils.clip_grad_norm_(params(eager), 1.0)
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(100 + i)
        out = step(b)
        torch.testing.assert_close(out["loss"], loss_e.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["grad_norm"], norm_e, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="images: shape"):
        step(toy_batch(n_cam=1))


@cuda
def test_building_the_step_keeps_a_loaded_optimizer_state_and_the_random_stream():
    """A resumed run builds its graph over an optimizer loaded from a checkpoint: the warm-up must not change the
    moments, step counts, weights or the RNG."""
    policy = toy_policy().cuda().train()
    opt = capturable_adamw([p for p in policy.parameters() if p.requires_grad], 1e-3)
    for s in range(2):
        policy.compute_loss(toy_batch(seed=s))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = copy.deepcopy(opt.state_dict()["state"])
    weights = copy.deepcopy(policy.state_dict())
    torch.cuda.manual_seed(5)
    rng = torch.cuda.get_rng_state()
    GraphedTrainStep(policy, opt, toy_batch())
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    after = opt.state_dict()["state"]
    assert all(torch.equal(state[i][k], after[i][k]) for i in state for k in state[i])
    assert float(after[0]["step"]) == 2
    assert all(torch.equal(weights[k], v) for k, v in policy.state_dict().items())


@cuda
def test_graphed_step_skips_a_non_finite_step_on_the_device():
    """Issue 15: a replay whose loss is NaN leaves weights, moments and step counts untouched (fused AdamW's
    found_inf, set inside the graph), reports skipped = 1, and the next good replay updates again."""
    policy = toy_policy().cuda().train()
    opt = capturable_adamw([p for p in policy.parameters() if p.requires_grad], 1e-3)
    step = GraphedTrainStep(policy, opt, toy_batch(), max_grad_norm=1.0)
    assert float(step(toy_batch(seed=1))["skipped"]) == 0.0  # one good step: the moments exist
    weights = [p.detach().clone() for p in policy.parameters()]
    state = [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    step.load_inputs(toy_batch(seed=2))
    step.inputs["actions"].view(-1)[0] = float("nan")  # past the batch validation, as a NaN from the model would be
    step.graph.replay()
    assert float(step.skipped) == 1.0 and not torch.isfinite(step.loss)
    assert all(torch.equal(a, p) for a, p in zip(weights, policy.parameters()))
    assert all(torch.equal(a, v) for a, v in zip(state, [v for s in opt.state.values() for v in s.values()
                                                        if isinstance(v, torch.Tensor)]))
    out = step(toy_batch(seed=3))
    assert float(out["skipped"]) == 0.0 and torch.isfinite(out["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(weights, policy.parameters()))
