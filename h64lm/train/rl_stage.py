"""`stage=rl`: GRPO or PPO with verifiable rewards (or a reward model) as a stage of the trainer.

The loader yields prompt micro-batches (h64lm/data/prompts.py) of the data's training
conversations: each conversation's turns before its last assistant turn, whose final `#### N`
answer is the reference (conversations without one are left out). The objective
(h64lm/objectives/rl.py) samples, rewards and trains; the reference policy is the starting model
(`build_reference`: `train.init_from`, same layout, frozen, routing with its own weights).

Rewards: stage.reward_exact_match * exact match of the final `#### N` (h64lm/objectives/rewards.py)
+ stage.reward_format * whether there is one; or, with stage.reward_model=RUN, the score of that
run's model (it must have model.score_head=true) at each completion's last real token.

Validation (`validate`): greedy answers to the first stage.eval_examples validation problems;
`rl/exact_match`, `rl/reward` (their mean verifiable reward) and val_loss = 1 - rl/exact_match
(lower is better: best/ keeps the most accurate policy). Every rank answers (the same problems
with the same weights), so every rank holds the same val_loss for the collective best/ save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from h64lm.config import RunConfig
from h64lm.data import Tokenizer
from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.data.chat import ChatFormat, Message
from h64lm.data.prompts import Prompt, PromptLoader, left_padded
from h64lm.model.config import check_positions
from h64lm.objectives.rewards import RewardFn, exact_match_reward, extract_answer, format_reward, weighted_rewards
from h64lm.objectives.rl import PolicyOptimisation, RLSettings, RolloutReward
from h64lm.objectives.rollout import Rollout
from h64lm.parallel import ParallelLayout
from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import resolve_precision
from h64lm.train.reference import build_reference
from h64lm.train.stage import Stage
from h64lm.validation import ConfigError

if TYPE_CHECKING:
    from h64lm.train.loop import Trainer

__all__ = ["rl_stage", "prompts_with_answers", "load_reward_model"]


def prompts_with_answers(conversations: list[list[Message]], chat: ChatFormat) -> list[Prompt]:
    """Each conversation's prompt (every turn before its last, an assistant turn) and the final
    answer of that turn; conversations whose last turn has no `#### answer` line are left out."""
    out = []
    for conv in conversations:
        answer = extract_answer(conv[-1].content)
        if answer is not None:
            out.append(Prompt(tuple(chat.prompt(conv[:-1])), answer))
    return out


def load_reward_model(path: str, device: torch.device) -> nn.Module:
    """The frozen model of a reward-model run (a checkpoint or run directory) with its score head."""
    from h64lm.runtime.checkpoint import CheckpointError, load_trained_model

    try:
        model, saved = load_trained_model(path, device)
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"stage.reward_model={path}: {e}") from None
    if not saved.model.score_head:
        raise ConfigError(f"stage.reward_model={path}: its model has no score head (model.score_head=false), so it "
                          "gives no reward; point it at a stage=reward run")
    return model.requires_grad_(False)


def _text_reward(chat: ChatFormat, prompts: list[Prompt], fn: RewardFn) -> RolloutReward:
    def reward(rollout: Rollout, batch: Batch) -> torch.Tensor:
        indices = batch.extras["prompt"][rollout.prompt_rows].tolist()
        rows = zip(rollout.completions.cpu().tolist(), rollout.mask.cpu().tolist(), indices)
        values = [fn(chat.decode([t for t, keep in zip(ids, m) if keep]), prompts[i].reference)
                  for ids, m, i in rows]
        return torch.tensor(values, dtype=torch.float32, device=rollout.completions.device)

    return reward


def _model_reward(model: nn.Module) -> RolloutReward:
    def reward(rollout: Rollout, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            scores = model(rollout.sequences, attention_mask=rollout.attention, return_logits=False).scores
        return scores.gather(1, rollout.last_tokens()[:, None]).squeeze(1).float()  # [R]

    return reward


def rl_stage(run: RunConfig, d: Dist, tokenizer: Tokenizer) -> Stage:
    """Prompts of `data.*`, GRPO or PPO (`stage.algorithm`), validation by greedy exact match."""
    from h64lm.data.config import resolve_cache_dir
    from h64lm.data.sft_sources import load_conversations

    s, t = run.stage, run.train
    chat = ChatFormat()
    train, val = load_conversations(run.data, resolve_cache_dir(run.data) / "hf_datasets")
    train = train[: run.data.max_samples]
    prompts, held_out = prompts_with_answers(train, chat), prompts_with_answers(val, chat)
    if not prompts or not held_out:
        raise ConfigError(f"data={run.data.name}: no {'training' if not prompts else 'validation'} conversation "
                          "ends with a `#### answer` line, so stage=rl has no reference to reward; use "
                          "data=arithmetic or GSM8K-style answers")
    longest = max(len(p.ids) for p in prompts + held_out)
    check_positions(run.model, longest + max(s.max_new_tokens, s.eval_max_new_tokens),
                    f"the longest prompt ({longest} tokens) + stage.max_new_tokens / stage.eval_max_new_tokens")
    score = weighted_rewards([(exact_match_reward, s.reward_exact_match), (format_reward, s.reward_format)])
    reward = _model_reward(load_reward_model(s.reward_model, d.device)) if s.reward_model else \
        _text_reward(chat, prompts, score)
    layout = ParallelLayout.from_run(run, d.world_size)
    settings = RLSettings(
        algorithm=s.algorithm, group_size=s.group_size, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, clip_eps=s.clip_eps, kl_coef=s.kl_coef, advantage_scale=s.advantage_scale,
        aggregation=s.aggregation, gamma=s.gamma, lam=s.lam, vf_coef=s.vf_coef, seed=t.seed,
        eos_id=chat.eos_id, fixed_length=layout.sharded, top_k=s.top_k, top_p=s.top_p,
        # null: on for PPO (the config refuses true for GRPO, whose groups normalise already)
        whiten_advantages=s.algorithm == "ppo" and s.whiten_advantages is not False)
    reference = build_reference(run, d, print if d.is_main else (lambda _: None))
    precision = resolve_precision(run.hardware.precision, d.device)
    objective = PolicyOptimisation(settings, run.model, reference, reward, precision.autocast)
    loader = PromptLoader(prompts, t.batch_size, t.micro_batches_per_step(d.world_size), t.seed, d.rank,
                          d.world_size, chat.eos_id)
    # fixed rows for the routing snapshots (RoutingSnapshots reads the first 8 of val_batches)
    ids, _ = left_padded([p.ids for p in held_out[:8]], chat.eos_id)
    routing_rows = [Batch(ids, torch.full_like(ids, IGNORE_INDEX))]
    return Stage(loader, objective, None, routing_rows,
                 validate=lambda trainer: _validate(trainer, chat, held_out, score))


def _validate(trainer: "Trainer", chat: ChatFormat, held_out: list[Prompt],
              score: RewardFn) -> Optional[dict[str, Any]]:
    from h64lm.data.tasks.scoring import answer_prompts

    s, t = trainer.run.stage, trainer.run.train
    if trainer.any_stop_requested():
        return None
    problems = held_out[: s.eval_examples or len(held_out)]
    model = trainer.model
    was_training = model.training
    model.eval()
    with trainer.precision.autocast():
        answers = answer_prompts(model, chat, [p.ids for p in problems], s.eval_max_new_tokens,
                                 t.val_batch_size or t.batch_size)
    model.train(was_training)
    exact = sum(exact_match_reward(a, p.reference) for a, p in zip(answers, problems)) / len(problems)
    reward = sum(score(a, p.reference) for a, p in zip(answers, problems)) / len(problems)
    trainer.log(f"step {trainer.step}: rl exact match {exact:.3f}, reward {reward:.3f} on {len(problems)} "
                "validation problems")
    return {"val_loss": 1.0 - exact, "rl/exact_match": exact, "rl/reward": reward}

