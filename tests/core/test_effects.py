"""Exact, gradient and screened effects against independent computations.

The reference is a naive loop written here with its own raw forward pre-hook: one full forward per feature,
no prefix cache, no rank-1 update, no padding trimming.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from icp_lightning import causal_effects, find_sites
from icp_lightning.core.effect_metrics import BatchMetric, label_logprob, target_logprob
from icp_lightning.core.effects import Effects, spearman
from icp_lightning.core.interventions import partner_permutation
from icp_lightning.core.scores import spuriousness
from tests.conftest import tiny_batch, tiny_model

ARCHS = ["bert", "gpt2", "llama", "t5"]


def _forward(model, batch):
    keys = ["input_ids", "attention_mask"] + (["labels"] if "t5" in type(model).__name__.lower() else [])
    return model(**{k: batch[k] for k in keys})


def _metric(arch, out, batch):
    return target_logprob(out, batch) if arch == "t5" else label_logprob(out, batch)


@torch.no_grad()
def naive_effects(model, batch, sites, arch, kind, alpha=0.5, source=None, mean=None):
    """One full forward per feature, with a hand-written pre-hook setting that feature's columns to v."""
    base = _metric(arch, _forward(model, batch), batch)
    out = {}
    for name, site in sites.items():
        values = torch.zeros(site.n_features)
        for f in range(site.n_features):
            cols = slice(f * site.group_size, (f + 1) * site.group_size)

            def hook(module, args, _cols=cols, _name=name):
                h = args[0].clone()
                if kind == "mask":
                    h[..., _cols] = 0
                elif kind == "scale":
                    h[..., _cols] = alpha * args[0][..., _cols]
                elif kind == "swap":
                    h[..., _cols] = source[_name][..., _cols]
                elif kind == "mean":
                    h[..., _cols] = mean[_name][_cols]
                return (h,)

            handle = site.module.register_forward_pre_hook(hook)
            try:
                values[f] = (base - _metric(arch, _forward(model, batch), batch)).mean()
            finally:
                handle.remove()
        out[name] = values
    return out


def _site_inputs(model, batch, sites):
    store = {}
    handles = [
        s.module.register_forward_pre_hook(lambda m, a, _n=n: store.__setitem__(_n, a[0].detach()))
        for n, s in sites.items()
    ]
    with torch.no_grad():
        _forward(model, batch)
    for h in handles:
        h.remove()
    return store


def _naive_mean(model, batch, sites):
    h = _site_inputs(model, batch, sites)
    mask = batch["attention_mask"].bool()
    out = {}
    for name, value in h.items():
        if value.shape[:2] == mask.shape:
            out[name] = value[mask].double().mean(0).float()
        else:  # decoder sites of T5: every position
            out[name] = value.reshape(-1, value.shape[-1]).double().mean(0).float()
    return out


def _snapshot(model):
    return (
        model.training,
        {k: v.clone() for k, v in model.state_dict().items()},
        [(p.requires_grad, p.grad) for p in model.parameters()],
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        [m for m in model.modules() if "forward" in m.__dict__],
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["neuron", "head"])
@pytest.mark.parametrize("kind", ["mask", "scale", "swap", "mean"])
def test_exact_equals_naive_loop(arch, granularity, kind):
    model = tiny_model(arch)
    batch = tiny_batch(arch, n=6, seed=1)
    sites = find_sites(model, granularity=granularity)
    source = mean = None
    if kind == "swap":
        perm = partner_permutation(6, seed=0)
        source = {n: h[perm] for n, h in _site_inputs(model, batch, sites).items()}
    if kind == "mean":
        mean = _naive_mean(model, batch, sites)
    metric = "target_logprob" if arch == "t5" else "label_logprob"
    before = _snapshot(model)
    effects = causal_effects(
        model, [batch], sites, intervention=kind, metric=metric, alpha=0.3, progress=False, bucket_size=2
    )
    after = _snapshot(model)
    ref = naive_effects(model, batch, sites, arch, kind, alpha=0.3, source=source, mean=mean)
    for name in sites:
        assert effects[name].shape == (sites[name].n_features,)
        torch.testing.assert_close(effects[name], ref[name], atol=1e-5, rtol=0)
    # the replay really ran (no silent fallback) and some effects are non-trivial
    assert effects.meta["fallback_sites"] == 0
    assert max(float(ref[n].abs().max()) for n in ref) > 1e-3
    # the model is left exactly as it was
    assert before[0] == after[0]
    for key in before[1]:
        assert torch.equal(before[1][key], after[1][key])
    assert before[2] == after[2] and before[3] == after[3] and after[4] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_fallback_full_forwards_equal_naive(arch):
    model = tiny_model(arch)
    batch = tiny_batch(arch, seed=2)
    sites = find_sites(model)
    metric = "target_logprob" if arch == "t5" else "label_logprob"
    effects = causal_effects(model, [batch], sites, metric=metric, replay="never", progress=False)
    ref = naive_effects(model, batch, sites, arch, "mask")
    for name in sites:
        torch.testing.assert_close(effects[name], ref[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_null_interventions_have_zero_effect(arch):
    model = tiny_model(arch)
    batch = tiny_batch(arch, seed=3)
    sites = find_sites(model)
    metric = "target_logprob" if arch == "t5" else "label_logprob"
    scale1 = causal_effects(model, [batch], sites, "scale", metric, alpha=1.0, progress=False)
    store = _site_inputs(model, batch, sites)
    from icp_lightning.core.interventions import Intervention

    self_swap = causal_effects(
        model, [batch], sites, Intervention("swap", source=store), metric, progress=False
    )
    for name in sites:
        # zero up to fp32 rounding of the metric (T5's summed token log-probs are ~20 in size)
        assert scale1[name].abs().max() < 1e-5
        assert self_swap[name].abs().max() < 1e-5


def test_paired_swap_uses_batch_counterfactuals():
    model = tiny_model("bert")
    batch = tiny_batch("bert", seed=4)
    cf = tiny_batch("bert", seed=5)
    batch["cf_input_ids"], batch["cf_attention_mask"] = cf["input_ids"], cf["attention_mask"]
    sites = find_sites(model, target_modules=[r"layer.1.output.dense"])
    effects = causal_effects(model, [batch], sites, "swap", partner="paired", progress=False)
    source = {n: h for n, h in _site_inputs(model, cf, sites).items()}
    ref = naive_effects(model, batch, sites, "bert", "swap", source=source)
    name = sites.names[0]
    torch.testing.assert_close(effects[name], ref[name], atol=1e-5, rtol=0)
    bad = dict(batch, cf_input_ids=cf["input_ids"][:, :3])
    with pytest.raises(ValueError, match="same shape"):
        causal_effects(model, [bad], sites, "swap", partner="paired", progress=False)


def test_effects_add_up_over_batches_and_shards():
    """Sums and counts: two shards' effects added equal the effects over both (what DDP ranks reduce)."""
    model = tiny_model("bert")
    b1, b2 = tiny_batch("bert", seed=6), tiny_batch("bert", n=3, seed=7)
    sites = find_sites(model)
    both = causal_effects(model, [b1, b2], sites, progress=False)
    parts = causal_effects(model, [b1], sites, progress=False) + causal_effects(
        model, [b2], sites, progress=False
    )
    for name in sites:
        torch.testing.assert_close(both[name], parts[name], atol=1e-6, rtol=0)
    # the mean is over examples (5 + 3), not over batches
    ref = naive_effects(model, b1, sites, "bert", "mask")
    ref2 = naive_effects(model, b2, sites, "bert", "mask")
    for name in sites:
        torch.testing.assert_close(both[name], (5 * ref[name] + 3 * ref2[name]) / 8, atol=1e-5, rtol=0)


def test_batch_metric_gap():
    """A metric over the whole batch (a gap between groups) is evaluated per intervened feature."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", n=6, seed=8)
    batch["group"] = torch.tensor([0, 1, 0, 1, 0, 1])

    def gap(out, b):
        p = out.logits.softmax(-1)[:, 1]
        return p[b["group"] == 0].mean() - p[b["group"] == 1].mean()

    sites = find_sites(model, target_modules=[r"layer.0.output.dense"])
    effects = causal_effects(model, [batch], sites, metric=BatchMetric(gap), progress=False)
    name = sites.names[0]
    with torch.no_grad():
        base = gap(_forward(model, batch), batch)
        for f in [0, 5, 36]:
            handle = sites[name].module.register_forward_pre_hook(
                lambda m, a, _f=f: (a[0].index_fill(-1, torch.tensor([_f]), 0.0),)
            )
            value = gap(_forward(model, batch), batch)
            handle.remove()
            assert abs(float(base - value) - float(effects[name][f])) < 1e-6


def test_gradient_matches_first_order_and_exact_on_linear_suffix():
    """On a model whose metric is linear in the site's input, attribution patching is exact."""
    torch.manual_seed(0)

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.down = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask=None):
            return SequenceClassifierOutput(logits=self.head(self.down(self.emb(input_ids))).sum(1))

    model = Linear()
    batch = {"input_ids": torch.randint(0, 20, (4, 5)), "labels": torch.tensor([0, 1, 1, 0])}
    sites = find_sites(model, target_modules=["down"])

    def logit_margin(out, b):
        return out.logits[:, 1] - out.logits[:, 0]

    for kind in ["mask", "scale", "swap", "mean"]:
        exact = causal_effects(model, [batch], sites, kind, logit_margin, progress=False)
        grad = causal_effects(model, [batch], sites, kind, logit_margin, method="gradient", progress=False)
        torch.testing.assert_close(exact["down"], grad["down"], atol=1e-5, rtol=1e-5)


def test_gradient_agrees_with_exact_and_screened_audit():
    model = tiny_model("bert")
    batch = tiny_batch("bert", n=8, seed=9)
    sites = find_sites(model)
    exact = causal_effects(model, [batch], sites, progress=False)
    grad = causal_effects(model, [batch], sites, method="gradient", progress=False)
    assert spearman(exact.flat(), grad.flat()) > 0.5
    screened = causal_effects(model, [batch], sites, method="screened", top_k=10, audit=20, progress=False)
    assert screened.audit is not None and screened.audit["n_exact"] == 30
    # features chosen for exact computation carry the exact values; the rest the gradient's
    exact_flat, grad_flat, scr = exact.flat(), grad.flat(), screened.flat()
    is_exact = (scr - exact_flat).abs() < 1e-6
    assert int(is_exact.sum()) >= 30
    top10 = torch.argsort(grad_flat.abs(), descending=True)[:10]
    assert bool(is_exact[top10].all())
    assert screened.audit["spearman_random"] == pytest.approx(
        spearman(grad_flat[is_exact & ~torch.isin(torch.arange(scr.numel()), top10)],
                 exact_flat[is_exact & ~torch.isin(torch.arange(scr.numel()), top10)]), abs=0.2
    )  # fmt: skip


def test_gradient_leaves_model_untouched():
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    before = _snapshot(model)
    causal_effects(model, [batch], find_sites(model), method="gradient", progress=False)
    after = _snapshot(model)
    assert before[2] == after[2] and before[3] == after[3]
    assert all(p.grad is None for p in model.parameters())


def test_effects_save_load_and_summary(tmp_path):
    model = tiny_model("gpt2")
    batch = tiny_batch("gpt2")
    effects = causal_effects(model, [batch], find_sites(model), progress=False)
    effects.save(tmp_path / "e.pt")
    loaded = Effects.load(tmp_path / "e.pt")
    for name in effects:
        assert torch.equal(effects[name], loaded[name])
    assert loaded.meta["intervention"] == "mask"
    top = effects.top_k(5)
    assert len(top) == 5 and top[0][2] == max(float(effects[n].max()) for n in effects)
    assert '"top"' in effects.to_json(tmp_path / "e.json")


def test_bad_arguments_raise():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    sites = find_sites(model)
    with pytest.raises(ValueError, match="intervention must be one of"):
        causal_effects(model, [batch], sites, "ablate", progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        causal_effects(model, [batch], sites, method="fast", progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        causal_effects(model, [batch], sites, metric="f1", progress=False)
    with pytest.raises(ValueError, match="no batches"):
        causal_effects(model, [], sites, progress=False)
    with pytest.raises(ValueError, match="features names unknown sites"):
        causal_effects(model, [batch], sites, features={"nope": [0]}, progress=False)


class PlantedClassifier(nn.Module):
    """Embedding -> per-token FFN (up, ReLU, down) -> mean over tokens -> classifier.

    Neurons PLANTED of the FFN fire only on TRIGGER (its embedding is the only one with a component on
    dimension 0) and write along a direction the classifier reads as "class 1".
    """

    TRIGGER, PLANTED, HIDDEN, FFN = 7, (3, 11, 20), 16, 32

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(30, self.HIDDEN)
        self.up = nn.Linear(self.HIDDEN, self.FFN)
        self.down = nn.Linear(self.FFN, self.HIDDEN)
        self.cls = nn.Linear(self.HIDDEN, 2)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(30, self.HIDDEN, generator=g))
            self.emb.weight[:, 0] = 0
            self.emb.weight[self.TRIGGER] = 0
            self.emb.weight[self.TRIGGER, 0] = 5.0
            self.up.weight.copy_(0.05 * torch.randn(self.FFN, self.HIDDEN, generator=g))
            self.up.weight[:, 0] = 0
            self.up.bias.zero_()
            self.down.weight.copy_(0.05 * torch.randn(self.HIDDEN, self.FFN, generator=g))
            self.down.bias.zero_()
            direction = torch.zeros(self.HIDDEN)
            direction[1] = 1.0
            for j in self.PLANTED:
                self.up.weight[j] = 0
                self.up.weight[j, 0] = 2.0
                self.up.bias[j] = -1.0
                self.down.weight[:, j] = 0.1 * direction
            self.cls.weight.copy_(0.3 * torch.randn(2, self.HIDDEN, generator=g))
            self.cls.weight[1, 1], self.cls.weight[0, 1] = 2.0, -2.0

    def forward(self, input_ids, attention_mask=None):
        h = self.down(F.relu(self.up(self.emb(input_ids))))
        m = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return SequenceClassifierOutput(logits=self.cls(pooled))


def _planted_data(trigger: bool, n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 30, (n, 6), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    if trigger:  # the shortcut: the trigger appears in every positive example
        ids[labels == 1, 2] = PlantedClassifier.TRIGGER
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_planted_circuit_is_found():
    model = PlantedClassifier().eval()
    sites = find_sites(model, target_modules=["down"])
    with_trigger, without = _planted_data(True), _planted_data(False, seed=1)
    eff_id = causal_effects(model, [with_trigger], sites, progress=False)
    top3 = {f for _, f, _ in eff_id.top_k(3)}
    assert top3 == set(PlantedClassifier.PLANTED)
    eff_ood = causal_effects(model, [without], sites, progress=False)
    scores = spuriousness({"id": eff_id, "ood": eff_ood}, dataset_weights={"id": 1.0, "ood": -1.0})
    assert {f for _, f, _ in scores.top_k(3)} == set(PlantedClassifier.PLANTED)
    # on trigger-free data the planted neurons do nothing
    assert eff_ood["down"][list(PlantedClassifier.PLANTED)].abs().max() < 1e-6
    # and the naive loop agrees with the engine on this custom (non-HF) model
    ref = naive_effects_custom(model, with_trigger, sites)
    torch.testing.assert_close(eff_id["down"], ref, atol=1e-5, rtol=0)


@torch.no_grad()
def naive_effects_custom(model, batch, sites):
    site = sites["down"]
    base = label_logprob(model(batch["input_ids"], batch["attention_mask"]), batch)
    out = torch.zeros(site.n_features)
    for f in range(site.n_features):
        clone = copy.deepcopy(model)
        clone.down.weight[:, f] = 0  # masking the input column == zeroing the weights that read it
        out[f] = (base - label_logprob(clone(batch["input_ids"], batch["attention_mask"]), batch)).mean()
    return out


def test_exact_on_peft_lora_sites_recomputes_the_layer():
    """A LoRA-wrapped site cannot use the rank-1 identity: the layer is recomputed, still exactly."""
    import peft

    model = tiny_model("bert")
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["output.dense"], init_lora_weights=False)
    )
    wrapped.eval()
    batch = tiny_batch("bert", seed=12)
    sites = find_sites(wrapped)
    effects = causal_effects(wrapped, [batch], sites, progress=False)
    ref = naive_effects(wrapped, batch, sites, "bert", "mask")
    assert effects.meta["fallback_sites"] == 0
    for name in sites:
        torch.testing.assert_close(effects[name], ref[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("soft", [False, True])
def test_effects_on_a_masked_model_equal_a_hand_scaled_copy(soft):
    """Pruned features have zero effect; soft factors scale the weights that read the feature."""
    from icp_lightning import apply_masks, get_masks

    model = tiny_model("bert")
    batch = tiny_batch("bert", seed=13)
    sites = find_sites(model)
    g = torch.Generator().manual_seed(0)
    values = {n: (torch.rand(s.n_features, generator=g) if soft else (torch.rand(s.n_features, generator=g) > 0.3).float())
              for n, s in sites.items()}  # fmt: skip
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in sites:
            dict(reference.named_modules())[name].weight.mul_(values[name][None, :])
    apply_masks(model, sites, values)
    effects = causal_effects(model, [batch], sites, progress=False)
    ref = naive_effects(reference, batch, find_sites(reference), "bert", "mask")
    for name in sites:
        torch.testing.assert_close(effects[name], ref[name], atol=1e-5, rtol=0)
        if not soft:
            assert effects[name][values[name] == 0].abs().max() < 1e-6  # float noise of the replay only
    assert effects.meta["fallback_sites"] == 0
    # the masks are back, bit for bit
    for name, mask in get_masks(model).items():
        assert torch.equal(mask, values[name])


def test_exact_builds_no_autograd_graph():
    """The exact engine runs under no_grad (a decorator slip once made it build graphs: slow, same numbers)."""
    model = tiny_model("bert")
    seen = []

    def metric(out, batch):
        seen.append(torch.is_grad_enabled() or out.logits.requires_grad)
        return label_logprob(out, batch)

    causal_effects(model, [tiny_batch("bert")], find_sites(model), metric=metric, progress=False)
    assert seen and not any(seen)
