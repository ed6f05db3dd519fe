"""Counterfactual KL and friends: the invariance term of ICP fine-tuning, as pure functions.

The training objective of :class:`~icp_lightning.module.ICPContrastiveModule` is

    L = L_task(M(x), y) + lambda_t * D(M(x), M(x'))

where x' is a counterfactual of x (see :mod:`~icp_lightning.core.counterfactuals`) and D is a divergence
between the two predictive distributions p = softmax(M(x) / T) and p' = softmax(M(x') / T):

- ``"forward"``: KL(p || p') = sum p * (log p - log p'), the clean prediction is the reference;
- ``"reverse"``: KL(p' || p);
- ``"symmetric"``: the Jensen-Shannon divergence 1/2 KL(p || m) + 1/2 KL(p' || m), m = (p + p') / 2.

Gradients flow into *both* branches by default: the model is pulled to make its clean prediction agree with
the counterfactual one as much as the other way round. ``detach_cf=True`` stops the gradient through x' (the
counterfactual prediction is then a fixed target, as in consistency training); the clean branch always
receives gradients. No ``T**2`` rescaling is applied.

Example:
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> round(float(counterfactual_kl(logits, logits)), 6)
    0.0
    >>> cf = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    >>> p, q = logits[0].softmax(-1), cf[0].softmax(-1)
    >>> bool(torch.isclose(counterfactual_kl(logits, cf), (p * (p / q).log()).sum() / 2))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from icp_lightning.core.choices import KL_DIRECTIONS, KL_SCHEDULES, KLDirection, KLSchedule

IGNORE_INDEX = -100


def answer_token_mask(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Which logit positions predict an answer token (a label that is not -100).

    Args:
        labels: ``[N, T]`` token labels, -100 on the prompt and on padding.
        shift: causal LMs (the default): the logits at position ``t`` predict ``labels[:, t + 1]``, so the mask
            is ``labels[:, 1:] != -100`` with a False last column. Seq2seq decoders: ``False`` (aligned).

    Returns:
        A boolean ``[N, T]`` mask over logit positions.

    Example:
        >>> answer_token_mask(torch.tensor([[-100, -100, 5, 6]]))
        tensor([[False,  True,  True, False]])
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [N, T] token labels, got shape {tuple(labels.shape)}")
    keep = labels != IGNORE_INDEX
    if not shift:
        return keep
    out = torch.zeros_like(keep)
    out[:, :-1] = keep[:, 1:]
    return out


def _kl_from_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p * (log p - log q) over the last dimension, from (finite) log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _select(logits: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    if logits.dim() == 2:
        if mask is not None:
            raise ValueError(f"{name} is [N, C] (one distribution per example): pass mask=None")
        return logits
    if logits.dim() != 3:
        raise ValueError(f"{name} must be [N, C] or token-level [N, T, V], got shape {tuple(logits.shape)}")
    if mask is None:
        return logits.reshape(-1, logits.shape[-1])
    if mask.shape != logits.shape[:2]:
        raise ValueError(
            f"mask for {name} has shape {tuple(mask.shape)} but the logits are {tuple(logits.shape)}: it must be "
            "[N, T] over logit positions (see answer_token_mask)"
        )
    return logits[mask.bool()]


def counterfactual_kl(
    logits: torch.Tensor,
    cf_logits: torch.Tensor,
    direction: KLDirection = "forward",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    cf_mask: torch.Tensor | None = None,
    detach_cf: bool = False,
) -> torch.Tensor:
    """Divergence between the predictions on x (``logits``) and on its counterfactual x' (``cf_logits``).

    Args:
        logits: M(x): ``[N, C]`` (classification) or ``[N, T, V]`` (token level).
        cf_logits: M(x'): same shape as ``logits``, or for token level any ``[N, T', V]`` with ``cf_mask``.
        direction: ``"forward"`` KL(p || p'), ``"reverse"`` KL(p' || p), ``"symmetric"`` Jensen-Shannon.
        temperature: both distributions are ``softmax(logits / temperature)``.
        mask: token level only: ``[N, T]`` True at the positions to compare (answer tokens, see
            :func:`answer_token_mask`); all positions when ``None``.
        cf_mask: token level only: the positions of x' to compare when they differ from ``mask`` (a paired x'
            with a prompt of another length); the i-th True position of ``mask`` is compared with the i-th True
            position of ``cf_mask`` in row-major order, so both must select as many positions in every row.
        detach_cf: stop gradients through ``cf_logits`` (x' becomes a fixed target). By default both branches
            receive gradients.

    Returns:
        A scalar: the divergence summed over classes and averaged over examples (classification) or over the
        selected positions (token level). 0 when no position is selected.

    Raises:
        ValueError: on mismatched shapes, an unknown direction or a non-positive temperature.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if logits.shape[-1] != cf_logits.shape[-1] or logits.dim() != cf_logits.dim():
        raise ValueError(
            f"logits {tuple(logits.shape)} and cf_logits {tuple(cf_logits.shape)} must have the same rank and the "
            "same number of classes"
        )
    if detach_cf:
        cf_logits = cf_logits.detach()
    p_logits = _select(logits, mask, "logits")
    q_logits = _select(cf_logits, cf_mask if cf_mask is not None else mask, "cf_logits")
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"the compared positions differ: {p_logits.shape[0]} in logits vs {q_logits.shape[0]} in cf_logits; "
            "x and x' must have the same shape, or mask and cf_mask must select as many positions per row"
        )
    if p_logits.shape[0] == 0:
        return logits.sum() * 0.0 + cf_logits.sum() * 0.0
    logp = F.log_softmax(p_logits.float() / temperature, dim=-1)
    logq = F.log_softmax(q_logits.float() / temperature, dim=-1)
    if direction == "forward":
        per_row = _kl_from_logp(logp, logq)
    elif direction == "reverse":
        per_row = _kl_from_logp(logq, logp)
    else:
        logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)
        per_row = 0.5 * _kl_from_logp(logp, logm) + 0.5 * _kl_from_logp(logq, logm)
    return per_row.mean()


def total_loss(task_loss: torch.Tensor, kl: torch.Tensor | None, weight: float) -> torch.Tensor:
    """``task_loss + weight * kl``; exactly ``task_loss`` (same graph) when ``weight == 0`` or ``kl is None``.

    Example:
        >>> total_loss(torch.tensor(1.0), torch.tensor(0.5), 2.0)
        tensor(2.)
    """
    if weight == 0 or kl is None:
        return task_loss
    return task_loss + weight * kl


def kl_weight_at(
    step: int,
    weight: float,
    schedule: KLSchedule | Callable[[int], float] = "constant",
    warmup_steps: int = 0,
) -> float:
    """The KL weight lambda_t at optimiser step ``step``.

    Args:
        step: the global optimiser step (0-based).
        weight: the base weight lambda; 0 always gives 0.
        schedule: ``"constant"`` (lambda), ``"linear_warmup"`` (lambda * min(1, (step + 1) / warmup_steps)), or a
            callable ``step -> factor`` multiplied by lambda.
        warmup_steps: steps of the linear warm-up (0: no warm-up).

    Example:
        >>> [kl_weight_at(s, 2.0, "linear_warmup", 4) for s in range(5)]
        [0.5, 1.0, 1.5, 2.0, 2.0]
    """
    if weight == 0:
        return 0.0
    if callable(schedule):
        return float(weight * schedule(step))
    if schedule == "constant" or warmup_steps <= 0:
        if schedule not in KL_SCHEDULES:
            raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES} or a callable, got {schedule!r}")
        return float(weight)
    if schedule == "linear_warmup":
        return float(weight * min(1.0, (step + 1) / warmup_steps))
    raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES} or a callable, got {schedule!r}")


@dataclass
class ICPLoss:
    """The full objective ``L_task + lambda * D(M(x), M(x'))`` with its settings in one object.

    Args:
        direction: see :func:`counterfactual_kl`.
        temperature: see :func:`counterfactual_kl`.
        detach_cf: see :func:`counterfactual_kl`.

    Example:
        >>> loss = ICPLoss(direction="symmetric")
        >>> logits = torch.tensor([[1.0, 0.0]])
        >>> total, kl = loss(torch.tensor(0.3), logits, logits, weight=1.0)
        >>> round(float(total), 4), round(float(kl), 4)
        (0.3, 0.0)
    """

    direction: KLDirection = "forward"
    temperature: float = 1.0
    detach_cf: bool = False

    def __post_init__(self) -> None:
        if self.direction not in KL_DIRECTIONS:
            raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {self.direction!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    def __call__(
        self,
        task_loss: torch.Tensor,
        logits: torch.Tensor,
        cf_logits: torch.Tensor | None,
        weight: float,
        mask: torch.Tensor | None = None,
        cf_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(total loss, kl)``; ``kl`` is ``None`` when ``cf_logits`` is ``None`` or ``weight == 0``."""
        if cf_logits is None or weight == 0:
            return task_loss, None
        kl = counterfactual_kl(
            logits, cf_logits, self.direction, self.temperature, mask, cf_mask, detach_cf=self.detach_cf
        )
        return total_loss(task_loss, kl, weight), kl
