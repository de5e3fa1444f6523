"""The sampling benchmark runs end to end at a toy size. No timing asserts: speed is printed."""

from experiments.bench_generate import main


def test_bench_generate_smoke(capsys):
    results = main(["--smoke"])
    assert set(results["seconds"]) == {"ours", "ours_repeated", "hf"}
    assert all(s > 0 for s in results["seconds"].values())
    assert results["tokens"] == 3 * 2 * 8  # prompts x G x new tokens
    # the script refuses to time anything unless greedy decoding matched transformers
    assert "identical to transformers" in capsys.readouterr().out
