"""H64LMEvalLM against independent references: our own cross-entropy (loglikelihood_rolling),
and lm-eval's own `HFLM` over the exported HF folder (loglikelihood, rolling, generate_until and
whole local tasks through `simple_evaluate`)."""

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer

from h64lm.eval import H64LMEvalLM, build_local_tasks, run_tasks
from h64lm.eval.local_tasks import passages
from h64lm.hf import export_hf
from tests.eval.hflm_shim import hflm_available_accelerate
from tests.hf.tiny import sample_text, tiny_model

TEXTS = [p + "." for p in passages(sample_text(60_000))[:6]]


def instances(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
            for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    """Our LM and HFLM over the same weights (a custom-format export: ALiBi+RoPE, alternating
    MoE, a shared expert, a window), both with max_length 48."""
    model = tiny_model(position_encoding="rope+alibi", moe_layers="alternate",
                       num_shared_experts=1, sliding_window=24)
    folder = tmp_path_factory.mktemp("export")
    export_hf(model, tiny_tokenizer_dir, folder)
    # the exported tokenizer (it adds BOS, as training did) on both sides, so both encode alike
    ours = H64LMEvalLM(model, folder, batch_size=4, max_length=48)
    # the folder loaded by transformers' Auto classes, handed to HFLM as a model object (HFLM
    # loading it by path wants a device_map, which needs accelerate)
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                    trust_remote_code=True)
    with hflm_available_accelerate():
        from lm_eval.models.huggingface import HFLM

        ref = HFLM(pretrained=hf_model, tokenizer=AutoTokenizer.from_pretrained(str(folder)),
                   batch_size=4, device="cpu", max_length=48, trust_remote_code=True)
    return model, ours, ref


def test_rolling_equals_our_cross_entropy(setup):
    """One window: log p(text) = -(number of tokens) * our mean CE with the prefix token first."""
    model, short, _ = setup
    ours = H64LMEvalLM(model, short.tokenizer, max_length=128)
    text = TEXTS[0]
    tokens = ours.tok_encode(text)
    assert 10 < len(tokens) <= 128
    (rolling,) = ours.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    ids = torch.tensor([[ours.prefix_token_id] + tokens[:-1]])
    with torch.no_grad():
        ce = model(ids, labels=torch.tensor([tokens])).ce.item()
    assert rolling == pytest.approx(-ce * len(tokens), abs=1e-4)


def test_loglikelihood_and_rolling_match_hflm(setup):
    _, ours, ref = setup
    pairs = [(t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in TEXTS]
    pairs.append(("", "An empty context uses the prefix token."))
    expected = ref.loglikelihood(instances("loglikelihood", pairs))
    got = ours.loglikelihood(instances("loglikelihood", pairs))
    for (g_score, g_greedy), (e_score, e_greedy) in zip(got, expected):
        assert g_score == pytest.approx(e_score, abs=1e-4) and g_greedy == e_greedy
    long_texts = [" ".join(TEXTS[:3]), TEXTS[3]]  # the first spans several 48-token windows
    assert len(ours.tok_encode(long_texts[0])) > 100
    rolling_args = [(t,) for t in long_texts]
    got = ours.loglikelihood_rolling(instances("loglikelihood_rolling", rolling_args))
    expected = ref.loglikelihood_rolling(instances("loglikelihood_rolling", rolling_args))
    assert got == pytest.approx(expected, abs=1e-4)


def test_generate_until_matches_hflm(setup):
    _, ours, ref = setup
    args = [(t[:40], {"until": ["."], "max_gen_toks": 10, "do_sample": False}) for t in TEXTS]
    got = ours.generate_until(instances("generate_until", args))
    assert got == ref.generate_until(instances("generate_until", args))
    assert any(got)


def test_local_tasks_agree_with_hflm_and_write_results(setup, tmp_path):
    model, ours, ref = setup
    info = build_local_tasks(sample_text(), tmp_path / "tasks", n=16)
    tasks = ["h64lm_lastword", "h64lm_cloze"]
    results = run_tasks(model, ours.tokenizer, tasks, batch_size=4, max_length=48,
                        include_path=info["include_path"], include_defaults=False,
                        out_dir=tmp_path / "out")
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["results"].keys() == results["results"].keys() == set(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=info["include_path"], include_defaults=False)
    expected = simple_evaluate(model=ref, tasks=tasks, task_manager=manager,
                               log_samples=False, bootstrap_iters=0)
    for task in tasks:
        for metric, value in expected["results"][task].items():
            if isinstance(value, float):
                assert results["results"][task][metric] == pytest.approx(value, rel=1e-4)


def test_build_local_tasks_shapes_and_errors(tmp_path):
    info = build_local_tasks(sample_text(), tmp_path, n=10)
    cloze = [json.loads(line) for line in (tmp_path / "h64lm_cloze.jsonl").read_text().splitlines()]
    last = [json.loads(line) for line in
            (tmp_path / "h64lm_lastword.jsonl").read_text().splitlines()]
    assert len(cloze) == len(last) == 10 and info["include_path"] == str(tmp_path)
    for c, w in zip(cloze, last):  # the cloze answer is the passage's real last word
        assert c["context"] == w["context"] and c["choices"][c["label"]] == " " + w["target"]
        assert len(set(c["choices"])) == 4
    with pytest.raises(ValueError, match="smaller n"):
        build_local_tasks("Too short.", tmp_path / "x", n=5)


def test_unknown_task_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="no_such_task"):
        run_tasks(tiny_model(), None, ["no_such_task"], include_path=str(tmp_path),
                  include_defaults=False)
