"""QLoRA gradients stay exact after an evaluation pass.

On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout the
first time a layer runs in eval mode without grad (the contamination probe and every checkpoint
evaluation do). The backward through that layout's kernel has no autograd: torch warns it "may be
silently incorrect" and drops the gradient through the frozen base. The run's model loader keeps
the training layout, so the adapters' gradients after an eval pass equal those before it."""

from __future__ import annotations

import warnings

import pytest

bnb = pytest.importorskip("bitsandbytes")


def _adapter_grads(model, ids, eval_first: bool) -> dict:
    import torch

    if eval_first:  # what the probe and a checkpoint evaluation do to the model
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_adapter_gradients_are_the_same_after_an_eval_pass(project):
    import torch
    from peft.tuners.lora import LoraLayer

    from sftc.runtime.bundle import load_bundle
    from sftc.runtime.model import load_model

    bundle = load_bundle(project.compile(parameterization={"kind": "qlora", "rank": 4, "alpha": 8, "dropout": 0.0}))
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    models = []
    for _ in range(2):
        model = load_model(bundle)
        for module in model.modules():  # peft starts B at zero: give every adapter a gradient path
            if isinstance(module, LoraLayer):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02,
                                      generator=torch.Generator().manual_seed(1))
        models.append(model)
    layers = [m for m in models[1].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)

    reference = _adapter_grads(models[0], ids, eval_first=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after_eval = _adapter_grads(models[1], ids, eval_first=True)
    assert not [w for w in caught if "silently incorrect" in str(w.message)]
    assert reference.keys() == after_eval.keys() and reference
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after_eval[name], grad, rtol=1e-5, atol=1e-7, msg=name)
