"""A trained reward model as a reward (``{model: <folder>}``): its scores are transformers'
``AutoModelForSequenceClassification`` scores of the same ids, padded batches included; it
plugs into RewardSet (metrics, a fingerprint from its weights); GRPO trains on it from YAML;
each mistake is one line naming the key."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tscale.config import load_config
from tscale.errors import ConfigError, RewardError
from tscale.rewards import (
    RewardConfig,
    RewardsConfig,
    build_reward_set,
    fingerprint_rewards,
    make_probe,
)
from tscale.rewards.model import RewardModelReward
from tscale.testing.hf_folders import make_model_folder
from tscale.testing.runs import step_rows

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PAD = "<|endoftext|>"  # the qwen2 folder's spare special token: not its eos (<|im_end|>)


def write_reward_model(
    policy: Path, out: Path, *, seed: int, max_positions: int | None = None
) -> Path:
    """A random ``Qwen2ForSequenceClassification`` on ``policy``'s config and tokenizer, saved
    by transformers (what a reward run's export looks like); ``max_positions``: its own
    ``max_position_embeddings`` (default the policy's)."""
    cfg = transformers.AutoConfig.from_pretrained(policy)
    cfg.num_labels = 1
    if max_positions is not None:
        cfg.max_position_embeddings = max_positions
    cfg.pad_token_id = Tokenizer.from_file(str(policy / "tokenizer.json")).token_to_id(PAD)
    cfg.architectures = ["Qwen2ForSequenceClassification"]
    torch.manual_seed(seed)
    model = transformers.Qwen2ForSequenceClassification(cfg)
    with torch.no_grad():  # HF inits the head at std 0.02: make the scores spread
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (policy / name).is_file():
            shutil.copy(policy / name, out / name)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm")
    policy = make_model_folder(
        root / "policy", "qwen2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2
    )
    return {
        "policy": policy,
        "rm": write_reward_model(policy, root / "rm", seed=1),
        "rm_other": write_reward_model(policy, root / "rm_other", seed=2),
        "rm_short": write_reward_model(policy, root / "rm_short", seed=3, max_positions=SHORT),
        "llama": make_model_folder(root / "llama", "llama3", hidden_size=32, num_layers=1),
    }


SHORT = 20  # the short reward model's max_position_embeddings: cuts the chat prompt (21 tokens)


def policy_tokenizer(folders: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(folders["policy"] / "tokenizer.json"))


PROMPTS = ["<|im_start|>user\nreverse: a b c<|im_end|>\n<|im_start|>assistant\n", "sort: 3 1 2"]
COMPLETIONS = [" c b a<|im_end|>", " 1 2 3", "", " the sky is blue and the sea<|im_end|>"]


def batch(tok: Tokenizer) -> tuple[list[str], list[str], list[list[int]], list[list[int]]]:
    """Two prompts x the completions: lengths from the prompt alone to long, some ending in the
    stop token."""
    prompts = [p for p in PROMPTS for _ in COMPLETIONS]
    completions = COMPLETIONS * len(PROMPTS)
    prompt_ids = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    completion_ids = [tok.encode(c, add_special_tokens=False).ids for c in completions]
    return prompts, completions, prompt_ids, completion_ids


def test_scores_are_transformers_scores_of_the_same_ids(folders: dict[str, Path]) -> None:
    tok = policy_tokenizer(folders)
    prompts, completions, prompt_ids, completion_ids = batch(tok)
    reward = RewardModelReward(folders["rm"], tokenizer=tok, batch_size=3)  # 8 rows: 3 batches
    ours = reward(prompts, completions, completion_ids, prompt_ids=prompt_ids)

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folders["rm"]).eval()
    pad = hf.config.pad_token_id
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    assert (mask == 0).any() and len({len(r) for r in rows}) > 2  # padded, mixed lengths
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert all(isinstance(v, float) for v in ours)
    torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-5)
    assert theirs.std() > 0.1  # the scores differ: the comparison can fail

    # one at a time gives the same scores (padding changes nothing before it)
    alone = RewardModelReward(folders["rm"], tokenizer=tok, batch_size=1)
    single = alone(prompts, completions, completion_ids, prompt_ids=prompt_ids)
    torch.testing.assert_close(torch.tensor(single), torch.tensor(ours), rtol=0, atol=1e-5)

    # without the ids (a caller with text only), the prompt text is encoded
    text_only = reward(prompts, completions, completion_ids)
    torch.testing.assert_close(torch.tensor(text_only), torch.tensor(ours), rtol=0, atol=1e-6)


def test_an_empty_sequence_is_unscored(folders: dict[str, Path]) -> None:
    reward = RewardModelReward(folders["rm"], tokenizer=policy_tokenizer(folders))
    out = reward(["", "x"], ["", "y"], [[], [5]], prompt_ids=[[], [7]])
    assert out[0] is None and isinstance(out[1], float)


def test_bfloat16_scores_near_float32(folders: dict[str, Path]) -> None:
    tok = policy_tokenizer(folders)
    prompts, completions, prompt_ids, completion_ids = batch(tok)
    full = RewardModelReward(folders["rm"], tokenizer=tok)
    half = RewardModelReward(folders["rm"], tokenizer=tok, dtype="bfloat16")
    a = torch.tensor(full(prompts, completions, completion_ids, prompt_ids=prompt_ids))
    b = torch.tensor(half(prompts, completions, completion_ids, prompt_ids=prompt_ids))
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.1)
    assert full.identity != half.identity


def rewards_config(folder: Path, **extra: object) -> RewardsConfig:
    return RewardsConfig(
        functions=[RewardConfig(model=str(folder), name="rm", **extra), RewardConfig()]
    )


def test_reward_set_logs_it_and_fingerprints_its_weights(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    tok = policy_tokenizer(folders)
    prompts, completions, prompt_ids, completion_ids = batch(tok)
    rs = build_reward_set(rewards_config(folders["rm"]), tokenizer=tok)
    assert rs.names == ("rm", "exact_match")
    columns = {"completion": ["1 2 3"] * len(prompts)}
    scores = rs.score(prompts, completions, completion_ids, columns, prompt_ids=prompt_ids)
    direct = RewardModelReward(folders["rm"], tokenizer=tok)
    expected = torch.tensor(direct(prompts, completions, completion_ids, prompt_ids=prompt_ids))
    torch.testing.assert_close(scores.per_function[:, 0], expected)
    metrics = scores.metrics()
    assert metrics["reward/rm"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert metrics["reward/rm/std"] == pytest.approx(float(expected.std()), abs=1e-6)
    torch.testing.assert_close(scores.total, expected + scores.per_function[:, 1])

    # the fingerprint is the weights': no tokenizer needed (nothing is scored), a copy of the
    # folder gives the same, other weights or another weight another
    probe = make_probe([{"prompt": "sort: 3 1 2", "completion": "1 2 3"}])
    first = fingerprint_rewards(build_reward_set(rewards_config(folders["rm"])), probe)
    copy = shutil.copytree(folders["rm"], tmp_path / "copy")
    assert fingerprint_rewards(build_reward_set(rewards_config(copy)), probe) == first
    other = fingerprint_rewards(build_reward_set(rewards_config(folders["rm_other"])), probe)
    assert other["rm"] != first["rm"] and other["exact_match"] == first["exact_match"]
    heavier = RewardsConfig(
        functions=[RewardConfig(model=str(folders["rm"]), name="rm", weight=2.0), RewardConfig()]
    )
    assert fingerprint_rewards(build_reward_set(heavier), probe)["rm"] != first["rm"]


def test_scoring_needs_the_checked_tokenizer(folders: dict[str, Path]) -> None:
    rs = build_reward_set(rewards_config(folders["rm"]))  # no tokenizer: built, not scoring
    with pytest.raises(RewardError, match=r"functions\[0\]\.model: the policy's tokenizer"):
        rs.score(["a"], ["b"], [[1]], {"completion": ["b"]}, prompt_ids=[[2]])


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_mistakes_are_one_line_naming_the_key(folders: dict[str, Path], tmp_path: Path) -> None:
    tok = policy_tokenizer(folders)
    key = "task.rewards.functions[0]"

    def build(**extra: object) -> None:
        model = extra.pop("model", str(folders["rm"]))
        cfg = RewardsConfig(functions=[RewardConfig(model=model, **extra)])  # type: ignore[arg-type]
        build_reward_set(cfg, tokenizer=tok)

    with pytest.raises(ConfigError) as err:
        build(model=str(tmp_path / "nowhere"))
    assert one_line(err).startswith(f"{key}.model: ") and "not a folder" in one_line(err)
    with pytest.raises(ConfigError) as err:
        build(model=str(folders["policy"]))  # a causal LM, not a reward model
    assert one_line(err).startswith(f"{key}.model: ") and "Qwen2ForCausalLM" in one_line(err)
    with pytest.raises(ConfigError) as err:
        build(fn="exact_match")
    assert one_line(err).startswith(f"{key}: sets both fn")
    with pytest.raises(ConfigError) as err:
        build(kwargs={"batchsize": 4})
    assert one_line(err).startswith(f"{key}.kwargs.batchsize: ") and "'batch_size'" in str(
        err.value
    )
    with pytest.raises(ConfigError) as err:
        build(kwargs={"dtype": "float64"})
    assert one_line(err).startswith(f"{key}.kwargs.dtype: ")
    # the policy's tokenizer is another one: refused at once
    llama = Tokenizer.from_file(str(folders["llama"] / "tokenizer.json"))
    cfg = RewardsConfig(functions=[RewardConfig(model=str(folders["rm"]))])
    with pytest.raises(ConfigError) as err:
        build_reward_set(cfg, tokenizer=llama)
    assert one_line(err).startswith(f"{key}.model: the reward model's tokenizer is not the")
    # a folder without a tokenizer cannot be checked
    bare = shutil.copytree(folders["rm"], tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ConfigError) as err:
        build(model=str(bare))
    assert one_line(err).startswith(f"{key}.model: ") and "tokenizer.json" in one_line(err)


def grpo_yaml(tmp: Path, folders: dict[str, Path], reward: str, policy: str = "policy") -> Path:
    path = tmp / "grpo.yaml"
    path.write_text(
        f"""
run: {{seed: 0, threads: 1, output_dir: {tmp / "run"}}}
model: {{path: {folders[policy]}}}
data:
  synthetic: {{tasks: [reverse, sort], num_train: 16, num_eval: 4, min_items: 3, max_items: 4}}
  system_prompt: null
  max_length: 160
  batch_size: 2
optimizer: {{type: adamw, lr: 0.003}}
scheduler: {{warmup_steps: 0}}
train: {{max_steps: 2, log_every: 1, eval_every: 0, save_every: 2, progress: false}}
eval: {{num_samples: 0}}
task:
  type: grpo
  num_generations: 4
  max_completion_length: 6
  rewards:
    functions:
      - {reward}
"""
    )
    return path


def test_grpo_trains_on_the_reward_model_from_yaml(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    from tscale.cli import main

    cfg = grpo_yaml(tmp_path, folders, f"{{model: {folders['rm']}, name: rm}}")
    assert main(["train", str(cfg)]) == 0
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["reward/rm"]) and r["reward/rm/std"] > 0
        assert r["reward"] == pytest.approx(r["reward/rm"], abs=1e-5)  # the only reward
        assert r["reward/unscorable"] == 0 and math.isfinite(r["loss"])
    state = tmp_path / "run/checkpoints/step_00000002/state.json"
    saved = json.loads(state.read_text())["extra"]["task"]["reward_fingerprint"]
    assert set(saved) == {"rm"}


def test_yaml_mistakes_stop_the_run_in_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    from tscale.train.run import build_run

    bad = grpo_yaml(tmp_path, folders, f"{{model: {folders['rm']}, wieght: 1.0}}")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad), [])
    assert "wieght" in one_line(err)
    causal = grpo_yaml(tmp_path, folders, f"{{model: {folders['policy']}}}")
    with pytest.raises(ConfigError) as err:
        build_run(load_config(str(causal), []), overwrite=True)
    assert one_line(err).startswith("task.rewards.functions[0].model: ")
    other = grpo_yaml(tmp_path, folders, f"{{model: {folders['rm']}}}", policy="llama")
    with pytest.raises(ConfigError) as err:  # a policy with another tokenizer: before step 1
        build_run(load_config(str(other), []), overwrite=True)
    assert one_line(err).startswith(
        "task.rewards.functions[0].model: the reward model's tokenizer is not the policy's"
    )


def hf_scores(folder: Path, rows: list[list[int]]) -> torch.Tensor:
    """transformers' scores of each row, one at a time (no padding)."""
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return torch.cat([hf(input_ids=torch.tensor([r])).logits[:, 0] for r in rows])


def test_a_long_sequence_keeps_its_completion_and_the_end_of_its_prompt(
    folders: dict[str, Path],
) -> None:
    tok = policy_tokenizer(folders)
    prompts, completions, prompt_ids, completion_ids = batch(tok)
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    assert any(len(r) > SHORT for r in rows) and any(0 < len(r) <= SHORT for r in rows)
    reward = RewardModelReward(folders["rm_short"], tokenizer=tok, batch_size=3)
    assert reward.max_positions == SHORT
    ours = reward(prompts, completions, completion_ids, prompt_ids=prompt_ids)
    cut = [
        (p[len(p) - (SHORT - len(c)) :] if len(p) + len(c) > SHORT else p) + c
        for p, c in zip(prompt_ids, completion_ids, strict=True)
    ]
    assert all(len(r) <= SHORT for r in cut) and all(len(c) < SHORT for c in completion_ids)
    assert all(r[-len(c) :] == c for r, c in zip(cut, completion_ids, strict=True) if c)
    theirs = hf_scores(folders["rm_short"], cut)
    torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-5)
    whole = hf_scores(folders["rm_short"], rows)  # what scoring the uncut rows would give
    long = torch.tensor([len(r) > SHORT for r in rows])
    assert (whole[long] - theirs[long]).abs().min() > 1e-3  # the comparison can fail
    assert reward.counts == {"truncated": int(long.sum())}

    # a completion longer than the positions on its own is unscored, not cut
    assert reward(["p"], ["c"], [[5] * (SHORT + 1)], prompt_ids=[[7, 8]]) == [None]

    # RewardSet logs the count
    config = RewardsConfig(functions=[RewardConfig(model=str(folders["rm_short"]), name="rm")])
    rs = build_reward_set(config, tokenizer=tok, max_completion_length=SHORT - 1)
    assert rs.count_names == ("reward/rm/truncated",)
    scores = rs.score(prompts, completions, completion_ids, prompt_ids=prompt_ids)
    assert scores.metrics()["reward/rm/truncated"] == float(long.sum())


def test_a_completion_budget_that_fills_the_positions_is_refused(
    folders: dict[str, Path],
) -> None:
    config = RewardsConfig(functions=[RewardConfig(model=str(folders["rm_short"]))])
    with pytest.raises(ConfigError) as err:
        build_reward_set(config, key="task.rewards", max_completion_length=SHORT)
    assert one_line(err).startswith(
        f"task.rewards.functions[0].model: task.max_completion_length ({SHORT}) leaves no room "
        f"for a prompt in the reward model's max_position_embeddings ({SHORT}"
    )


def test_grpo_logs_the_truncated_count_from_yaml(folders: dict[str, Path], tmp_path: Path) -> None:
    from tscale.cli import main
    from tscale.train.run import build_run

    cfg = grpo_yaml(tmp_path, folders, f"{{model: {folders['rm_short']}, name: rm}}")
    assert main(["train", str(cfg)]) == 0
    rows = step_rows(tmp_path / "run")
    # the chat prompts are about as long as the reward model's positions: some sequences cut
    assert all(0 < r["reward/rm/truncated"] <= 8 for r in rows)
    assert all(math.isfinite(r["reward/rm"]) for r in rows)
    too_long = grpo_yaml(tmp_path, folders, f"{{model: {folders['rm_short']}}}")
    text = too_long.read_text().replace(
        "max_completion_length: 6", f"max_completion_length: {SHORT}"
    )
    too_long.write_text(text)
    with pytest.raises(ConfigError, match=r"^task.rewards.functions\[0\].model: task.max_comp"):
        build_run(load_config(str(too_long), []), overwrite=True)  # before any step
