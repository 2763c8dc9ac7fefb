"""The RollingQ controller: the paper's Algorithm 1 at the end of each epoch, made safe.

:class:`RollingQ` reads the statistics that its
:class:`~rollingq_kernels.module.FusedRollingQAttention` layers gathered during training and, when
the attention imbalance is large, rotates their class query towards the balanced anchor (Ni et al.,
ICML 2025, Sec. 3.3, App. B). Every rule lives in :mod:`rollingq_kernels.policy` and every setting
in :class:`~rollingq_kernels.settings.RollingQSettings`; ``docs/controller.md`` describes both.

1. AIR = E[cos(q, k̄_0) − cos(q, k̄_1)] (Eq. 9); for ``M > 2`` the spread ``max − min`` of the mean
   cosines (:func:`~rollingq_kernels.accumulator.imbalance`); ``indicator="score"`` weights them by
   Eq. 3 (:mod:`rollingq_kernels.indicators`).
2. If it is due (start epoch, first-rotation guard, β, ``max_rotations``): α = softmax(−2ρ·E[cos])
   (for ``M = 2`` exactly ½(1 + tanh(−ρ·AIR)), Eq. 11), the anchor Σ α_m E[k̄_m]/|E[k̄_m]| rescaled
   to |E[q]| (Eq. 10), R_b from E[q] towards it (``method="plane"``: the minimal rotation; ``"svd"``:
   Eq. 12), ``R ← R_b @ R``.
3. The safety rule (``safety=True``, the default) refuses a rotation that would reverse what the
   query attends to: the query's cosines with all mean keys are negative, the anchor is more than
   ``anchor_limit_deg`` (90°) from E[q], the indicator and the attention mass favour different
   modalities, or, on a probe batch, the class row's attention ranks within each modality before vs
   after correlate below ``min_rank_correlation`` (0). The angle is capped at ``max_angle_deg``, and a rotation
   after which the training loss or accuracy collapses over the next epoch is rolled back.
4. ``direction="random"``: the same decisions and angle, in a random direction (a control).

Every step returns one :class:`~rollingq_kernels.decision.RotationRecord` per layer with an
``action`` (rotate / cap / refuse / wait / rollback) and its ``reason``.

Estimates: ``estimate="accumulate"`` reads the training window (``window=1``: the last batch);
``"pass"`` the anchor's mean keys and query from a no-grad pass (:mod:`rollingq_kernels.estimation`).

Under ``torch.distributed`` the window sums are all-reduced before any decision, so every rank
computes the identical rotation; every rank must call :meth:`RollingQ.step`.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .accumulator import WindowStatistics, imbalance, synced_statistics
from .decision import RotationRecord
from .estimation import estimation_pass, mean_over_ranks, probe_inputs
from .indicators import indicator_cosines, indicator_value, mass_disagreement
from .layers import as_named_layers, check_window_state
from .module import FusedRollingQAttention
from .policy import EpochResult, RotationPolicy, accuracy_guard
from .probe import ProbeInputs, compare
from .rebalance import (
    EPS,
    balance_weights,
    build_rotation,
    capped_target,
    random_target,
    rescaled_anchor,
    rotation_angle_degrees,
)
from .settings import ESTIMATES, METHODS, RollingQSettings, field_names

__all__ = ["ESTIMATES", "METHODS", "RollingQ", "RotationRecord", "accuracy_guard"]

logger = logging.getLogger("rollingq_kernels")

Layers = FusedRollingQAttention | Iterable[FusedRollingQAttention] | Mapping[str, FusedRollingQAttention]


def _floats(t: torch.Tensor) -> list:
    return t.detach().cpu().double().tolist()


def _fmt(t: torch.Tensor, fmt: str = "{:.3f}") -> str:
    return "[" + ", ".join(fmt.format(v) for v in _floats(t)) + "]"


def _cosines(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(query (..., D), keys (..., M, D)) -> (..., M), float64."""
    return torch.nn.functional.cosine_similarity(query.double().unsqueeze(-2), keys.double(), dim=-1)


class RollingQ:
    """The RollingQ controller of a set of :class:`FusedRollingQAttention` layers.

    Args:
        modules: a layer, a sequence of layers or a ``{name: layer}`` mapping. With progressive
            multi-layer training (paper App. B) register the current last fusion layer and
            :meth:`retarget` when the next one is switched on.
        settings: a :class:`RollingQSettings`; or build one from ``mode`` (a preset: ``"safe"``, the
            default, ``"paper"``, ``"official"``) and ``overrides`` (its fields, e.g. ``beta=0.0``).
        seed: seeds the random direction of ``direction="random"`` (with the layer's name and rotation
            count: deterministic, also across a resume).
    """

    def __init__(self, modules: Layers, *, settings: RollingQSettings | None = None, mode: str | None = None,
                 seed: int = 0, **overrides: Any) -> None:
        if settings is None:
            settings = RollingQSettings.preset(mode or "safe", **overrides)
        elif mode is not None or overrides:
            raise TypeError("settings: give either settings=... or mode/overrides, not both")
        self.settings = settings
        self.policy = RotationPolicy(settings)
        self.seed = int(seed)
        self.records: list[RotationRecord] = []
        self.pending: dict[str, dict[str, Any]] = {}  # the last rotation of each layer, until checked
        self.rollbacks: dict[str, int] = {}
        self.layers: dict[str, FusedRollingQAttention] = {}
        self.retarget(modules)

    def __getattr__(self, name: str) -> Any:  # ctl.beta, ctl.window, …: the settings' fields
        if name in field_names() and "settings" in self.__dict__:
            return getattr(self.__dict__["settings"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ registration
    def retarget(self, modules: Layers) -> None:
        """Control ``modules`` from now on (e.g. the new last fusion layer).

        Each layer gets the controller's window (its open window is kept when the setting is
        unchanged); its rotation and rotation count are kept (each layer has its own budget of
        ``max_rotations``). Past records are kept.
        """
        self.layers = as_named_layers(modules)
        for layer in self.layers.values():
            layer.set_window(self.settings.window)

    def reset_statistics(self) -> None:
        """Start a fresh statistics window in every controlled layer."""
        for layer in self.layers.values():
            layer.reset_statistics()

    # ------------------------------------------------------------------ the decision
    def _record(self, name: str, layer: FusedRollingQAttention, st: WindowStatistics | None,
                epoch: int | None, warn: bool = True) -> RotationRecord:
        """The record of what the statistics say; ``value`` is the indicator's decision quantity."""
        M = layer.num_modalities
        if st is None:
            rec = RotationRecord(name, epoch, math.nan, math.nan, [math.nan] * M)
        else:
            rec = RotationRecord(name, epoch, st.air, st.spread, _floats(st.cos_mean),
                                 mass=_floats(st.mass_mean.mean(0)), count=st.samples)
        rec.num_rotations, rec.indicator = int(layer.num_rotations), self.settings.indicator
        rec.direction = self.settings.direction
        rec.value = math.nan if st is None else imbalance(st)
        if st is not None and not any(math.isnan(c) for c in rec.cos_mean):
            rec.value = self._check_indicator(name, st, rec, rec.value, warn)
        return rec

    def _check_indicator(self, name: str, st: WindowStatistics, rec: RotationRecord, air: float,
                         warn: bool) -> float:
        """The decision quantity of the indicator; fills ``tokens``/``key_norm`` and compares it with the mass."""
        key_norm = st.global_key_mean().norm(dim=-1)  # (M,)
        rec.tokens, rec.key_norm = _floats(st.tokens_mean), _floats(key_norm)
        values = indicator_cosines(st.cos_mean, key_norm, st.tokens_mean, self.settings.indicator)
        quantity = air if self.settings.indicator == "cos" else indicator_value(values)
        mass = st.mass_mean.mean(0)[1:]  # (M,), heads averaged, class token excluded
        rec.assumption_warning = mass_disagreement(values, mass, self.settings.mass_margin)
        if rec.assumption_warning and warn:
            logger.warning(
                "RollingQ: layer %s: the indicator %r (%.3f; AIR %.3f) and the attention mass %s favour different "
                "modalities: token counts %s, mean-key norms %s, mean cosines %s. The paper's AIR assumes equal "
                "token counts and key norms (Sec. 3.3); a rotation would move the query towards the modality that "
                "already has the attention", name, self.settings.indicator, quantity, air, _fmt(mass),
                _fmt(st.tokens_mean, "{:.1f}"), _fmt(key_norm), _fmt(st.cos_mean))
        return quantity

    def _candidate(self, name: str, layer: FusedRollingQAttention, window: WindowStatistics, st: WindowStatistics,
                   rec: RotationRecord) -> dict[str, torch.Tensor] | None:
        """The rotation this layer would get (anchor and applied), or None when ``rec`` says why not."""
        per_head = layer.rotation_mode != "global"
        keys, query = (st.key_mean, st.query_mean) if per_head else (st.global_key_mean(), st.global_query_mean())
        cos_means = window.cos_head_mean if per_head else window.cos_mean
        if self.settings.indicator != "cos":
            norm = (window.key_mean if per_head else window.global_key_mean()).norm(dim=-1)
            cos_means = indicator_cosines(cos_means, norm, window.tokens_mean, self.settings.indicator)
        if bool((query.norm(dim=-1) <= EPS).any()) or bool((keys.norm(dim=-1) <= EPS).any()) \
                or not bool(torch.isfinite(cos_means).all()):
            logger.warning("RollingQ: layer %s: zero-norm mean query or mean key (|E[q]|=%s); not rotating",
                           name, _floats(query.norm(dim=-1)))
            rec.decide("degenerate", "zero-norm mean query or mean key")
            return None
        alpha = balance_weights(cos_means, self.settings.rho)
        dtype = self.settings.rotation_dtype(layer.rotation.dtype if layer.qkv is None else layer.qkv.weight.dtype)
        anchor = rescaled_anchor(keys, query, alpha, dtype)
        x = query.to(dtype)
        angle = rotation_angle_degrees(x, anchor).reshape(-1)
        unit_cos = _cosines(query, keys).reshape(-1, layer.num_modalities)
        rec.alpha, rec.angle_deg = _floats(alpha), float(angle.mean())
        rec.cos_query_keys = _floats(_cosines(st.global_query_mean(), st.global_key_mean()))
        verdict = self.policy.screen(unit_cos.tolist(), angle.tolist(), rec.assumption_warning)
        if verdict is not None:
            rec.decide(*verdict)
            return None
        target, applied = capped_target(x, anchor, self.settings.max_angle_deg)
        if self.settings.max_angle_deg >= float(angle.max()):
            target = anchor  # uncapped: exactly the anchor the official code hands to its SVD
        build = lambda x, y: build_rotation(self.settings.method, x, y, dtype)  # noqa: E731
        out = {"x": x, "anchor": build(x, target)}
        if self.settings.direction == "random":
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + int(layer.num_rotations)) % 2**63)
            out["applied"] = build(x, random_target(x, applied, gen))
        else:
            out["applied"] = out["anchor"]
        if not all(bool(torch.isfinite(r).all()) for r in (out["anchor"], out["applied"])):
            logger.warning("RollingQ: layer %s: the rotation is not finite; not rotating", name)
            rec.decide("degenerate", "the rotation is not finite")
            return None
        rec.applied_angle_deg = float(applied.mean())
        rec.decide(*(self.policy.cap(float(angle.max())) or ("rotated", "")))
        return out

    def _probe(self, layer: FusedRollingQAttention, inputs: ProbeInputs | None, candidate: dict[str, torch.Tensor],
               rec: RotationRecord) -> None:
        """Fill the probe's numbers; the safety rule may refuse the rotation (``rec`` says so). The decisive
        number is averaged over ranks (every rank calls this for the same layers), so all ranks decide alike."""
        local = math.nan
        if inputs is not None:
            old = layer.rotation.detach().double()
            compose = lambda r: r.double().to(old.device) @ old  # noqa: E731
            k = self.settings.probe_top_k
            applied = compare(layer, inputs, old, compose(candidate["applied"]), k)
            toward_anchor = applied if candidate["applied"] is candidate["anchor"] else \
                compare(layer, inputs, old, compose(candidate["anchor"]), k)
            finite = lambda v: v if math.isfinite(v) else None  # noqa: E731
            rec.probe_samples, rec.rank_correlation = applied.samples, finite(applied.rank_correlation)
            rec.logit_spread, rec.max_prob, rec.topk_share = applied.logit_spread, applied.max_prob, applied.topk_share
            rec.probe_mass, rec.within_rank_correlation = applied.mass, finite(applied.within_rank_correlation)
            local = toward_anchor.within_rank_correlation
        decisive = mean_over_ranks(local, layer.rotation.device)
        rec.anchor_within_rank_correlation = decisive if math.isfinite(decisive) else None
        verdict = self.policy.reverses(decisive)
        if verdict is not None:
            rec.decide(*verdict)

    def _apply(self, name: str, layer: FusedRollingQAttention, rotation: torch.Tensor, rec: RotationRecord,
               x: torch.Tensor, done: EpochResult) -> None:
        self.pending[name] = {"epoch": done.epoch, "loss": done.loss, "accuracy": done.accuracy,
                              "rotation": layer.rotation.detach().clone(), "num_rotations": int(layer.num_rotations)}
        layer.apply_rotation(rotation.to(torch.float64))
        x = x.double()
        moved = rotation.double() @ x.unsqueeze(-1)
        rec.cos_before_after = float(torch.nn.functional.cosine_similarity(moved.squeeze(-1), x, dim=-1).mean())
        rec.rotated, rec.num_rotations = True, int(layer.num_rotations)
        logger.info("RollingQ: layer %s rotated (epoch %s, AIR %.4f, angle %.2f deg of %.2f proposed, %s, rotation %d)",
                    name, rec.epoch, rec.air, rec.applied_angle_deg, rec.angle_deg, rec.direction, rec.num_rotations)

    def _rollback(self, name: str, layer: FusedRollingQAttention, done: EpochResult,
                  st: WindowStatistics | None) -> RotationRecord | None:
        """Check the last rotation of ``name`` against this epoch's result; undo it on a collapse."""
        saved = self.pending.pop(name, None)
        if saved is None:
            return None
        before = EpochResult(saved["epoch"], saved["loss"], saved["accuracy"])
        verdict = self.policy.rollback(before, done)
        if verdict is None:
            return None
        layer.restore_rotation(saved["rotation"].to(layer.rotation.device), saved["num_rotations"])
        self.rollbacks[name] = self.rollbacks.get(name, 0) + 1
        rec = self._record(name, layer, st, done.epoch).decide(*verdict)
        rec.rolled_back_epoch, rec.num_rotations = saved["epoch"], int(layer.num_rotations)
        logger.warning("RollingQ: layer %s: %s", name, rec.detail)
        return rec

    def _rotate(self, due: list[str], stats: dict[str, WindowStatistics | None], records: dict[str, RotationRecord],
                loader: Iterable | None, forward_fn: Callable[[Any], Any] | None, done: EpochResult) -> None:
        """The layers whose rotation is due: anchor, safety rule, cap, probe, and the rotation applied."""
        s = self.settings
        anchor_stats = dict(stats)
        if due and s.estimate == "pass":
            anchor_stats.update(estimation_pass({n: self.layers[n] for n in due}, loader, forward_fn, s.pass_mean))
        candidates = {}
        for name in due:
            if anchor_stats[name] is None:
                logger.warning("RollingQ: layer %s: the estimation pass saw no sample; not rotating", name)
                records[name].decide("no_samples", "the estimation pass saw no sample")
                continue
            found = self._candidate(name, self.layers[name], stats[name], anchor_stats[name], records[name])
            if found is not None:
                candidates[name] = found
        inputs = {}
        if candidates and loader is not None and forward_fn is not None and s.probe_batches:
            # the probe rebuilds q and k from the layer's own qkv projection (integrations may have none)
            projecting = {n: self.layers[n] for n in candidates if self.layers[n].qkv is not None}
            inputs = probe_inputs(projecting, loader, forward_fn, s.probe_batches) if projecting else {}
        for name, candidate in candidates.items():
            layer, rec = self.layers[name], records[name]
            self._probe(layer, inputs.get(name), candidate, rec)
            if rec.action in ("rotate", "cap"):
                self._apply(name, layer, candidate["applied"], rec, candidate["x"], done)

    def step(self, epoch: int | None = None, loader: Iterable | None = None,
             forward_fn: Callable[[Any], Any] | None = None, *, accuracy: float | None = None,
             majority: float | None = None, loss: float | None = None) -> list[RotationRecord]:
        """Decide, apply and record at the end of an epoch.

        Args:
            epoch: the epoch just trained (checked against ``start_epoch``; recorded).
            loader, forward_fn: the training batches and a callable running the model on one: the
                estimation pass (required with ``estimate="pass"``) and the attention probe read them
                (without them there is no probe). Run the model in eval mode for them.
            accuracy, majority: the epoch's training accuracy and majority-class share (the
                first-rotation guard; without them it is not applied).
            loss: the epoch's training loss (with ``accuracy``: the rollback rule).

        Returns:
            One :class:`RotationRecord` per controlled layer (also appended to :attr:`records`).
            Windows are reset after the step when ``window="epoch"``, after a wait at the gate, and
            after every rotation or rollback.
        """
        s = self.settings
        if s.estimate == "pass" and (loader is None or forward_fn is None):
            raise ValueError(f"loader, forward_fn: estimate='pass' needs both, got loader={type(loader).__name__}, "
                             f"forward_fn={type(forward_fn).__name__}")
        done = EpochResult(epoch, loss, accuracy)
        stats = {n: synced_statistics(layer.statistics.sums(), layer.zero_sums) for n, layer in self.layers.items()}
        records: dict[str, RotationRecord] = {}
        for name, layer in self.layers.items():
            rolled = self._rollback(name, layer, done, stats[name])
            if rolled is not None:
                records[name] = rolled
        gate = self.policy.gate(epoch, accuracy, majority)
        for name, layer in self.layers.items():
            if name in records:
                continue
            rec = records[name] = self._record(name, layer, stats[name], epoch, warn=gate is None)
            verdict = gate or self.policy.threshold(rec.value, int(layer.num_rotations), self.rollbacks.get(name, 0))
            if verdict is not None:
                rec.decide(*verdict)
                if verdict[0] == "no_samples":
                    logger.warning("RollingQ: layer %s: no usable statistics (AIR=%s, count=%d); not rotating",
                                   name, rec.air, rec.count)
        self._rotate([n for n, r in records.items() if not r.reason], stats, records, loader, forward_fn, done)
        for name, layer in self.layers.items():
            if s.window == "epoch" or gate is not None or records[name].rotated or records[name].action == "rollback":
                layer.reset_statistics()
        for rec in records.values():
            if rec.action == "refuse" and rec.reason != "degenerate":
                logger.info("RollingQ: layer %s: rotation refused (%s): %s", rec.layer, rec.reason, rec.detail)
        out = list(records.values())
        self.records.extend(out)
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The controller's state: settings, records, pending rollback checks and the layers' open windows.

        The rotations and rotation counts live in the layers' buffers (the model's ``state_dict``);
        both are needed to resume.
        """
        return {
            **self.settings.to_dict(),
            "seed": self.seed,
            "records": [r.to_dict() for r in self.records],
            "layers": list(self.layers),
            "num_rotations": {n: int(layer.num_rotations) for n, layer in self.layers.items()},
            "statistics": {n: layer.statistics.state_dict() for n, layer in self.layers.items()},
            "pending": {n: {**p, "rotation": p["rotation"].cpu()} for n, p in self.pending.items()},
            "rollbacks": dict(self.rollbacks),
        }

    def load_state_dict(self, state: Mapping[str, Any], settings: bool = True) -> None:
        """Restore :meth:`state_dict`: records, pending checks, open windows and, with ``settings``, the settings.

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
        saved = RollingQSettings.from_state(state)
        records = [RotationRecord.from_dict(r) for r in state["records"]]
        for name, layer in self.layers.items():  # every check before anything changes
            check_window_state(name, layer, state["statistics"][name])
        if settings:
            self.settings, self.policy = saved, RotationPolicy(saved)
        else:
            for key, value in saved.to_dict().items():
                if getattr(self.settings, key) != value:
                    logger.warning("RollingQ: keeping %s=%r; the loaded state was saved with %r",
                                   key, getattr(self.settings, key), value)
        self.seed = int(state.get("seed", self.seed))
        self.records = records
        self.rollbacks = {str(k): int(v) for k, v in state.get("rollbacks", {}).items()}
        self.pending = {n: {**p, "rotation": p["rotation"].to(self.layers[n].rotation.device)}
                        for n, p in state.get("pending", {}).items() if n in self.layers}
        for name, layer in self.layers.items():
            layer.statistics.load_state_dict(state["statistics"][name], device=layer.rotation.device)
            layer.set_window(self.settings.window)  # a changed setting starts the window empty
            count = state.get("num_rotations", {}).get(name)
            if count is not None and count != int(layer.num_rotations):
                logger.warning("RollingQ: layer %s has %d rotations but the controller state says %d; "
                               "load the model's state_dict saved with it", name, int(layer.num_rotations), count)
