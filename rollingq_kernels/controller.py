"""The RollingQ controller: the paper's Algorithm 1 at the end of each epoch.

:class:`RollingQ` reads the statistics that its
:class:`~rollingq_kernels.module.FusedRollingQAttention` layers gathered during
training and, when the attention imbalance is large, rotates their class
query towards the balanced anchor (Ni et al., ICML 2025, Sec. 3.3, App. B):

1. AIR = E[cos(q, k̄_0) − cos(q, k̄_1)] (Eq. 9); for ``M > 2`` modalities the
   decision uses the spread ``max − min`` of the mean cosines instead
   (:func:`~rollingq_kernels.accumulator.imbalance`).
2. If the decision quantity is ``≥ beta`` and the layer has made fewer than
   ``max_rotations`` rotations: α = softmax(−2ρ·E[cos]) (for ``M = 2`` exactly
   ½(1 + tanh(−ρ·AIR)), Eq. 11), anchor q_b = |E[q]| Σ α_m E[k̄_m]/|E[k̄_m]|
   (Eq. 10), R_b maps E[q] to q_b (``method="plane"``: the minimal rotation;
   ``"svd"``: the paper's Eq. 12 construction), and ``R ← R_b @ R``.

Indicator (``indicator=``): ``"cos"`` (default) decides on the paper's AIR
above, which assumes equal token counts ``L^m`` and equal mean-key norms
``‖k̄^m‖`` (Sec. 3.3). ``"score"`` weights each modality's mean cosine by its
share of Eq. 3's summed score ``L^m·‖k̄^m‖·cos θ^m`` (normalised so that it is
AIR when counts and norms are equal) and uses the weighted cosines for α too.
The token counts are the op's statistics (``AttentionStats.tokens``, summed in
the layers' windows); the norms are those of E[k̄^m].

Assumption check: at every step the controller compares the indicator with
the class-row attention mass. When the mass favours one modality by at least
0.1 and the indicator points at another (for two modalities: their signs
differ), it logs a warning naming the mass, the indicator, the token counts and
the mean-key norms, and sets ``RotationRecord.assumption_warning``: a rotation
would then move the query towards the modality that already has the attention.

First-rotation guard: :func:`accuracy_guard` (the trainer applies it with
``rollingq.min_accuracy_gain``) keeps a class query that has learned nothing
from being rotated.

Defaults: the paper states no values for ρ and β (only ρ > 0) and caps the
rotations at 1 (CREMA-D, MOSEI) or 3 (Kinetics-Sounds); we use ``rho=1.0``,
``beta=0.1`` and ``max_rotations=1``.

Estimates (``estimate=``):

* ``"accumulate"`` (default): everything comes from the statistics gathered
  during the epoch's training forwards (no extra pass). With ``window=1`` this
  is Algorithm 1 literally (the last batch ``B_j``).
* ``"pass"``: the official code's behaviour. AIR and the mean cosines (hence
  α) come from the training window (``window=1``: the last training batch,
  as in the official ``train_func.py``); only when a rotation is due, the mean
  keys and the mean class query come from an explicit ``torch.no_grad()``
  pass over ``loader`` (``forward_fn(batch)`` runs the model), as in the
  official ``method.py``; the layers hand that pass's statistics over through
  :meth:`~rollingq_kernels.module.FusedRollingQAttention.collecting`, and it
  never enters their windows. The layers are left in the mode the caller set.

Under ``torch.distributed`` the window sums are all-reduced before any
decision, so every rank computes the identical rotation; every rank must call
:meth:`RollingQ.step`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .accumulator import (
    StatisticsAccumulator,
    Window,
    WindowStatistics,
    check_indicator,
    check_window,
    imbalance,
    indicator_cosines,
    indicator_value,
    mass_disagreement,
    synced_statistics,
)
from .module import FusedRollingQAttention
from .rebalance import EPS, balanced_anchor, plane_rotation, rotation_angle_degrees, svd_rotation

logger = logging.getLogger("rollingq_kernels")

METHODS = ("plane", "svd")
ESTIMATES = ("accumulate", "pass")


@dataclass
class RotationRecord:
    """What :meth:`RollingQ.step` decided for one layer.

    Attributes:
        layer: the layer's name (or index) in the controller.
        epoch: the epoch passed to ``step`` (None if not given).
        air: the window's AIR (NaN when no sample had modalities 0 and 1).
        spread: ``max − min`` of the mean cosines.
        cos_mean: mean cosine per modality.
        mass: mean class-row attention mass on [class, modality 1, …, M]
            (averaged over heads).
        alpha: the anchor weights α per modality (per head: one list per head);
            empty when no anchor was computed.
        rotated: whether the layer's rotation was updated.
        angle_deg: angle between E[q] and the anchor (per head: their mean).
        cos_before_after: cosine between E[q] and R_b E[q] (1 when not rotated).
        count: samples in the decision window (summed over ranks).
        num_rotations: the layer's rotations after this step.
        reason: ``"rotated"``, ``"below_threshold"``, ``"max_rotations"``,
            ``"no_samples"`` or ``"degenerate"``.
        indicator: the indicator the decision used (``"cos"`` or ``"score"``).
        value: its value (AIR for ``"cos"`` with two modalities; the spread for more).
        tokens: mean valid tokens per sample per modality in the window.
        key_norm: ‖E[k̄^m]‖ per modality (heads concatenated).
        assumption_warning: the indicator and the attention mass favour different modalities.
    """

    layer: str
    epoch: int | None
    air: float
    spread: float
    cos_mean: list[float]
    mass: list[float] = field(default_factory=list)
    alpha: list = field(default_factory=list)
    rotated: bool = False
    angle_deg: float = 0.0
    cos_before_after: float = 1.0
    count: int = 0
    num_rotations: int = 0
    reason: str = ""
    indicator: str = "cos"
    value: float = math.nan
    tokens: list = field(default_factory=list)
    key_norm: list = field(default_factory=list)
    assumption_warning: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-friendly dict of the record."""
        return asdict(self)


def _check_settings(rho: float, beta: float, max_rotations: int, method: str, estimate: str) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho: expected a finite float > 0, got {rho!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta: expected a finite float >= 0, got {beta!r}")
    if isinstance(max_rotations, bool) or not isinstance(max_rotations, int) or max_rotations < 0:
        raise ValueError(f"max_rotations: expected an int >= 0, got {max_rotations!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate: expected one of {ESTIMATES}, got {estimate!r}")


def accuracy_guard(accuracy: float, majority: float, min_gain: float) -> str | None:
    """The first-rotation guard: None when a rotation may happen, else why not.

    A class query that has learned nothing has no preference worth correcting: rotating it (the paper
    assumes trained encoders, Sec. 3.3) moves it by a large angle in an arbitrary direction. A rotation
    is allowed only after an epoch whose training accuracy ``accuracy`` exceeds ``majority`` (the share
    of the most frequent class among that epoch's training labels: the accuracy of a model that learned
    only the class priors) by at least ``min_gain``. ``min_gain < 0`` switches the guard off.
    """
    for name, value in (("accuracy", accuracy), ("majority", majority), ("min_gain", min_gain)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if min_gain < 0 or accuracy >= majority + min_gain:
        return None
    return (f"training accuracy {accuracy:.3f} is below the majority-class share {majority:.3f} + "
            f"min_accuracy_gain {min_gain:.3f}: the model has not learned enough to rotate its class query")


def _as_named_layers(
    modules: FusedRollingQAttention | Iterable[FusedRollingQAttention] | Mapping[str, FusedRollingQAttention],
) -> dict[str, FusedRollingQAttention]:
    expected = "a FusedRollingQAttention, a sequence of them or a {name: layer} mapping"
    if isinstance(modules, FusedRollingQAttention):
        named = {"0": modules}
    elif isinstance(modules, Mapping):
        named = {str(k): v for k, v in modules.items()}
    elif isinstance(modules, torch.nn.Module) and not isinstance(modules, (torch.nn.ModuleList, torch.nn.Sequential)):
        found = [name for name, m in modules.named_modules() if isinstance(m, FusedRollingQAttention)]
        hint = (f"; it holds FusedRollingQAttention layers ({', '.join(found[:3])}{', …' if len(found) > 3 else ''}): "
                "pass them, e.g. {name: m for name, m in model.named_modules() if isinstance(m, "
                "FusedRollingQAttention)}") if found else ""
        raise TypeError(f"modules: expected {expected}, got a {type(modules).__name__}{hint}")
    elif isinstance(modules, Iterable) and not isinstance(modules, (str, bytes, torch.Tensor)):
        named = {str(i): m for i, m in enumerate(modules)}
    else:
        raise TypeError(f"modules: expected {expected}, got {type(modules).__name__}")
    if not named:
        raise ValueError("modules: expected at least one FusedRollingQAttention, got none")
    for name, m in named.items():
        if not isinstance(m, FusedRollingQAttention):
            raise TypeError(f"modules: expected FusedRollingQAttention layers, got {type(m).__name__} for {name!r}")
    return named


def _check_window_state(name: str, layer: FusedRollingQAttention, state: Any) -> None:
    """The saved window of ``layer`` has its sums' fields and shapes (a model of another size fails here)."""
    if not isinstance(state, Mapping) or not {"total", "batches"} <= set(state):
        raise ValueError(f"state['statistics'][{name!r}]: expected a StatisticsAccumulator.state_dict(), "
                         f"got {type(state).__name__}")
    expected = {k: tuple(v.shape) for k, v in layer.zero_sums().items()}
    saved = ([] if state["total"] is None else [state["total"]]) + list(state["batches"])
    for sums in saved:
        got = {k: tuple(v.shape) for k, v in sums.items()} if isinstance(sums, Mapping) else None
        if got != expected:
            where = (f"layer {name!r} (num_heads={layer.num_heads}, num_modalities={layer.num_modalities}, "
                     f"head_dim={layer.head_dim})")
            if got is None or got.keys() != expected.keys():
                missing, extra = sorted(expected.keys() - (got or {}).keys()), sorted((got or {}).keys() - expected)
                detail = (f"missing {missing}" + (f", unexpected {extra}" if extra else "")) if got else \
                    f"got {type(sums).__name__}"
                raise ValueError(f"state['statistics'][{name!r}]: expected the sums {sorted(expected)} of {where}; "
                                 f"{detail} (a state written by another version of rollingq_kernels?)")
            field = next(k for k in expected if got[k] != expected[k])
            raise ValueError(f"state['statistics'][{name!r}]: saved for another layer size: {field} has shape "
                             f"{got[field]}, {where} expects {expected[field]}")


def _float_list(t: torch.Tensor) -> list:
    return t.detach().cpu().double().tolist()


def _fmt(t: torch.Tensor, fmt: str = "{:.3f}") -> str:
    return "[" + ", ".join(fmt.format(v) for v in _float_list(t)) + "]"


class RollingQ:
    """The RollingQ controller of a set of :class:`FusedRollingQAttention` layers.

    Args:
        modules: a layer, a sequence of layers or a ``{name: layer}`` mapping.
            With progressive multi-layer training (paper App. B) register the
            current last fusion layer and :meth:`retarget` when the next one
            is switched on.
        rho: ρ > 0, the rotation intensity (Eq. 11).
        beta: β ≥ 0, the AIR threshold: rotate when ``|AIR| ≥ beta``.
        max_rotations: the most rotations per layer (paper: 1 or 3).
        window: the statistics window, ``"epoch"`` or the last ``K`` batches;
            it replaces the layers' own setting.
        method: ``"plane"`` (minimal rotation) or ``"svd"`` (paper Eq. 12).
        estimate: ``"accumulate"`` or ``"pass"`` (see the module docstring).
        indicator: ``"cos"`` (the paper's AIR) or ``"score"`` (Eq. 3 weighted, see the module docstring).
    """

    def __init__(
        self,
        modules: FusedRollingQAttention | Iterable[FusedRollingQAttention] | Mapping[str, FusedRollingQAttention],
        rho: float = 1.0,
        beta: float = 0.1,
        max_rotations: int = 1,
        window: Window = "epoch",
        method: str = "plane",
        estimate: str = "accumulate",
        indicator: str = "cos",
    ) -> None:
        _check_settings(rho, beta, max_rotations, method, estimate)
        self.indicator = check_indicator(indicator)
        self.rho = float(rho)
        self.beta = float(beta)
        self.max_rotations = max_rotations
        self.window = check_window(window)
        self.method = method
        self.estimate = estimate
        self.records: list[RotationRecord] = []
        self.layers: dict[str, FusedRollingQAttention] = {}
        self.retarget(modules)

    # ------------------------------------------------------------------ registration
    def retarget(
        self,
        modules: FusedRollingQAttention | Iterable[FusedRollingQAttention] | Mapping[str, FusedRollingQAttention],
    ) -> None:
        """Control ``modules`` from now on (e.g. the new last fusion layer).

        Each layer gets the controller's window (its open window is kept when
        the setting is unchanged); its rotation and rotation count are kept (each layer has its own
        budget of ``max_rotations``). Past records are kept.
        """
        self.layers = _as_named_layers(modules)
        for layer in self.layers.values():
            layer.set_window(self.window)

    def reset_statistics(self) -> None:
        """Start a fresh statistics window in every controlled layer."""
        for layer in self.layers.values():
            layer.reset_statistics()

    # ------------------------------------------------------------------ the decision
    def _decide(self, name: str, layer: FusedRollingQAttention, st: WindowStatistics | None,
                epoch: int | None) -> RotationRecord:
        M = layer.num_modalities
        if st is None:
            rec = RotationRecord(name, epoch, math.nan, math.nan, [math.nan] * M)
        else:
            rec = RotationRecord(name, epoch, st.air, st.spread, _float_list(st.cos_mean),
                                 mass=_float_list(st.mass_mean.mean(0)), count=st.samples)
        rec.num_rotations = int(layer.num_rotations)
        rec.indicator = self.indicator
        quantity = math.nan if st is None else imbalance(st)
        if st is not None and not any(math.isnan(c) for c in rec.cos_mean):
            quantity = self._check_indicator(name, st, rec, quantity)
        rec.value = quantity
        if st is None or not math.isfinite(quantity) or any(math.isnan(c) for c in rec.cos_mean):
            rec.reason = "no_samples"
            logger.warning("RollingQ: layer %s: no usable statistics (AIR=%s, count=%d); not rotating",
                           name, rec.air, rec.count)
        elif abs(quantity) < self.beta:
            rec.reason = "below_threshold"
        elif rec.num_rotations >= self.max_rotations:
            rec.reason = "max_rotations"
        else:
            rec.reason = "due"
        return rec

    def _check_indicator(self, name: str, st: WindowStatistics, rec: RotationRecord, air: float) -> float:
        """The decision quantity of ``self.indicator``; fills ``rec.tokens``/``key_norm`` and checks it against
        the attention mass (``air``: the paper's quantity, AIR for two modalities, the spread for more)."""
        key_norm = st.global_key_mean().norm(dim=-1)  # (M,)
        rec.tokens = _float_list(st.tokens_mean)
        rec.key_norm = _float_list(key_norm)
        values = indicator_cosines(st.cos_mean, key_norm, st.tokens_mean, self.indicator)
        # "cos" keeps the paper's AIR exactly (E[cos_0 − cos_1] over samples with both modalities)
        quantity = air if self.indicator == "cos" else indicator_value(values)
        mass = st.mass_mean.mean(0)[1:]  # (M,), heads averaged, class token excluded
        if mass_disagreement(values, mass):
            rec.assumption_warning = True
            logger.warning(
                "RollingQ: layer %s: the indicator %r (%.3f; AIR %.3f) and the attention mass %s favour different "
                "modalities: token counts %s, mean-key norms %s, mean cosines %s. The paper's AIR assumes equal "
                "token counts and key norms (Sec. 3.3); a rotation would move the query towards the modality that "
                "already has the attention", name, self.indicator, quantity, air, _fmt(mass),
                _fmt(st.tokens_mean, "{:.1f}"), _fmt(key_norm), _fmt(st.cos_mean))
        return quantity

    def _rebalancing_rotation(self, layer: FusedRollingQAttention, st: WindowStatistics, rec: RotationRecord,
                              keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor | None:
        """R_b for one layer, or None (``rec`` explains why) when degenerate."""
        if layer.rotation_mode == "global":
            mean_keys, mean_query, cos_means = keys, query, st.cos_mean  # (M, C), (C,), (M,)
            window_norm = st.global_key_mean().norm(dim=-1)
        else:
            mean_keys, mean_query, cos_means = keys, query, st.cos_head_mean  # (H, M, Dh), (H, Dh), (H, M)
            window_norm = st.key_mean.norm(dim=-1)
        if self.indicator != "cos":
            cos_means = indicator_cosines(cos_means, window_norm, st.tokens_mean, self.indicator)
        q_norm = mean_query.norm(dim=-1)
        k_norm = mean_keys.norm(dim=-1)
        if bool((q_norm <= EPS).any()) or bool((k_norm <= EPS).any()) or not bool(torch.isfinite(cos_means).all()):
            rec.reason = "degenerate"
            logger.warning("RollingQ: layer %s: zero-norm mean query or mean key (|E[q]|=%s); not rotating",
                           rec.layer, _float_list(q_norm))
            return None
        anchor, alpha = balanced_anchor(mean_keys, mean_query, cos_means, self.rho)
        build = plane_rotation if self.method == "plane" else svd_rotation
        r_b = build(mean_query.double(), anchor)
        if not bool(torch.isfinite(r_b).all()):
            rec.reason = "degenerate"
            logger.warning("RollingQ: layer %s: the rotation is not finite; not rotating", rec.layer)
            return None
        moved = (r_b @ mean_query.double().unsqueeze(-1)).squeeze(-1)
        cos_ba = (moved * mean_query.double()).sum(-1) / (moved.norm(dim=-1) * mean_query.double().norm(dim=-1))
        rec.alpha = _float_list(alpha)
        rec.angle_deg = float(rotation_angle_degrees(mean_query, anchor).mean())
        rec.cos_before_after = float(cos_ba.mean())
        return r_b

    def _anchor_inputs(self, layer: FusedRollingQAttention, st: WindowStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.rotation_mode == "global":
            return st.global_key_mean(), st.global_query_mean()
        return st.key_mean, st.query_mean

    def _estimation_pass(self, names: list[str], loader: Iterable, forward_fn: Callable[[Any], Any]
                         ) -> dict[str, WindowStatistics | None]:
        accumulators = {name: StatisticsAccumulator("epoch") for name in names}
        with torch.no_grad(), ExitStack() as stack:
            for name, acc in accumulators.items():
                stack.enter_context(self.layers[name].collecting(acc, window=False))
            for batch in loader:
                forward_fn(batch)
        return {name: synced_statistics(acc.sums(), self.layers[name].zero_sums) for name, acc in accumulators.items()}

    def step(self, epoch: int | None = None, loader: Iterable | None = None,
             forward_fn: Callable[[Any], Any] | None = None) -> list[RotationRecord]:
        """Decide and apply the rotations at the end of an epoch.

        Args:
            epoch: recorded in the records.
            loader, forward_fn: required with ``estimate="pass"``: the batches
                of the estimation pass and a callable running the model on one.

        Returns:
            One :class:`RotationRecord` per controlled layer (also appended to
            :attr:`records`). Windows are reset after the step when
            ``window="epoch"`` and after every rotation.
        """
        if self.estimate == "pass" and (loader is None or forward_fn is None):
            raise ValueError(
                f"loader, forward_fn: estimate='pass' needs both, got loader={type(loader).__name__}, "
                f"forward_fn={type(forward_fn).__name__}"
            )
        stats = {name: synced_statistics(layer.statistics.sums(), layer.zero_sums)
                 for name, layer in self.layers.items()}
        records = {name: self._decide(name, layer, stats[name], epoch) for name, layer in self.layers.items()}
        due = [name for name, rec in records.items() if rec.reason == "due"]
        anchor_stats: dict[str, WindowStatistics | None] = {name: stats[name] for name in due}
        if due and self.estimate == "pass":
            anchor_stats = self._estimation_pass(due, loader, forward_fn)
        for name in due:
            layer, rec, st = self.layers[name], records[name], anchor_stats[name]
            if st is None:
                rec.reason = "no_samples"
                logger.warning("RollingQ: layer %s: the estimation pass saw no sample; not rotating", name)
                continue
            keys, query = self._anchor_inputs(layer, st)
            r_b = self._rebalancing_rotation(layer, stats[name], rec, keys, query)
            if r_b is None:
                continue
            layer.apply_rotation(r_b)
            rec.rotated, rec.reason, rec.num_rotations = True, "rotated", int(layer.num_rotations)
            logger.info("RollingQ: layer %s rotated (epoch %s, AIR %.4f, angle %.2f deg, rotation %d)",
                        name, epoch, rec.air, rec.angle_deg, rec.num_rotations)
        for name, layer in self.layers.items():
            if self.window == "epoch" or records[name].rotated:
                layer.reset_statistics()
        out = list(records.values())
        self.records.extend(out)
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The controller's state: settings, records and the layers' open windows.

        The rotations and rotation counts live in the layers' buffers (the
        model's ``state_dict``); both are needed to resume.
        """
        return {
            "rho": self.rho,
            "beta": self.beta,
            "max_rotations": self.max_rotations,
            "window": self.window,
            "method": self.method,
            "estimate": self.estimate,
            "indicator": self.indicator,
            "records": [r.to_dict() for r in self.records],
            "layers": list(self.layers),
            "num_rotations": {n: int(layer.num_rotations) for n, layer in self.layers.items()},
            "statistics": {n: layer.statistics.state_dict() for n, layer in self.layers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], settings: bool = True) -> None:
        """Restore :meth:`state_dict`: records, open windows and, with ``settings``, the settings.

        With ``settings=False`` this controller keeps its own settings (those it was built with,
        e.g. from an edited config) and logs each one that differs from the saved state. Either way
        every layer ends up with the controller's window setting: a layer whose saved window setting
        differs from it (the controller's, or one set on the layer by hand) starts its window empty.
        """
        for key in ("rho", "beta", "max_rotations", "window", "method", "estimate", "records", "statistics"):
            if key not in state:
                raise ValueError(f"state: missing key {key!r}; expected a RollingQ.state_dict()")
        if sorted(state["statistics"]) != sorted(self.layers):
            raise ValueError(f"state: saved for layers {sorted(state['statistics'])}, "
                             f"but this controller has {sorted(self.layers)}")
        _check_settings(state["rho"], state["beta"], state["max_rotations"], state["method"], state["estimate"])
        saved_settings = {
            "rho": float(state["rho"]), "beta": float(state["beta"]), "max_rotations": int(state["max_rotations"]),
            "window": check_window(state["window"]), "method": state["method"], "estimate": state["estimate"],
            "indicator": check_indicator(state.get("indicator", "cos")),  # states saved before the setting: AIR
        }
        for name, layer in self.layers.items():  # every check before anything changes
            _check_window_state(name, layer, state["statistics"][name])
        if settings:
            for key, value in saved_settings.items():
                setattr(self, key, value)
        else:
            for key, value in saved_settings.items():
                if getattr(self, key) != value:
                    logger.warning("RollingQ: keeping %s=%r; the loaded state was saved with %r",
                                   key, getattr(self, key), value)
        self.records = [RotationRecord(**r) for r in state["records"]]
        for name, layer in self.layers.items():
            layer.statistics.load_state_dict(state["statistics"][name], device=layer.rotation.device)
            layer.set_window(self.window)  # a changed setting starts the window empty
            saved = state.get("num_rotations", {}).get(name)
            if saved is not None and saved != int(layer.num_rotations):
                logger.warning("RollingQ: layer %s has %d rotations but the controller state says %d; "
                               "load the model's state_dict saved with it", name, int(layer.num_rotations), saved)

