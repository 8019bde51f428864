"""Score a batch of completions with several weighted reward functions.

:meth:`RewardSet.score` calls every function once per batch and checks what it returns (one
finite float or None per completion). The total is the weighted sum over the functions that
scored a completion (a None is left out of the sum, not counted as 0); a completion that no
function scored is unscorable and its total is NaN, as TRL's GRPOTrainer (1.16) does: the loss
must leave it out of the group baseline and give it no advantage.

A function that *raises* scores none of that call's completions (all None); the failure is
counted in :class:`Scores` and logged (logger ``tscale.rewards``), and when the function raised
on more than ``max_failure_fraction`` of its last ``failure_window`` calls the run stops with a
:class:`~tscale.errors.RewardError` naming it and its last exception. Under data parallelism the
window is each rank's own (the calls on its prompts): ``score(..., raise_over_limit=False)``
reports the crossing in :attr:`Scores.over_limit` instead of raising, the ranks exchange their
reports and every rank raises :func:`failure_limit_error`'s error in the same step (see
:mod:`tscale.tasks.grpo`). A function that returns
the wrong thing (length, type, a non-finite value) or raises a :class:`~tscale.errors.TscaleError`
(a missing column) is a bug, not bad luck: that stops the run at once.

Reward functions must be deterministic (the same arguments give the same floats) for a resumed
run to repeat the uninterrupted one; see :mod:`tscale.rewards.fingerprint`.
"""

from __future__ import annotations

import collections
import difflib
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from tscale.errors import CheckpointError, ConfigError, RewardError, ShapeError, TscaleError
from tscale.rewards.config import RewardConfig, RewardsConfig
from tscale.rewards.model import RewardModelReward, check_model_settings
from tscale.rewards.resolve import (
    CONTRACT_ARGS,
    OPTIONAL_ARGS,
    REWARDS,
    Signature,
    resolve_reward_fn,
    signature_of,
)

__all__ = [
    "FailureLimit",
    "RewardFailure",
    "RewardFn",
    "RewardSet",
    "Scores",
    "build_reward_set",
    "failure_limit_error",
]

logger = logging.getLogger("tscale.rewards")


@attrs.frozen(kw_only=True)
class RewardFn:
    """One resolved reward: its metric name, the function, its weight, the keyword arguments it
    is called with beside the columns, the YAML key it came from (for messages), and its
    identity: for a reward whose behaviour is fixed by what it is (a reward model: its weights),
    the string its resume fingerprint hashes instead of its outputs on a probe (None: the
    outputs)."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    key: str = ""
    signature: Signature | None = None
    identity: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.signature is None:
            object.__setattr__(self, "signature", signature_of(self.fn, self.key or self.name))
        if not math.isfinite(self.weight):
            raise ConfigError(f"{self.key or self.name}: weight must be finite, got {self.weight}")

    @property
    def where(self) -> str:
        """``reward 'name' (task.rewards.functions[0])``: how messages name it."""
        return f"reward {self.name!r}" + (f" ({self.key})" if self.key else "")

    def call(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: Mapping[str, Sequence[Any]],
        prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> Any:
        """The function's raw output for one batch (the columns its signature takes, and
        ``prompt_ids`` when it names them).

        Raises:
            RewardError: a column it needs is missing, or a column has a name its kwargs use.
        """
        sig = self.signature
        assert sig is not None
        passed = {k: v for k, v in columns.items() if sig.any_keyword or k in sig.named}
        clash = sorted(passed.keys() & self.kwargs.keys())
        if clash:
            raise RewardError(
                f"{self.where}: the batch column {clash[0]!r} has the name of one of its kwargs; "
                "rename the column or the setting"
            )
        missing = sorted(sig.required - passed.keys() - self.kwargs.keys())
        if missing:
            have = ", ".join(sorted(columns)) or "none"
            raise RewardError(
                f"{self.where} needs {missing[0]!r}, which is neither a column of the batch "
                f"(its columns: {have}) nor one of its kwargs"
            )
        if sig.takes_prompt_ids:
            passed["prompt_ids"] = prompt_ids
        return self.fn(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            **passed,
            **self.kwargs,
        )


@attrs.frozen
class RewardFailure:
    """A reward call that raised: the function's name, ``ExceptionType: message``, and how many
    completions it left unscored."""

    name: str
    error: str
    completions: int


@attrs.frozen(kw_only=True)
class FailureLimit:
    """A function that raised on more than ``max_failure_fraction`` of its last
    ``failure_window`` calls: how messages name it, the count, the window, the limit and its
    last exception (``ExceptionType: message``). Picklable: ranks exchange it."""

    where: str
    raised: int
    window: int
    max_fraction: float
    last_error: str

    def message(self, rank: int | None = None) -> str:
        """The one-line reason the run stops (``rank``: the rank whose window crossed, named in
        it; None: one process, not named)."""
        on = "" if rank is None else f" on rank {rank}"
        return (
            f"{self.where} raised on {self.raised} of its last {self.window} calls{on}, more "
            f"than max_failure_fraction={self.max_fraction:g} allows; the last: "
            f"{self.last_error}. Fix the function (or raise rewards.max_failure_fraction)"
        )


def failure_limit_error(by_rank: Mapping[int, Sequence[FailureLimit]]) -> RewardError:
    """The error every rank raises when some ranks' windows crossed the limit: the first
    crossing (lowest rank, first function) in full, the others named after it.

    Args:
        by_rank: the crossings of each rank that had any (:attr:`Scores.over_limit`).
    """
    crossings = [(r, c) for r in sorted(by_rank) for c in by_rank[r]]
    if not crossings:
        raise ValueError("failure_limit_error: no crossing given")
    (rank, first), rest = crossings[0], crossings[1:]
    text = first.message(rank)
    if rest:
        also = ", ".join(f"{c.where} on rank {r} ({c.raised} of {c.window})" for r, c in rest)
        text += f"; over the limit too: {also}"
    return RewardError(text)


@attrs.frozen(kw_only=True)
class Scores:
    """The rewards of one batch of ``n`` completions.

    ``per_function`` is ``(n, k)`` float32, NaN where a function gave None (or raised);
    ``total`` is ``(n,)`` float32: the weighted sum over the functions that scored each
    completion, NaN where none did. ``failed[i]``: completions function ``i`` left unscored
    because it raised."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    per_function: torch.Tensor
    total: torch.Tensor
    failed: tuple[int, ...]
    failures: tuple[RewardFailure, ...] = ()
    counts: Mapping[str, float] = attrs.field(factory=dict)
    """What the functions counted in this call, by metric name (``reward/<name>/truncated``:
    a reward model's sequences cut to its positions)."""
    over_limit: tuple[FailureLimit, ...] = ()
    """The functions whose window crossed the limit in this call (only when scored with
    ``raise_over_limit=False``; otherwise the first crossing raised)."""

    @property
    def unscorable(self) -> torch.Tensor:
        """``(n,)`` bool: no function scored the completion."""
        return self.total.isnan()

    def metrics(self) -> dict[str, float]:
        """What to log: ``reward`` and ``reward_std`` (over the scorable completions), and per
        function ``reward/<name>`` (mean over the completions it scored), ``reward/<name>/std``,
        ``reward/<name>/none`` (completions it did not score, failures included) and
        ``reward/<name>/failed``; ``reward/unscorable``; the functions' counts
        (:attr:`counts`). A std over fewer than 2 values is NaN."""
        out = {"reward": _nanmean(self.total), "reward_std": _nanstd(self.total)}
        for i, name in enumerate(self.names):
            column = self.per_function[:, i]
            out[f"reward/{name}"] = _nanmean(column)
            out[f"reward/{name}/std"] = _nanstd(column)
            out[f"reward/{name}/none"] = float(column.isnan().sum())
            out[f"reward/{name}/failed"] = float(self.failed[i])
        out["reward/unscorable"] = float(self.unscorable.sum())
        return out | dict(self.counts)


def _nanmean(x: torch.Tensor) -> float:
    kept = x[~x.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan


def _nanstd(x: torch.Tensor) -> float:
    """The sample standard deviation (Bessel-corrected) of the non-NaN values, as TRL logs."""
    kept = x[~x.isnan()]
    if kept.numel() < 2:
        return math.nan
    return float(((kept - kept.mean()) ** 2).sum().div(kept.numel() - 1).sqrt())


class RewardSet:
    """Weighted reward functions and the window of their failures (the only state: which of each
    function's last ``failure_window`` calls raised)."""

    def __init__(
        self,
        functions: Sequence[RewardFn],
        *,
        max_failure_fraction: float = 0.1,
        failure_window: int = 20,
    ) -> None:
        if not functions:
            raise ConfigError("rewards: no reward functions given")
        names = [f.name for f in functions]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(
                f"rewards: two reward functions are named {twice[0]!r}; give them distinct names"
            )
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise ConfigError(
                f"rewards.max_failure_fraction: must be in [0, 1], got {max_failure_fraction}"
            )
        if failure_window < 1:
            raise ConfigError(f"rewards.failure_window: must be >= 1, got {failure_window}")
        self.functions = tuple(functions)
        self.max_failure_fraction = max_failure_fraction
        self.failure_window = failure_window
        self._recent: dict[str, collections.deque[bool]] = {
            n: collections.deque(maxlen=failure_window) for n in names
        }

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(f.weight for f in self.functions)

    @property
    def count_names(self) -> tuple[str, ...]:
        """The metric names of what the functions count per call (``reward/<name>/<counter>``
        for each of a function's ``counters``, e.g. a reward model's ``truncated``)."""
        return tuple(
            f"reward/{f.name}/{c}" for f in self.functions for c in getattr(f.fn, "counters", ())
        )

    def state_dict(self) -> dict[str, list[bool]]:
        """The failure window, JSON-able: per function, whether each of its last calls raised
        (oldest first). A checkpoint saves it so that a resumed run stops (or not) at the step
        the uninterrupted one does."""
        return {name: list(recent) for name, recent in self._recent.items()}

    def load_state_dict(self, state: Mapping[str, Sequence[bool]]) -> None:
        """Restore the failure window :meth:`state_dict` gave (a shorter ``failure_window``
        now keeps the newest calls).

        Raises:
            CheckpointError: the saved window names other functions than this set's.
        """
        if set(state) != set(self._recent):
            raise CheckpointError(
                f"the checkpoint's reward failure window is of the functions "
                f"{sorted(state)}, this run's are {sorted(self._recent)}; resume with the "
                "rewards the checkpoint was written with"
            )
        for name, calls in state.items():
            recent = self._recent[name]
            recent.clear()
            recent.extend(bool(c) for c in calls)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: Mapping[str, Sequence[Any]] | None = None,
        *,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        track_failures: bool = True,
        raise_over_limit: bool = True,
    ) -> Scores:
        """Every function called once on the batch; their outputs checked and combined.

        Args:
            prompts, completions, completion_ids: one entry per completion (a prompt repeated
                for each of its completions).
            columns: the records' extra columns (``completion``, ``task`` …), one list per
                column, one entry per completion.
            prompt_ids: the prompts' token ids, one entry per completion, for the functions
                that name ``prompt_ids`` (a reward model); None: they get None.
            track_failures: count raises in the failure window (False: a side-effect-free
                scoring, e.g. of a fingerprint probe).
            raise_over_limit: raise when a function's window crosses the limit (False: score
                every function and report the crossings in :attr:`Scores.over_limit`, for
                ranks that decide together; see :func:`failure_limit_error`).

        Raises:
            ShapeError: the arguments disagree in length.
            RewardError: a function returned a wrong length, type or a non-finite value, needs a
                column the batch lacks, or raised too often (see the module docstring; not
                with ``raise_over_limit=False``).
        """
        columns = dict(columns or {})
        n = _check_batch(prompts, completions, completion_ids, columns, prompt_ids)
        rows: list[list[float | None]] = []
        failed: list[int] = []
        failures: list[RewardFailure] = []
        counts: dict[str, float] = {}
        over: list[FailureLimit] = []
        for f in self.functions:
            try:
                out = f.call(prompts, completions, completion_ids, columns, prompt_ids)
            except TscaleError as err:
                if isinstance(err, RewardError):
                    raise
                raise RewardError(f"{f.where}: {err}") from None
            except Exception as err:  # a user's function: anything may go wrong in it
                failure = RewardFailure(f.name, _one_line(err), n)
                failures.append(failure)
                crossed = self._count(f, failure) if track_failures else None
                if crossed is not None and raise_over_limit:
                    raise RewardError(crossed.message()) from err
                if crossed is not None:
                    over.append(crossed)
                rows.append([None] * n)
                failed.append(n)
                continue
            if track_failures:
                self._recent[f.name].append(False)
            rows.append(_check_output(f, out, n))
            failed.append(0)
            for c in getattr(f.fn, "counters", ()):
                counts[f"reward/{f.name}/{c}"] = float(f.fn.counts.get(c, 0))
        per_function = torch.tensor(
            [[math.nan if v is None else float(v) for v in row] for row in rows],
            dtype=torch.float32,
        ).T.reshape(n, len(self.functions))
        weights = torch.tensor(self.weights, dtype=torch.float32)
        total = (per_function * weights).nansum(dim=1)
        total[per_function.isnan().all(dim=1)] = math.nan
        return Scores(
            names=self.names,
            weights=self.weights,
            per_function=per_function,
            total=total,
            failed=tuple(failed),
            failures=tuple(failures),
            counts={k: counts.get(k, 0.0) for k in self.count_names},
            over_limit=tuple(over),
        )

    def _count(self, f: RewardFn, failure: RewardFailure) -> FailureLimit | None:
        """Record a raise in ``f``'s window (and log it); the crossing when its window is now
        over the limit."""
        recent = self._recent[f.name]
        recent.append(True)
        bad = sum(recent)
        logger.warning(
            "%s raised %s; its %d completions count as unscored (%d of its last %d calls raised)",
            f.where,
            failure.error,
            failure.completions,
            bad,
            len(recent),
        )
        if bad > self.max_failure_fraction * self.failure_window:
            return FailureLimit(
                where=f.where,
                raised=bad,
                window=self.failure_window,
                max_fraction=self.max_failure_fraction,
                last_error=failure.error,
            )
        return None


def _one_line(err: Exception, limit: int = 300) -> str:
    """``ExceptionType: message`` on one line, at most ``limit`` characters of message."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_batch(
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    columns: Mapping[str, Sequence[Any]],
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> int:
    n = len(completions)
    given = (("prompts", prompts), ("completion_ids", completion_ids), ("prompt_ids", prompt_ids))
    for what, value in given:
        if value is not None and len(value) != n:
            raise ShapeError(f"rewards: {len(value)} {what} for {n} completions")
    for name, value in columns.items():
        if name in CONTRACT_ARGS + OPTIONAL_ARGS:
            raise ShapeError(f"rewards: a column is named {name!r}, a reward argument; rename it")
        if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != n:
            got = f"{len(value)} values" if hasattr(value, "__len__") else type(value).__name__
            raise ShapeError(f"rewards: column {name!r} has {got} for {n} completions")
    return n


def _check_output(f: RewardFn, out: Any, n: int) -> list[float | None]:
    """The function's output as ``n`` finite floats or None, or one clear error naming it."""
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if isinstance(out, str | bytes | Mapping) or not hasattr(out, "__len__"):
        raise RewardError(
            f"{f.where} returned a {type(out).__name__}; expected a list of {n} floats "
            "(None for a completion it cannot score)"
        )
    if len(out) != n:
        raise RewardError(f"{f.where} returned {len(out)} values for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"{f.where} returned a {type(v).__name__} at index {i} ({str(v)[:40]!r}); "
                "expected a float or None"
            )
        x = float(v)
        if not math.isfinite(x):
            raise RewardError(
                f"{f.where} returned {x} at index {i}; return None for a completion it cannot score"
            )
        values.append(x)
    return values


def build_reward_set(
    config: RewardsConfig,
    *,
    key: str = "task.rewards",
    run_kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    tokenizer: Any = None,
    max_completion_length: int | None = None,
) -> RewardSet:
    """The :class:`RewardSet` a ``rewards`` section describes: each function resolved, its
    ``kwargs`` checked against its signature (a built-in's strictly, with its own check), each
    ``model:`` folder checked as a reward model (:mod:`tscale.rewards.model`).

    Args:
        config: the section.
        key: its YAML key path, for messages.
        run_kwargs: settings the run knows (e.g. ``stop_ids``), given to the functions whose
            signature names them unless their ``kwargs`` set them.
        device: where reward models run (the run's device; None: the CPU).
        tokenizer: the policy's tokenizer, which a reward model's must match (None: not
            checked, and a reward model refuses to score).
        max_completion_length: the most tokens a completion has, which must leave room for a
            prompt in a reward model's positions (None: not checked).

    Raises:
        ConfigError: one line naming the key: an unknown function, an import problem, a
            signature that cannot take the contract, an unknown or missing setting, two
            functions with one name, both or neither of fn and model, a folder that is not a
            reward model, a reward model whose tokenizer is not the policy's or whose positions
            a completion of ``max_completion_length`` tokens fills.
    """
    functions = []
    for i, c in enumerate(config.functions):
        where = f"{key}.functions[{i}]"
        if c.model is not None:
            functions.append(
                _model_reward(
                    c,
                    where,
                    device=device,
                    tokenizer=tokenizer,
                    max_completion_length=max_completion_length,
                )
            )
            continue
        fn_name = c.fn if c.fn is not None else "exact_match"
        fn = resolve_reward_fn(fn_name, f"{where}.fn")
        sig = signature_of(fn, f"{where}.fn")
        builtin = REWARDS.get(fn_name)
        kwargs = {k: v for k, v in (run_kwargs or {}).items() if k in sig.named}
        kwargs.update(c.kwargs)
        _check_kwargs(fn_name, c.kwargs, sig, strict=builtin is not None, where=where)
        if builtin is not None:
            missing = sorted(sig.required - kwargs.keys())
            if missing:
                raise ConfigError(f"{where}.kwargs: {fn_name} needs {missing[0]!r}")
            if builtin.check_kwargs is not None:
                try:
                    builtin.check_kwargs(kwargs)
                except ValueError as err:
                    raise ConfigError(f"{where}.kwargs.{err}") from None
        name = c.name or (fn_name if builtin is not None else fn_name.rpartition(":")[2])
        functions.append(
            RewardFn(name=name, fn=fn, weight=c.weight, kwargs=kwargs, key=where, signature=sig)
        )
    names = [f.name for f in functions]
    for i, name in enumerate(names):
        if name in names[:i]:
            first = names.index(name)
            raise ConfigError(
                f"{key}.functions[{i}]: its name {name!r} is the name of functions[{first}] "
                "too; set a distinct name"
            )
    return RewardSet(
        functions,
        max_failure_fraction=config.max_failure_fraction,
        failure_window=config.failure_window,
    )


def _model_reward(
    c: RewardConfig,
    where: str,
    *,
    device: torch.device | str | None,
    tokenizer: Any,
    max_completion_length: int | None = None,
) -> RewardFn:
    """The :class:`RewardFn` of a ``model:`` entry: the folder checked, its settings checked,
    its identity the folder's weights and the dtype."""
    if c.fn is not None:
        raise ConfigError(
            f"{where}: sets both fn ({c.fn}) and model ({c.model}); a reward is one or the other"
        )
    assert c.model is not None
    settings = check_model_settings(c.kwargs, f"{where}.kwargs")
    reward = RewardModelReward(
        c.model,
        tokenizer=tokenizer,
        device=device if device is not None else "cpu",
        dtype=settings["dtype"],
        batch_size=settings["batch_size"],
        key=f"{where}.model",
        max_completion_length=max_completion_length,
    )
    return RewardFn(
        name=c.name or "reward_model",
        fn=reward,
        weight=c.weight,
        key=where,
        signature=signature_of(reward, f"{where}.model"),
        identity=reward.identity,
    )


def _check_kwargs(
    fn_name: str, kwargs: Mapping[str, Any], sig: Signature, *, strict: bool, where: str
) -> None:
    """Each setting names a parameter (a built-in's, or any function without ``**kwargs``)."""
    if not strict and sig.any_keyword:
        return
    for k in kwargs:
        if k in CONTRACT_ARGS:
            raise ConfigError(f"{where}.kwargs.{k}: is a reward argument, not a setting")
        if k not in sig.named:
            near = difflib.get_close_matches(k, sorted(sig.named), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            takes = ", ".join(sorted(sig.named)) or "none"
            raise ConfigError(
                f"{where}.kwargs.{k}: {fn_name} takes no setting {k!r} (it takes: {takes}){hint}"
            )
