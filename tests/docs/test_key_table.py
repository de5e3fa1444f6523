"""docs/configuration.md's "where is key X consumed" table is the one the code gives today."""

from __future__ import annotations

from tests.docs.key_table import BEGIN, END, GROUPS, ROOT, consumers, table


def test_table_matches_the_code():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert BEGIN in text and END in text, "docs/configuration.md lost its generated key table markers"
    written = text[text.index(BEGIN):text.index(END) + len(END)]
    assert written == table(), ("docs/configuration.md's key table is stale: replace it with the output of "
                                "`python -m tests.docs.key_table`")


def test_table_sees_known_readers():
    """The rule finds readers that are known by hand, so a table of nothing cannot pass."""
    assert "h64lm/train/sharded.py" in consumers("hardware.*")  # FSDP / expert parallelism
    assert "h64lm/runtime/distributed.py" in consumers("hardware.*")  # backend, device
    assert "h64lm/train/wandb_sink.py" in consumers("logger.*")
    assert "h64lm/modes.py" in consumers("eval.*")


def test_every_group_has_a_reader():
    for group in GROUPS:
        assert consumers(group), f"no module reads {group}: the rule in tests/docs/key_table.py missed it"


def test_every_group_has_a_row():
    """The rows come from RunConfig's fields, so a new config group gets one."""
    assert {"model.*", "data.*", "train.*", "optim.*", "hardware.*", "logger.*", "gen.*", "eval.*"} <= set(GROUPS)
    assert any("checkpoint" in g and "mode" in g for g in GROUPS)
