"""Local losses: l1 on original tokens, gate BCE, their value, gradient and effect under training."""
import pytest
import torch
import torch.nn.functional as F

from tiny_models import FAMILIES, one_thread, random_batch, tiny_model, train_steps  # noqa: F401
from trainer.config import MethodConfig
from trainer.method.extend import adapter_blocks, extend_model, set_domain, trainable_named_parameters
from trainer.method.losses import layer_statistics, local_loss

ALL_NEW = torch.zeros(4, 1, dtype=torch.bool)
ALL_ORIG = torch.ones(4, 1, dtype=torch.bool)
MIXED = torch.tensor([[True], [False], [True], [False]])


def extended(family="llama", perturb=0.05, **method):
    """Extended tiny model; `perturb` moves W_o off zero so the adapters output something."""
    cfg = MethodConfig(**method)
    model = tiny_model(family)
    extend_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in trainable_named_parameters(model):
            p.add_(torch.randn_like(p) * perturb)
    return model.train(), cfg


def forward_local(model, cfg, mask, ids=None):
    set_domain(model, mask)
    ids = random_batch(mask.shape[0], 16) if ids is None else ids
    out = model(input_ids=ids, labels=ids)
    local, stats = local_loss(model, cfg)
    return out, local, stats


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["neutral_residues", "sigmoid_gate"])
def test_l1_is_exactly_zero_without_original_tokens_and_positive_with(family, method):
    model, cfg = extended(family, name=method, l1_with_sigmoid=True)
    _, local, stats = forward_local(model, cfg, ALL_NEW)
    assert stats["l1"].item() == 0.0
    if method == "neutral_residues":
        assert local.item() == 0.0
    else:  # the BCE still trains the gate towards "new" on new-only batches
        assert torch.isfinite(local) and local.item() == pytest.approx(stats["bce"].item())
    _, local, stats = forward_local(model, cfg, ALL_ORIG)
    assert stats["l1"].item() > 0 and local.item() > 0


def test_l1_and_bce_follow_the_method_definition():
    """l1 = mean over layers, original tokens and elements of |g*A|; bce = mean over layers and tokens."""
    model, cfg = extended(name="sigmoid_gate", l1_with_sigmoid=True, alpha=3.0, bce_weight=0.5)
    captured = []
    for b in adapter_blocks(model):
        b.adapter.register_forward_hook(lambda m, i, o: captured.append((o[0].detach(), o[1].detach())))
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[0, :5] = mask[2, 7:] = True  # per-token mask: original tokens scattered over samples
    _, local, stats = forward_local(model, cfg, mask)
    orig = mask.float()
    l1 = torch.stack([(y.abs().mean(-1) * orig).sum() / orig.sum() for y, _ in captured]).mean()
    bce = torch.stack([F.binary_cross_entropy_with_logits(z, 1 - orig) for _, z in captured]).mean()
    torch.testing.assert_close(stats["l1"], l1)
    torch.testing.assert_close(stats["bce"], bce)
    torch.testing.assert_close(local.detach(), 3.0 * l1 + 0.5 * bce)
    new_abs = torch.stack([(y.abs().mean(-1) * (1 - orig)).sum() / (1 - orig).sum() for y, _ in captured]).mean()
    torch.testing.assert_close(stats["residual_abs_new"], new_abs)
    torch.testing.assert_close(stats["residual_abs_original"], l1)
    per_layer = layer_statistics(model)["gate_mean_original"]
    expected = torch.stack([(torch.sigmoid(z) * orig).sum() / orig.sum() for _, z in captured])
    torch.testing.assert_close(per_layer, expected)


def test_per_sample_mask_equals_the_same_per_token_mask():
    model, cfg = extended(name="neutral_residues")
    ids = random_batch(4, 16)
    _, a, sa = forward_local(model, cfg, MIXED, ids)
    _, b, sb = forward_local(model, cfg, MIXED.expand(4, 16).clone(), ids)
    assert a.item() == b.item() and sa.keys() == sb.keys()
    assert all(sa[k].item() == sb[k].item() for k in sa)


def test_step_wide_l1_normaliser_gives_the_pooled_mean():
    """With l1_tokens = original tokens per micro batch averaged over the step, the mean of the
    micro-batch l1s is the l1 of the pooled batch, however unevenly original samples are split."""
    model, cfg = extended(name="neutral_residues")
    ids = random_batch(4, 16)
    _, _, pooled = forward_local(model, cfg, torch.tensor([[True], [True], [True], [False]]), ids)
    l1_tokens = 3 * 16 / 2
    micro = []
    for part, mask in ((slice(0, 2), [[True], [True]]), (slice(2, 4), [[True], [False]])):
        set_domain(model, torch.tensor(mask), l1_tokens=l1_tokens)
        model(input_ids=ids[part])
        micro.append(local_loss(model, cfg)[1]["l1"])
    torch.testing.assert_close((micro[0] + micro[1]) / 2, pooled["l1"])
    set_domain(model, ALL_NEW[:2], l1_tokens=0.0)
    model(input_ids=ids[:2])
    assert local_loss(model, cfg)[0].item() == 0.0


def test_relu_gate_statistics_count_open_gates_per_domain():
    model, cfg = extended(name="neutral_residues")
    zs = []
    for b in adapter_blocks(model):
        b.adapter.register_forward_hook(lambda m, i, o: zs.append(o[1].detach()))
    _, _, stats = forward_local(model, cfg, MIXED)
    orig = MIXED.float().expand(4, 16)
    active = torch.stack([((z > 0).float() * orig).sum() / orig.sum() for z in zs]).mean()
    torch.testing.assert_close(stats["gate_active_original"], active)
    assert 0 < stats["gate_active_new"].item() < 1  # He-initialised w_b opens about half the gates


@pytest.mark.parametrize("method", ["neutral_residues", "sigmoid_gate"])
def test_injected_gradient_equals_the_gradient_of_the_explicit_loss(method):
    """The local loss's gradient is injected at the block outputs (checkpointing-proof). It must be
    exactly the gradient of `lm + 0.5 * local` computed the ordinary way, scale included (DeepSpeed
    divides the loss by the accumulation steps)."""
    model, cfg = extended(name=method, l1_with_sigmoid=True, alpha=7.0, bce_weight=2.0)
    reference, _ = extended(name=method, l1_with_sigmoid=True, alpha=7.0, bce_weight=2.0)
    ids = random_batch(4, 16)

    out, local, _ = forward_local(model, cfg, MIXED, ids)
    (out.loss + 0.5 * local).backward()

    captured = []
    for b in adapter_blocks(reference):
        b.adapter.register_forward_hook(lambda m, i, o: captured.append(o))
    set_domain(reference, None)  # no injection: plain autograd on captured outputs
    out = reference(input_ids=ids, labels=ids)
    orig = MIXED.float().expand(4, 16)
    l1 = torch.stack([(y.abs().mean(-1) * orig).sum() / orig.sum() for y, _, _ in captured]).mean()
    explicit = cfg.alpha * l1
    if method == "sigmoid_gate":
        explicit = explicit + cfg.bce_weight * torch.stack(
            [F.binary_cross_entropy_with_logits(z, 1 - orig) for _, z, _ in captured]).mean()
    (out.loss + 0.5 * explicit).backward()

    got, want = dict(trainable_named_parameters(model)), dict(trainable_named_parameters(reference))
    for name in want:
        torch.testing.assert_close(got[name].grad, want[name].grad, rtol=1e-5, atol=1e-8, msg=name)


def test_local_gradient_only_flows_through_the_returned_loss():
    """Calling local_loss for logging but backpropagating the LM loss alone adds no local gradient."""
    model, cfg = extended(name="neutral_residues", alpha=50.0)
    plain, _ = extended(name="neutral_residues", alpha=50.0)
    ids = random_batch(4, 16)
    out, _, _ = forward_local(model, cfg, MIXED, ids)
    out.loss.backward()
    set_domain(plain, None)
    plain(input_ids=ids, labels=ids).loss.backward()
    for (name, p), (_, q) in zip(trainable_named_parameters(model), trainable_named_parameters(plain)):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_l1_decreases_when_training_on_original_data(family):
    ids_new, ids_orig = random_batch(4, 16, seed=1), random_batch(4, 16, seed=2)
    final = {}
    for alpha in (0.0, 100.0):
        model, cfg = extended(family, perturb=0.0, name="neutral_residues", alpha=alpha)
        train_steps(model, cfg, ids_new, ALL_NEW, steps=5, lr=1e-2)  # the adapters learn to output something
        history = train_steps(model, cfg, ids_orig, ALL_ORIG, steps=12, lr=1e-2)
        assert history[0]["l1"] > 0
        final[alpha] = history[-1]["l1"]
    assert final[100.0] < 0.5 * history[0]["l1"], [round(h["l1"], 5) for h in history]
    assert final[100.0] < 0.5 * final[0.0]  # the decrease comes from the l1 term, not from the LM loss


def test_bce_pushes_the_sigmoid_gate_towards_the_domain_label():
    model, cfg = extended(perturb=0.0, name="sigmoid_gate", bce_weight=1.0)
    ids = torch.cat([random_batch(2, 16, seed=3) % 60 + 3,      # "original": token ids 3..62
                     random_batch(2, 16, seed=4) % 60 + 66])    # "new": token ids 66..125
    mask = torch.tensor([[True], [True], [False], [False]])
    history = train_steps(model, cfg, ids, mask, steps=15, lr=1e-2)
    first, last = history[0], history[-1]
    assert last["bce"] < first["bce"]
    assert last["gate_mean_new"] > first["gate_mean_new"] and last["gate_mean_new"] > 0.6
    assert last["gate_mean_original"] < first["gate_mean_original"] and last["gate_mean_original"] < 0.4


@pytest.mark.parametrize("method", ["adapters", "lora", "finetune"])
def test_methods_without_local_loss_return_zero(method):
    model, cfg = extended(name=method)
    out, local, stats = forward_local(model, cfg, ALL_ORIG)
    assert local.item() == 0.0 and not local.requires_grad
    assert ("residual_abs_original" in stats) == (method == "adapters") and "l1" not in stats


def test_local_loss_without_set_domain_is_an_error():
    model, cfg = extended(name="neutral_residues")
    set_domain(model, None)
    ids = random_batch(2, 8)
    model(input_ids=ids)
    with pytest.raises(RuntimeError, match="set_domain"):
        local_loss(model, cfg)


def test_local_loss_refuses_a_different_method():
    model, _ = extended(name="neutral_residues")
    forward_local(model, MethodConfig(name="neutral_residues"), MIXED)
    with pytest.raises(ValueError, match="does not match"):
        local_loss(model, MethodConfig(name="sigmoid_gate"))
