"""``ICPContrastiveModule``: fine-tune a Hugging Face model with a counterfactual KL term.

    L = L_task(M(x), y) + lambda_t * D(M(x), M(x'))

x' comes from a counterfactual strategy (:mod:`~icp_lightning.core.counterfactuals`): the model itself under
do(h = v) on the spurious features found by the attribution callback, an inverse of that intervention in input
space, paired inputs, or word swaps. D is KL(p || p'), KL(p' || p) or Jensen-Shannon
(:func:`~icp_lightning.core.losses.counterfactual_kl`). The HF model is ``self.model`` (wrapped in PEFT when
``peft`` is given), where the callbacks find it; pruning masks installed on its site modules keep applying while
LoRA adapters train.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> module = ICPContrastiveModule(transformers.BertForSequenceClassification(cfg), kl_weight=0.5)
    >>> batch = {"input_ids": torch.randint(5, 30, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])}
    >>> out = module.compute_loss(batch)  # no scores yet: the KL term is skipped
    >>> bool(out["kl_skipped"]), bool(torch.equal(out["loss"], out["task_loss"]))
    (True, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftConfig
from torch import nn
from typing_extensions import override

from icp_lightning.core.counterfactuals import (
    CounterfactualName,
    CounterfactualStrategy,
    build_counterfactual,
)
from icp_lightning.core.effect_metrics import check_class_labels
from icp_lightning.core.interventions import model_inputs
from icp_lightning.core.losses import (
    IGNORE_INDEX,
    KLDirection,
    KLSchedule,
    answer_token_mask,
    counterfactual_kl,
    kl_weight_at,
    total_loss,
)
from icp_lightning.core.sites import Granularity, Sites, check_scores_fit, find_sites
from icp_lightning.eval_sets import EvalSetsModule, _batch_size
from icp_lightning.models import (  # noqa: F401  (transformer_blocks, TASKS: importable from here)
    TASKS,
    Task,
    _n_params,
    _peft_dict,
    _plain,
    load_hf_model,
    peft_config,
    transformer_blocks,
)
from icp_lightning.module_checks import check_module_args, check_more_module_args


class ICPContrastiveModule(EvalSetsModule):
    """Fine-tuning with ``L = L_task(M(x), y) + lambda_t * D(M(x), M(x'))`` and per-set reliability metrics.

    Args:
        model: a hub name or local path (loaded with ``AutoModelForSequenceClassification``,
            ``AutoModelForCausalLM`` or ``AutoModelForSeq2SeqLM`` by ``task``) or a built ``PreTrainedModel``.
        task: ``"sequence_classification"`` (labels ``[N]``), ``"causal_lm"`` (labels ``[N, T]``, -100 on the
            prompt and padding: loss and KL on answer tokens only) or ``"seq2seq"`` (decoder labels).
        num_labels: classes of a classification head loaded from a name.
        peft: a ``peft`` config (e.g. ``LoraConfig``) or a dict of its fields; the model is wrapped with
            ``get_peft_model`` (only adapters, and the classification head, train).
        counterfactual: ``"intervention"``, ``"inversion"``, ``"token_edit"``, ``"paired"``, ``"token_swap"`` or
            an object with ``build(model, batch, scores, sites)``.
        counterfactual_kwargs: constructor arguments of a named strategy (e.g. ``{"kind": "mask"}``,
            ``{"tokenizer": tok}`` for ``token_swap``).
        kl_weight: lambda. 0 is plain fine-tuning: no counterfactual forward at all.
        kl_schedule: ``"constant"``, ``"linear_warmup"`` (over ``kl_warmup_steps``) or a callable
            ``global_step -> factor`` multiplying ``kl_weight``.
        kl_warmup_steps: steps of the linear warm-up.
        kl_direction: ``"forward"`` KL(p || p'), ``"reverse"`` KL(p' || p), ``"symmetric"`` Jensen-Shannon.
        temperature: softmax temperature of both distributions in the KL term.
        detach_cf: stop gradients through the counterfactual branch (default: both branches get gradients).
        tau_c: features with spuriousness score > ``tau_c`` are intervened on (feature strategies).
        top_k_c: or the ``top_k_c`` highest-scoring features. Neither: every feature with a positive score.
        optimizer: a LightningCLI-style ``params -> Optimizer`` callable; default ``AdamW(lr, weight_decay)``.
        lr_scheduler: a ``optimizer -> LRScheduler`` callable, stepped every ``lr_scheduler_interval``.
        lr: learning rate of the default optimizer.
        weight_decay: weight decay of the default optimizer.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``.
        eval_sets: one name per validation / test dataloader (``dataloader_idx`` -> name); metrics are logged as
            ``val/{name}/{key}`` and ``test/{name}/{key}``.
        num_groups: number of group ids carried by eval batches under ``"group"``: enables the fairness and
            worst-group metrics.
        model_kwargs: passed to ``from_pretrained`` when ``model`` is a name.

    Attributes:
        model: the HF model (a ``PeftModel`` with ``peft``).
        icp_scores: ``site -> [n_features]`` spuriousness scores (set by the attribution callback or
            :meth:`set_scores`); ``None`` until then, and the KL term of feature strategies is skipped.
        icp_sites: the :class:`~icp_lightning.core.sites.Sites` the scores refer to.
        counterfactual: the strategy object.

    Batches are dicts of model inputs plus ``labels``; eval batches may carry ``group`` (int ids) and
    ``cf_input_ids`` / ``cf_attention_mask`` (then the counterfactual flip rate is logged). Both the clean and
    the counterfactual forward run in train mode during training: with dropout, the KL term is nonzero even
    for x' = x (as in R-Drop).

    Checkpoints: ``load_from_checkpoint(path)`` rebuilds the module from its hyperparameters when ``model``
    was a name or path; arguments a checkpoint cannot hold as plain data (a model object, a strategy object,
    callables such as ``optimizer`` or a callable ``kl_schedule``, a tokenizer in ``counterfactual_kwargs``)
    are not saved: pass them again, e.g. ``load_from_checkpoint(path, model=<same init arg>)``. A PEFT config
    is saved as a plain dict. The scores and site names are saved too and restored on load.
    """

    def __init__(
        self,
        model: str | nn.Module,
        task: Task = "sequence_classification",
        num_labels: int = 2,
        peft: PeftConfig | dict[str, Any] | None = None,
        counterfactual: CounterfactualName | CounterfactualStrategy = "intervention",
        counterfactual_kwargs: dict[str, Any] | None = None,
        kl_weight: float = 1.0,
        kl_schedule: KLSchedule | Callable[[int], float] = "constant",
        kl_warmup_steps: int = 0,
        kl_direction: KLDirection = "forward",
        temperature: float = 1.0,
        detach_cf: bool = False,
        tau_c: float | None = None,
        top_k_c: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        eval_sets: Sequence[str] = ("val",),
        num_groups: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_module_args(
            task, num_labels, kl_weight, kl_schedule, kl_warmup_steps, kl_direction, temperature
        )
        if task != "sequence_classification":
            # No classification head: num_labels means nothing, and in the saved hparams a default 2 would clash
            # with a causal-LM data module's None (Lightning refuses to merge differing hparams).
            num_labels = None  # type: ignore[assignment]
        check_more_module_args(tau_c, top_k_c, lr_scheduler_interval, eval_sets, num_groups)
        peft_cfg = peft_config(peft, task)
        local = {
            "model": model,
            "counterfactual": counterfactual,
            "counterfactual_kwargs": counterfactual_kwargs,
            "kl_schedule": kl_schedule,
            "model_kwargs": model_kwargs,
        }
        ignore = ["optimizer", "lr_scheduler", "peft"] + [k for k, v in local.items() if not _plain(v)]
        self.save_hyperparameters(ignore=ignore)
        # Kept JSON-safe, so a checkpoint loads under torch.load(weights_only=True) and rebuilds the adapters.
        self.hparams["peft"] = _peft_dict(peft_cfg) if peft_cfg is not None else None
        self.hparams["eval_sets"] = list(eval_sets)
        if task != "sequence_classification":
            # LightningCLI records the config's init args as hparams (num_labels=2 by default): blank it there too
            # (_hparams_initial is what Lightning compares with the data module's hparams).
            for saved in (self.hparams, getattr(self, "_hparams_initial", None)):
                if saved is not None and "num_labels" in saved:
                    saved["num_labels"] = None

        self.task: Task = task
        base = load_hf_model(model, task, num_labels, model_kwargs)
        if peft_cfg is not None:
            import peft as peft_lib

            base = peft_lib.get_peft_model(base, peft_cfg)
        base.train()  # from_pretrained returns eval mode; Lightning switches modes for evaluation itself
        self.model = base
        self.counterfactual = build_counterfactual(
            counterfactual, defaults={"tau_c": tau_c, "top_k": top_k_c}, **(counterfactual_kwargs or {})
        )
        self.kl_weight = float(kl_weight)
        self.kl_schedule = kl_schedule
        self.kl_warmup_steps = kl_warmup_steps
        self.kl_direction: KLDirection = kl_direction
        self.temperature = temperature
        self.detach_cf = detach_cf
        self.optimizer_fn = optimizer
        self.lr_scheduler_fn = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.eval_sets = list(eval_sets)
        self.num_groups = num_groups
        self.icp_scores: Mapping[str, torch.Tensor] | None = None
        self.icp_sites: Sites | None = None
        self._told_skip = False
        self._init_eval_metrics(self._num_classes(num_labels), num_groups)

    # ------------------------------------------------------------------------------------------------------
    # Arguments

    def _num_classes(self, num_labels: int) -> int:
        if self.task == "sequence_classification":
            return int(getattr(self.hf_model.config, "num_labels", num_labels))
        out = self.hf_model.get_output_embeddings()
        weight = getattr(out, "weight", None)
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[0])
        return int(self.hf_model.config.vocab_size)

    # ------------------------------------------------------------------------------------------------------
    # Parallelism

    @override
    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy``: shard each transformer block, then the whole model.

        With a device mesh (``self.device_mesh``, set by ``ModelParallelStrategy``), applies
        ``torch.distributed.fsdp.fully_shard`` over the mesh's ``"data_parallel"`` dimension to every block of
        :func:`transformer_blocks` (``bert.encoder.layer``, ``model.layers``, ``transformer.h``, ...) and then to
        ``self.model`` (embeddings, heads and anything else in one root group). The parameters become
        ``DTensor`` shards; the ICP callbacks find the sites again at ``on_fit_start`` and gather the parameters
        for attribution themselves. Without a mesh (one device, DDP, ...) it does nothing; a second call does
        nothing either.

        Raises:
            ValueError: a mesh with tensor parallelism (``tensor_parallel_size > 1``): only data-parallel
                sharding is implemented here.

        Example:
            >>> trainer = pl.Trainer(accelerator="cpu", devices=2,  # doctest: +SKIP
            ...     strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
            >>> trainer.fit(module, datamodule=dm)  # configure_model shards the model on each rank  # doctest: +SKIP
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        names = tuple(mesh.mesh_dim_names or ())
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"ICPContrastiveModule.configure_model applies FSDP2 over data parallelism only, but the device mesh "
                f"{names} has tensor_parallel size {mesh['tensor_parallel'].size()}: use "
                "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1), or subclass and "
                "override configure_model to apply tensor parallelism"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        for block in transformer_blocks(self.model):
            if not isinstance(block, FSDPModule):
                fully_shard(block, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    # ------------------------------------------------------------------------------------------------------
    # Model access and scores

    @property
    def hf_model(self) -> Any:
        """The underlying ``PreTrainedModel`` (inside the PEFT wrapper, if any)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def is_peft(self) -> bool:
        """Whether ``self.model`` is a PEFT-wrapped model."""
        return callable(getattr(self.model, "get_base_model", None)) and hasattr(self.model, "peft_config")

    def set_scores(self, scores: Mapping[str, torch.Tensor] | None, sites: Sites | None = None) -> None:
        """Set the spuriousness scores (``site name -> [n_features]``) and the sites they refer to.

        Args:
            scores: a ``Scores`` or a plain dict; ``None`` clears them (the KL term of feature strategies is then
                skipped).
            sites: the ``Sites`` the scores were computed on. Default: the current sites if every scored name is
                among them, else the modules of ``self.model`` with exactly the scored names, at the granularity
                of the scores' metadata (a ``Scores`` from :func:`~icp_lightning.core.scores.spuriousness`); a
                plain dict is read at neuron granularity.

        Raises:
            ValueError: a scored site that the model does not have, or a score vector of the wrong length.
        """
        if scores is None:
            self.icp_scores = None
            return
        names = list(scores)
        if sites is None:
            current = self.icp_sites
            if current is not None and all(n in current for n in names):
                sites = current
            else:
                sites = self._sites_named(names, scores)
        check_scores_fit(scores, sites)
        self.icp_scores = scores
        self.icp_sites = sites

    def _sites_named(self, names: list[str], scores: Mapping[str, torch.Tensor] | None = None) -> Sites:
        """The sites of ``self.model`` that ``scores`` name, at the granularity their metadata says
        (:func:`~icp_lightning.core.sites.sites_for_scores`); a plain dict without metadata: neuron granularity
        (pass ``sites=`` for head scores). Never guessed from the score lengths."""
        from icp_lightning.core.sites import sites_for_scores

        if scores is None:
            return find_sites(self.model, target_modules=names).subset(names)
        meta = getattr(scores, "meta", None) or {}
        fallback: Granularity | None = None if meta.get("granularity") else "neuron"
        try:
            return sites_for_scores(self.model, scores, granularity=fallback)
        except ValueError as err:
            raise ValueError(f"{err}; pass sites= (the Sites the scores were computed on)") from None

    # ------------------------------------------------------------------------------------------------------
    # Forward and losses

    @override
    def forward(self, **inputs: Any) -> Any:
        """The HF model's outputs on ``inputs`` (entries it does not take are dropped)."""
        return self.model(**model_inputs(self.model, inputs))

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The model's logits on a batch."""
        return self.model(**model_inputs(self.model, batch)).logits  # type: ignore[no-any-return]

    def task_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cross-entropy: per example (classification), or over answer tokens (labels != -100; causal LMs with
        the shift)."""
        if "labels" not in batch:
            raise KeyError(
                f"training and evaluation batches need 'labels'; the batch has keys {sorted(batch)}"
            )
        labels = batch["labels"]
        if self.task == "sequence_classification":
            check_class_labels(labels, logits.shape[-1])
            return F.cross_entropy(logits.float(), labels.long())
        if self.task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != IGNORE_INDEX
        if not keep.any():
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX
        )

    def _answer_mask(self, batch: Mapping[str, Any] | None) -> torch.Tensor | None:
        if self.task == "sequence_classification" or batch is None:
            return None
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor):
            return None
        return answer_token_mask(labels, shift=self.task == "causal_lm")

    def current_kl_weight(self) -> float:
        """lambda at the current global step."""
        return kl_weight_at(self.global_step, self.kl_weight, self.kl_schedule, self.kl_warmup_steps)

    def counterfactual_logits(
        self, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]] | None:
        """``(logits on x', answer mask of x', info)`` from the strategy, or ``None`` when it has none."""
        out = self.counterfactual.build(self.model, batch, self.icp_scores, self.icp_sites)
        if out is None:
            return None
        info = dict(getattr(out, "info", None) or {})
        cf_logits = getattr(out, "logits", None)
        if cf_logits is not None:
            return cf_logits, self._answer_mask(batch), info
        cf_batch = getattr(out, "batch", None)
        if cf_batch is None:
            raise ValueError(
                f"{type(self.counterfactual).__name__}.build returned neither logits nor a batch"
            )
        return self.logits(cf_batch), self._answer_mask(cf_batch), info

    def compute_loss(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The training objective on one batch.

        Returns:
            ``loss``, ``task_loss``, ``kl`` (0 when skipped), ``kl_weight`` (lambda_t), ``kl_skipped`` (no
            counterfactual for this batch although lambda_t > 0), ``info`` (the strategy's diagnostics).
        """
        logits = self.logits(batch)
        task_loss = self.task_loss(logits, batch)
        weight = self.current_kl_weight()
        kl: torch.Tensor | None = None
        info: dict[str, Any] = {}
        skipped = False
        if weight != 0:
            cf = self.counterfactual_logits(batch)
            if cf is None:
                skipped = True
            else:
                cf_logits, cf_mask, info = cf
                kl = counterfactual_kl(
                    logits,
                    cf_logits,
                    self.kl_direction,
                    self.temperature,
                    mask=self._answer_mask(batch),
                    cf_mask=cf_mask,
                    detach_cf=self.detach_cf,
                )
        loss = total_loss(task_loss, kl, weight)
        kl_value = kl if kl is not None else torch.zeros((), device=task_loss.device)
        return {
            "loss": loss,
            "task_loss": task_loss,
            "kl": kl_value,
            "kl_weight": weight,
            "kl_skipped": skipped,
            "info": info,
        }

    # ------------------------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        n = _batch_size(batch)
        log = {"on_step": True, "on_epoch": True, "batch_size": n}
        self.log("train/loss", out["loss"].detach(), prog_bar=True, **log)  # type: ignore[arg-type]
        self.log("train/task_loss", out["task_loss"].detach(), **log)  # type: ignore[arg-type]
        self.log("train/kl", out["kl"].detach(), **log)  # type: ignore[arg-type]
        self.log("train/kl_weight", float(out["kl_weight"]), **log)  # type: ignore[arg-type]
        self.log("train/kl_skipped", float(out["kl_skipped"]), **log)  # type: ignore[arg-type]
        for key, value in out["info"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.log(f"train/cf/{key}", float(value), **log)  # type: ignore[arg-type]
        if out["kl_skipped"] and not self._told_skip:
            rank_zero_info(
                f"ICPContrastiveModule: the {type(self.counterfactual).__name__} counterfactual has no "
                "spuriousness scores (or no feature passes tau_c / top_k_c) yet: the KL term is skipped "
                "(logged as train/kl = 0, train/kl_skipped = 1) until the attribution callback or set_scores() "
                "provides them"
            )
            self._told_skip = True
        return out["loss"]  # type: ignore[no-any-return]

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class (or next-token) probabilities: ``softmax(logits)``."""
        return self.logits(batch).float().softmax(-1)

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        optimizer: torch.optim.Optimizer
        if self.optimizer_fn is None:
            optimizer = torch.optim.AdamW(
                params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
            )
        else:
            optimizer = self.optimizer_fn(params)
        if self.lr_scheduler_fn is None:
            return optimizer
        scheduler = self.lr_scheduler_fn(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = f"val/{self.eval_sets[0]}/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints and export

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.icp_scores is not None and self.icp_sites is not None:
            checkpoint["icp_scores"] = {
                name: torch.as_tensor(value).detach().float().cpu() for name, value in self.icp_scores.items()
            }
            checkpoint["icp_sites"] = {
                "names": self.icp_sites.names,
                "granularity": self.icp_sites.granularity,
            }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        scores = checkpoint.get("icp_scores")
        sites = checkpoint.get("icp_sites")
        if scores is None or sites is None:
            return
        names = list(sites["names"])
        found = find_sites(self.model, target_modules=names, granularity=sites["granularity"])
        self.set_scores(dict(scores), found.subset(names))

    def merge_and_export(self, path: str | Path, tokenizer: Any = None) -> Path:
        """Save a plain Hugging Face model to ``path`` (``save_pretrained``), LoRA adapters merged in.

        The module keeps its adapters (a copy is merged). The merged weights carry the pruning (pruned columns
        are zero in the base weights and in every ``lora_A``; see ``icp_lightning.core.masks``). To share the
        adapter alone, use :func:`icp_lightning.save_adapter`, which also writes the masks of the base.

        Args:
            path: output directory.
            tokenizer: also saved there when given.

        Returns:
            The output directory.
        """
        out = Path(path)
        model: Any = copy.deepcopy(self.model).merge_and_unload() if self.is_peft else self.model  # type: ignore[operator]
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out
