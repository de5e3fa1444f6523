"""stage=sft through the same trainer: masked loss, validation on held-out conversations, exact
resume, init_from a pretrained run, and the config rules between stage and data."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from h64lm.cli import run
from h64lm.data.batch import IGNORE_INDEX
from h64lm.data.tasks.arithmetic import make_splits
from h64lm.runtime.checkpoint import read_full_state
from h64lm.runtime.distributed import Dist
from h64lm.train.metrics import read_metrics
from h64lm.validation import ConfigError
from tests.helpers import FAST, compose_cfg, run_config, text_corpus

ONE = Dist(0, 1, torch.device("cpu"))
# FAST's tiny model; windows long enough for one arithmetic problem (~60 tokens) or two
SFT = [a for a in FAST if not a.startswith("data.")] + [
    "stage=sft", "data=arithmetic", "data.seq_len=96", "data.max_samples=200", "data.val_windows=4",
    "train.sample_tokens=0", "train.keep_last=5", "stage.eval_examples=6", "stage.eval_max_new_tokens=8"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "full"
    run(run_config(SFT), run_dir, SFT)
    return run_dir


def test_sft_run_trains_and_validates_on_held_out_conversations(sft_run):
    records = read_metrics(sft_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and all(math.isfinite(v) for v in val)
    assert val[1] < val[0]  # six AdamW/Muon steps from random weights lower the held-out loss
    assert all(r["routing"] for r in records if "val_loss" in r)  # MoE snapshots on packed rows


def test_exact_match_is_logged_in_loop_and_by_mode_eval(sft_run, tmp_path):
    """The callback and mode=eval score the same test problems with the same weights: the last
    evaluation's numbers come back from the saved checkpoint."""
    import json

    evals = [r for r in read_metrics(sft_run / "metrics.jsonl") if "val_loss" in r]
    last = evals[-1]
    assert 0.0 <= last["sft/exact_match"] <= 1.0
    table = json.loads((sft_run / "exact_match.json").read_text())  # before / after
    assert sorted(table, key=int) == ["0", "3", "6"]
    assert all(table[str(r["step"])] == r["sft/exact_match"] for r in evals)
    args = ["mode=eval", f"checkpoint={sft_run}", "hardware=cpu", "logger=none", "train.batch_size=2",
            "stage.eval_examples=6", "stage.eval_max_new_tokens=8"]
    run(run_config(args), tmp_path, args)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert result["sft/exact_match"] == last["sft/exact_match"]
    assert result["targets"] > 0


def test_chat_answers_one_prompt_greedily(sft_run, tmp_path, capsys):
    """mode=chat with prompt=...: the reply is the greedy continuation of Mistral's chat prompt up
    to </s>, as a plain argmax loop without the KV cache computes it."""
    from h64lm.data.chat import ChatFormat, Message
    from h64lm.runtime.checkpoint import load_trained_model

    question = "Mia has 7 pens. She gets 5 more. How many pens does Mia have now?"
    args = ["mode=chat", f"checkpoint={sft_run}", "hardware=cpu", "logger=none", f"prompt={question}",
            "gen.temperature=0", "gen.max_new_tokens=12", "gen.repetition_penalty=1.0"]
    replies = run(run_config(args), tmp_path, args)
    chat = ChatFormat()
    model, _ = load_trained_model(sft_run, torch.device("cpu"))
    ids = chat.prompt([Message("user", question)])
    new = []
    with torch.no_grad():
        for _ in range(12):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == chat.eos_id:
                break
            new.append(token)
    assert replies == [chat.decode(new)]
    assert f"assistant> {replies[0]}" in capsys.readouterr().out
    assert (tmp_path / "chat.txt").read_text() == f"user: {question}\nassistant: {replies[0]}\n"


def test_export_of_an_sft_run_carries_the_chat_template(sft_run, tmp_path):
    """transformers' apply_chat_template on the exported tokenizer gives mistral-common's ids."""
    from transformers import AutoTokenizer

    from h64lm.data.chat import ChatFormat, Message

    args = ["mode=export", f"checkpoint={sft_run}", "hardware=cpu", "logger=none", f"out={tmp_path / 'hf'}"]
    run(run_config(args), tmp_path, args)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    turns = [("user", "What is 2+3?"), ("assistant", "2 + 3 = 5.\n#### 5"), ("user", "And 4-1?")]
    ours = ChatFormat()
    conversation = ours.encode([Message(r, c) for r, c in turns[:2]]).tokens
    given = [{"role": r, "content": c} for r, c in turns]
    assert list(tok.apply_chat_template(given[:2], return_dict=False)) == conversation
    assert list(tok.apply_chat_template(given, add_generation_prompt=True, return_dict=False)) == \
        ours.prompt([Message(r, c) for r, c in turns])


def _assistant_tokens() -> dict[tuple, int]:
    """Each train conversation's input ids (its tokens but the last, which nothing follows) -> its
    number of assistant tokens, straight from mistral-common (the conversation minus its prompt)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from h64lm.data.tokenizer import mistral_model_file

    # agnostic: a conversation may end with the assistant's turn (training, not serving)
    tok = MistralTokenizer.from_file(str(mistral_model_file()), mode=ValidationMode.agnostic)
    out = {}
    for p in make_splits()["train"][:200]:
        full = tok.encode_chat_completion(ChatCompletionRequest(
            messages=[UserMessage(content=p.question), AssistantMessage(content=p.answer)])).tokens
        prompt = tok.encode_chat_completion(ChatCompletionRequest(
            messages=[UserMessage(content=p.question)])).tokens
        out[tuple(full[:-1])] = len(full) - len(prompt)
    return out


def test_the_loss_covers_assistant_tokens_only(tmp_path):
    """The step's cross-entropy is the mean over the assistant tokens of its batch: the targets
    are exactly mistral-common's assistant tokens, and the logged ce equals a direct computation
    with the starting weights over those targets (not over every token)."""
    from h64lm.train.loop import Trainer

    trainer = Trainer(run_config(SFT), tmp_path, SFT, ONE, callbacks=[])
    batch = copy.deepcopy(trainer.loader).next_batch()
    counts = _assistant_tokens()
    for row in range(batch.input_ids.shape[0]):
        docs = batch.document_ids[row]
        for doc in docs.unique().tolist():
            ids = tuple(batch.input_ids[row][docs == doc].tolist())
            targets = int((batch.labels[row][docs == doc] != IGNORE_INDEX).sum())
            if doc == docs.max() and ids not in counts:  # the padding at the end of a window
                assert targets == 0
                continue
            assert targets == counts[ids] > 0
    with torch.no_grad():
        logits = trainer.model(batch.input_ids, document_ids=batch.document_ids).logits
    masked = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
    shifted = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], dim=1)  # every token's next
    everything = F.cross_entropy(logits.flatten(0, 1), shifted.flatten())
    stats = trainer.train_step(stop_requested=False)
    assert stats.terms["ce"] == pytest.approx(masked.item(), rel=1e-5)
    assert abs(masked.item() - everything.item()) > 1e-3  # the check can tell the two apart


def test_sft_resume_from_step_k_is_bit_exact(tmp_path, sft_run):
    """The packed loader's position, the RNG and the optimizer continue exactly (CPU, fp32)."""
    resume = SFT + [f"train.resume={sft_run / 'checkpoints' / 'step_0000003'}"]
    run(run_config(resume), tmp_path, resume)
    full = {r["step"]: (r["loss"], r.get("val_loss")) for r in read_metrics(sft_run / "metrics.jsonl")}
    again = {r["step"]: (r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == full[s] for s in again), (again, full)  # bit for bit
    a = read_full_state(sft_run / "checkpoints" / "step_0000006")["model"]
    b = read_full_state(tmp_path / "checkpoints" / "step_0000006")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_starts_from_a_pretrained_run(tmp_path):
    from h64lm.train.loop import Trainer

    pre = FAST + ["data=text", f"data.path={text_corpus(tmp_path)}", "train.max_steps=2",
                  "train.sample_tokens=0"]
    run(run_config(pre), tmp_path / "pre", pre)
    sft = SFT + [f"train.init_from={tmp_path / 'pre'}"]
    trainer = Trainer(run_config(sft), tmp_path / "sft", sft, ONE, callbacks=[])
    pretrained = read_full_state(tmp_path / "pre" / "checkpoints" / "step_0000002")["model"]
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], pretrained[k]) for k in pretrained)


@pytest.mark.parametrize("overrides, message", [
    (["stage=sft"], r"^stage=sft needs a data source of conversations .*not data=wiki_excerpt"),
    (["data=arithmetic"], r"^data=arithmetic holds conversations for fine-tuning; add stage=sft"),
    (["stage=sft", "data=arithmetic", "train.extra_eval_seq_lens=[64]"], r"^train\.extra_eval_seq_lens"),
    (["stage=sft", "data=arithmetic", "train.downstream_every=5"], r"^train\.downstream_every"),
])
def test_stage_and_data_must_agree(overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_config(overrides)


def test_stage_typos_fail_at_compose_time():
    with pytest.raises(Exception, match="sfty"):
        compose_cfg(["stage=sfty"])
    with pytest.raises(Exception, match="nmae"):
        compose_cfg(["stage=sft", "stage.nmae=sft"])
    with pytest.raises(ConfigError, match="stage.name"):
        run_config(["stage.name=dpp"])  # not a stage (dpo is one now)


def test_two_process_sft_matches_one_process(tmp_path):
    """Two gloo ranks with half the micro-batch each train and validate like one process: the
    loss is normalised by the step's global count of assistant tokens, not per rank."""
    from tests.helpers import one_and_two_processes

    common = SFT + ["train.max_steps=3", "model.router_aux_loss_coef=0", "stage.eval_examples=0"]
    one, two = one_and_two_processes(common, tmp_path)
    assert [r["step"] for r in two] == [1, 2, 3]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # each rank's windows, padding left out
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)


def test_document_mask_marks_every_corpus_document_in_pretraining(tmp_path):
    """data.document_mask=true: each window's document_ids count the EOS tokens before each
    position (a new document starts after each EOS); the switch changes the training loss."""
    from h64lm.data import load_tokenizer
    from h64lm.train.stage import DocumentMasked, pretraining_stage

    args = FAST + ["data=text", f"data.path={text_corpus(tmp_path)}", "data.document_mask=true"]
    cfg = run_config(args)
    tokenizer = load_tokenizer(cfg.data)
    stage = pretraining_stage(cfg, Dist(0, 1, torch.device("cpu")), tokenizer)
    assert isinstance(stage.loader, DocumentMasked)
    state = stage.loader.state_dict()
    batch = stage.loader.next_batch()
    eos = (batch.input_ids == tokenizer.eos_id).long()
    expected = torch.cat([torch.zeros_like(eos[:, :1]), eos[:, :-1].cumsum(1)], dim=1)
    assert torch.equal(batch.document_ids, expected) and int(eos.sum()) > 0
    stage.loader.load_state_dict(state)  # the inner loader's state: the same window again
    assert torch.equal(stage.loader.next_batch().input_ids, batch.input_ids)

    losses = {}
    for mask in ("false", "true"):
        run_args = args[:-1] + [f"data.document_mask={mask}", "train.max_steps=1"]
        run(run_config(run_args), tmp_path / mask, run_args)
        losses[mask] = read_metrics(tmp_path / mask / "metrics.jsonl")[0]["ce"]
    assert losses["true"] != losses["false"]
