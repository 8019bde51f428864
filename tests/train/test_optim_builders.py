"""Config → optimizer and schedule: the records build them (every type builds, fields reach the
factory, clipping and the non-finite guard go around it) and a bad value is a ConfigError naming
the key."""

from __future__ import annotations

import attrs
import pytest
import torch

from tscale import optim
from tscale.config import Config, TrainConfig
from tscale.core import tree as T
from tscale.errors import ConfigError
from tscale.train import builders


def _cfg(optimizer: dict | None = None, scheduler: dict | None = None, steps: int = 20) -> Config:
    optimizer, scheduler = dict(optimizer or {}), dict(scheduler or {})
    return Config(
        optimizer=optim.OPTIMIZER_TYPES[optimizer.pop("type", "adamw")](**optimizer),
        scheduler=optim.SCHEDULE_TYPES[scheduler.pop("type", "cosine")](**scheduler),
        train=TrainConfig(max_steps=steps),
    )


def _tx(cfg: Config) -> optim.GradientTransformation:
    return builders.build_optimizer(cfg, builders.build_schedule(cfg))


def _params() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return T.unflatten(
        {
            "model.layers.0.mlp.up_proj.weight": torch.randn(64, 80, generator=g),
            "model.layers.0.mlp.up_proj.bias": torch.randn(64, generator=g),
            "model.norm.weight": torch.randn(80, generator=g),
        }
    )


def _updates(tx: optim.GradientTransformation, steps: int = 3, zero: bool = False) -> list:
    params = _params()
    state = tx.init(params)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        grads = params.apply(
            lambda p: torch.zeros_like(p) if zero else torch.randn(p.shape, generator=g)
        )
        updates, state = tx.update(grads, state, params)
        out.append(updates.clone())
        optim.apply_updates(params, updates)
    return out


def test_default_config_is_adamw_wrapped_in_skip_nonfinite() -> None:
    cfg = _cfg(scheduler={"warmup_steps": 2, "min_lr_ratio": 0.1})
    tx = _tx(cfg)
    state = tx.init(_params())
    assert set(state.keys()) == {"inner", "skipped"}
    ref = optim.skip_nonfinite(
        optim.chain(
            optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine(1e-3, 2, 20, 0.1))
        )
    )
    for a, b in zip(_updates(tx), _updates(ref), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(T.leaves(a), T.leaves(b), strict=True))
    plain = _tx(attrs.evolve(cfg, optimizer=optim.AdamWConfig(skip_nonfinite=False)))
    assert "skipped" not in plain.init(_params())


def test_fields_reach_the_factory() -> None:
    cfg = _cfg(
        {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1, "max_grad_norm": None},
        {"type": "constant"},
    )
    ref = optim.skip_nonfinite(optim.adamw(1e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1))
    for a, b in zip(_updates(_tx(cfg)), _updates(ref), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(T.leaves(a), T.leaves(b), strict=True))


def test_no_decay_patterns_override_the_default_mask() -> None:
    # zero gradients: the update of a leaf is -lr * wd * p where it decays, 0 where it does not
    def decayed(no_decay) -> list[bool]:
        cfg = _cfg({"weight_decay": 0.5, "no_decay": no_decay}, {"type": "constant"})
        return [bool(u.abs().sum() > 0) for u in T.leaves(_updates(_tx(cfg), 1, zero=True)[0])]

    # leaf order: up_proj.weight, up_proj.bias, norm.weight
    assert decayed(None) == [True, False, False]  # the default: matrices only
    assert decayed([]) == [True, True, True]
    assert decayed([r"\.bias$"]) == [True, False, True]
    assert decayed(["norm", "up_proj"]) == [False, False, False]
    with pytest.raises(ConfigError, match=r"optimizer\.no_decay\[1\]: '\(' is not a valid regex"):
        _tx(_cfg({"no_decay": ["ok", "("]}))


def test_adamw_8bit_takes_its_fields() -> None:
    pytest.importorskip("bitsandbytes")
    cfg = _cfg({"type": "adamw_8bit", "block_size": 128, "min_8bit_size": 1000})
    state = _tx(cfg).init(_params())
    adam = state["inner", "1"]  # 0: clipping (max_grad_norm defaults to 1.0)
    assert adam["state1", "model", "layers", "0", "mlp", "up_proj", "weight"].dtype == torch.uint8
    assert adam["absmax1", "model", "layers", "0", "mlp", "up_proj", "weight"].shape == (40,)
    assert adam["state1", "model", "norm", "weight"].dtype == torch.float32
    with pytest.raises(ConfigError, match=r"optimizer\.block_size.*one of 64, 128"):
        _tx(_cfg({"type": "adamw_8bit", "block_size": 100}))


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        ({"betas": (1.5, 0.9)}, "optimizer.betas[0]: must be in [0, 1), got 1.5"),
        ({"eps": -1.0}, "optimizer.eps: must be >= 0, got -1.0"),
        ({"weight_decay": -1.0}, "optimizer.weight_decay: must be >= 0, got -1.0"),
        ({"max_grad_norm": 0.0}, "optimizer.max_grad_norm: must be > 0, got 0.0"),
        ({"type": "sophia_g", "rho": 0.0}, "optimizer.rho: must be > 0, got 0.0"),
        ({"type": "muon", "ns_steps": -1}, "optimizer.ns_steps: must be >= 0, got -1"),
    ],
)
def test_optimizer_mistakes_name_the_key(optimizer: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _tx(_cfg(optimizer))
    assert str(info.value) == message


def test_schedule_free_takes_the_constant_schedule_as_its_own_warmup() -> None:
    cfg = _cfg({"type": "schedule_free_adamw", "lr": 1e-2}, {"type": "constant", "warmup_steps": 3})
    ref = optim.skip_nonfinite(
        optim.chain(optim.clip_by_global_norm(1.0), optim.schedule_free_adamw(1e-2, warmup_steps=3))
    )
    for a, b in zip(_updates(_tx(cfg)), _updates(ref), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(T.leaves(a), T.leaves(b), strict=True))
    with pytest.raises(ConfigError, match=r"needs no decay schedule: set scheduler\.type"):
        _tx(_cfg({"type": "schedule_free_adamw"}))


def test_every_schedule_type_builds_from_the_config() -> None:
    extra = {
        "cosine_restarts": {"num_cycles": 2},
        "wsd": {"decay_fraction": 0.3, "decay_shape": "cosine"},
        "polynomial": {"power": 2.0},
        "inverse_sqrt": {"timescale": 5},
    }
    for kind in optim.SCHEDULES:
        ratio = {} if kind in ("constant", "inverse_sqrt") else {"min_lr_ratio": 0.1}
        cfg = _cfg(scheduler={"type": kind, "warmup_steps": 3, **ratio, **extra.get(kind, {})})
        sched = builders.build_schedule(cfg)
        assert sched(0) == 0.0 and sched(3) == pytest.approx(1e-3), kind


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (
            {"type": "wsd", "warmup_steps": 10, "decay_fraction": 0.8},
            "scheduler.decay_fraction 0.8 makes 16 decay steps, which with warmup_steps (10) "
            "exceed the 20 steps of the run",
        ),
        ({"type": "polynomial", "power": -1.0}, "scheduler.power: must be > 0, got -1.0"),
        ({"warmup_steps": -1}, "scheduler.warmup_steps: must be >= 0, got -1"),
        ({"warmup_steps": 30}, "scheduler.warmup_steps (30) exceeds the 20 steps of the run"),
    ],
)
def test_scheduler_mistakes_name_the_key(scheduler: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        builders.build_schedule(_cfg(scheduler=scheduler))
    assert str(info.value) == message
    with pytest.raises(ConfigError, match=r"^optimizer\.lr: must be >= 0, got -1\.0$"):
        builders.build_schedule(_cfg({"lr": -1.0}))


def test_yaml_examples_of_the_guide_build(tmp_path) -> None:
    import re
    from pathlib import Path

    from tscale.config import load_config

    guide = (Path(__file__).resolve().parents[2] / "docs" / "optimizers.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", guide, re.S)
    assert len(blocks) >= 8
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        cfg = load_config(path, ["train.max_steps=1000"])
        if cfg.optimizer.type == "adamw_8bit":
            pytest.importorskip("bitsandbytes")
        tx = _tx(cfg)
        assert isinstance(tx, optim.GradientTransformation), block


def test_constant_equals_transformers() -> None:
    tf = pytest.importorskip("transformers.optimization")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    lam = tf.get_constant_schedule_with_warmup(opt, 7).lr_lambdas[0]
    cfg = _cfg({"lr": 2e-3}, {"type": "constant", "warmup_steps": 7})
    sched = builders.build_schedule(cfg)
    sched_ref = optim.linear_warmup(2e-3, 7)
    assert [sched(s) for s in range(20)] == [2e-3 * lam(s) for s in range(20)]
    assert [sched_ref(s) for s in range(20)] == [sched(s) for s in range(20)]


def test_sophia_step_from_the_config_takes_the_fused_loss() -> None:
    """Sophia's Hessian estimate is the update's extra argument, so the configured loss (fused
    here) is the step's: no Sophia-only step that would refuse it."""
    from tensordict import TensorDict

    from tscale.core import rng as R
    from tscale.core.state import TrainState
    from tscale.models.transformer import Transformer, TransformerConfig

    cfg = attrs.evolve(
        _cfg({"type": "sophia_g", "lr": 3e-3, "update_every": 2}),
        loss=attrs.evolve(Config().loss, fused=True),
    )
    model = Transformer(
        TransformerConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
        )
    )
    tx = _tx(cfg)
    params = model.init(R.key(0))
    state = TrainState.create(params, tx.init(params), R.key(1))
    from tscale.tasks import SFTTask, TaskContext

    ctx = TaskContext(
        model=model, apply_fn=model.apply, data=None, device=torch.device("cpu"), config=cfg
    )
    step = builders.build_step(cfg, SFTTask().loss(ctx), tx, apply_fn=model.apply)
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    batch = TensorDict({"input_ids": ids, "labels": labels}, batch_size=[4])
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
